"""Table 2 — picking the representation with a few labelled anomalies.

For each split, ``n_anomalies`` labelled anomalies (never in the test set) and the split's
held-out normal images form a validation set. Every block is fitted on the training normals
and scored on it; the block with the best validation AUROC is then evaluated on the test
set, next to the concatenation of all blocks (Supplementary Sect. 10 gives the per-block
validation and test AUROC, which are kept too, with a plot against block depth).

Beyond the paper, the same fits choose among several input sizes (``image_size`` a list)
and detectors: the (size, block or concatenation, detector) triple with the best
validation AUROC, picked inside the training folds, is reported on the test fold under
``picked`` (see :func:`run_table2`).
"""

from __future__ import annotations

import numpy as np

from kad.data.protocols import splits
from kad.errors import KadError
from kad.screening.selection import Candidate
from kad.utils.metrics import mean_std
from kad.utils.progress import Progress

from .common import (
    FEATURES,
    RecipeOptions,
    Run,
    Workbench,
    make_detector,
    plan_columns,
    save_figure,
    summarise,
)
from .table1 import RecipeResult

#: The ``representation`` of the runs of kad's pick, one per split, in ``results.csv``.
PICKED_TRIPLE = "picked (size, block, detector)"


def n_validation_anomalies(n_anomalies: float | None, n_images: int) -> int:
    """An absolute count, or a fraction of the dataset size (default 3%, the paper's)."""
    value = 0.03 if n_anomalies is None else n_anomalies
    count = int(round(value * n_images)) if value < 1 else int(value)
    if count < 1:
        raise KadError(f"--n-anomalies {n_anomalies} gives no anomaly for {n_images} images")
    return count


def run_table2(options: RecipeOptions, n_anomalies: float | None = None,
               progress: Progress | None = None,
               bench: Workbench | None = None) -> RecipeResult:
    """The paper's Table 2 and kad's evidence-driven pick, from one grid of fits.

    Every split fits each candidate of :func:`kad.screening.selection.candidate_grid` (each block
    and the concatenation at every ``image_size``, the concatenation across sizes, each
    with every detector) on its training normals and ranks it on its validation set
    (:func:`kad.screening.selection.nested_selection`: the test fold never influences a pick).

    * The paper's columns (``summary``, ``picked_blocks``, ``blocks``): the first detector
      at the first size, the block with the best validation AUROC, and the concatenation.
      With one size and one detector this is exactly the paper's Table 2.
    * ``picked``: the best (size, block or concatenation, detector) triple per split and
      its test metrics; ``candidates``: every candidate's validation and test AUROC.

    ``progress`` gets the tasks of :func:`~kad.screening.selection.nested_selection`
    (``splits``, and ``candidates`` within each).
    """
    from kad.screening.selection import (
        CONCAT,
        candidate_grid,
        nested_selection,
        summarise_candidates,
    )

    bench = bench or Workbench(options, progress=progress)
    detectors = [spec for spec, _ in plan_columns(options.detectors, [FEATURES])]
    spec = detectors[0]
    valid = bench.valid({FEATURES})
    features = bench.multi
    size = features.sizes[0]
    blocks = features.blocks(size)
    todo = splits(bench.dataset, bench.seeds, options.folds, valid, options.classes)
    wanted = n_validation_anomalies(n_anomalies, int(valid.sum()))
    fewest = min(len(split.spare_anomalies) for split in todo)
    if fewest < wanted:
        bench.log(f"only {fewest} anomalies are outside the test set of some split; "
                  "those splits use them all")
    grid = candidate_grid(features, detectors)
    results = nested_selection(
        features, todo, grid, wanted, progress=progress,
        make_detector=lambda det, seed: make_detector(det, seed, bench.detector_defaults))

    def paper_candidate(block):
        return Candidate(f"{block}@{size}", spec)

    runs: list[Run] = []
    picked: list[str] = []
    for split, result in zip(todo, results, strict=True):
        best = result.selection.best_of(lambda c: c.detector == spec and c.sizes == (size,)
                                        and c.block != CONCAT)
        picked.append(best.candidate.block)
        runs.append(_run(spec, "picked", split, best))
        runs.append(_run(spec, CONCAT, split,
                         result.selection.score_of(paper_candidate(CONCAT))))
    summary = summarise(runs, ("detector", "representation"))
    triple_runs = [_run(r.picked.detector, PICKED_TRIPLE, split, r.selection.score_of(r.picked))
                   for split, r in zip(todo, results, strict=True)]
    candidates = summarise_candidates(results)
    extra = {
        "n_validation_anomalies": wanted, "picked_blocks": picked,
        "blocks": _blocks_table(candidates, blocks, size, spec),
        "image_sizes": features.sizes, "detectors": detectors,
        "grid": {"sizes": features.sizes, "detectors": detectors, "n_candidates": len(grid),
                 "representations": list(dict.fromkeys(c.representation for c in grid))},
        "picked": _picked_record(results), "candidates": candidates,
    }
    return RecipeResult("table2", bench, runs + triple_runs, summary, {}, extra)


def _blocks_table(candidates: list[dict], blocks: list[str], size: int, spec: str) -> list:
    """Each block's validation and test AUROC for the paper's detector, in network order."""
    by_rep = {(c["representation"], c["detector"]): c for c in candidates}
    keys = ("val_auroc", "val_auroc_std", "test_auroc", "test_auroc_std",
            "val_auroc_per_split", "test_auroc_per_split")
    return [{"depth": depth, "block": block,
             **{k: by_rep[(f"{block}@{size}", spec)][k] for k in keys}}
            for depth, block in enumerate(blocks)]


def _picked_record(results) -> dict:
    """The picked triples: their test AUROC over splits and how often each was picked."""
    auroc, auroc_std = mean_std(r.test["auroc"] for r in results)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.picked.label] = counts.get(r.picked.label, 0) + 1
    return {"auroc": auroc, "auroc_std": auroc_std, "counts": counts,
            "per_split": [r.to_json() for r in results]}


def _run(spec, representation, split, score) -> Run:
    """A run from a candidate's score on a split's test set."""
    metrics = score.test
    return Run(
        detector=spec, input=FEATURES, representation=representation, split=split.name,
        seed=split.seed, fold=split.fold, normal_class=split.normal_class,
        auroc=metrics["auroc"], auprc=metrics["auprc"], recall=metrics["recall"],
        fit_seconds=score.fit_seconds, score_seconds=metrics["score_seconds"],
        n_train=len(split.train), n_test=len(split.test),
        n_test_anomalies=int(split.test_y.sum()),
    )


def plot_blocks(path, blocks_table: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = [b["depth"] for b in blocks_table]
    fig, ax = plt.subplots(figsize=(max(6, len(depth) * 0.22), 4))
    for key, label in (("val_auroc", "validation"), ("test_auroc", "test")):
        mean = np.array([b[key] for b in blocks_table]) * 100
        std = np.array([b[f"{key}_std"] for b in blocks_table]) * 100
        ax.plot(depth, mean, marker="o", ms=3, label=label)
        ax.fill_between(depth, mean - std, mean + std, alpha=0.2)
    ax.set_xticks(depth)
    ax.set_xticklabels([b["block"] for b in blocks_table], rotation=90, fontsize=6)
    ax.set_ylabel("AUROC (%)")
    ax.set_xlabel("block (network order)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_candidates(path, candidates: list[dict], title: str):
    """Test AUROC (mean ± std over splits) per block, in network order, with the
    concatenation last: one line per (size, detector); the concatenation across sizes is
    one marker per detector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kad.screening.selection import CONCAT

    single = [c for c in candidates if len(c["sizes"]) == 1]
    blocks = list(dict.fromkeys(c["block"] for c in single if c["block"] != CONCAT))
    xs = {b: i for i, b in enumerate([*blocks, CONCAT])}
    fig, ax = plt.subplots(figsize=(max(7, len(xs) * 0.3), 4.5))
    lines: dict[tuple[str, str], list[dict]] = {}
    for c in single:
        lines.setdefault((c["size"], c["detector"]), []).append(c)
    for (size, detector), members in lines.items():
        x = np.array([xs[c["block"]] for c in members])
        mean = np.array([c["test_auroc"] for c in members]) * 100
        std = np.array([c["test_auroc_std"] for c in members]) * 100
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=f"{size} px, {detector}")
        ax.fill_between(x, mean - std, mean + std, alpha=0.12, color=line.get_color())
    for c in candidates:
        if len(c["sizes"]) > 1:
            ax.errorbar([xs[CONCAT] + 0.25], [c["test_auroc"] * 100],
                        yerr=[c["test_auroc_std"] * 100], marker="*", ms=9, capsize=3,
                        linestyle="none", label=f"{c['size']} px concat, {c['detector']}")
    ax.set_xticks(list(xs.values()))
    ax.set_xticklabels(list(xs), rotation=90, fontsize=6)
    ax.set_ylabel("test AUROC (%)")
    ax.set_xlabel("block (network order), then every block concatenated")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path
