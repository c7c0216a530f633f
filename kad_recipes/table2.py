"""Table 2 — picking the representation with a few labelled anomalies.

For each split, ``n_anomalies`` labelled anomalies (never in the test set) and the split's
held-out normal images form a validation set. Every block is fitted on the training normals
and scored on it; the block with the best validation AUROC is then evaluated on the test
set, next to the concatenation of all blocks (Supplementary Sect. 10 gives the per-block
validation and test AUROC, which are kept too, with a plot against block depth).
"""

from __future__ import annotations

import time

import numpy as np

from kad.errors import KadError
from kad.metrics import evaluate, mean_std
from kad.protocols import splits
from kad.selection import pick_block

from .common import (
    FEATURES,
    RecipeOptions,
    Run,
    Workbench,
    fit_and_score,
    make_detector,
    summarise,
)
from .table1 import RecipeResult


def n_validation_anomalies(n_anomalies: float | None, n_images: int) -> int:
    """An absolute count, or a fraction of the dataset size (default 3%, the paper's)."""
    value = 0.03 if n_anomalies is None else n_anomalies
    count = int(round(value * n_images)) if value < 1 else int(value)
    if count < 1:
        raise KadError(f"--n-anomalies {n_anomalies} gives no anomaly for {n_images} images")
    return count


def run_table2(options: RecipeOptions, n_anomalies: float | None = None,
               progress=None,
               bench: Workbench | None = None) -> RecipeResult:
    bench = bench or Workbench(options)
    spec = options.detectors[0]
    valid = bench.valid({FEATURES})
    features = bench.features
    blocks = features.blocks
    todo = splits(bench.dataset, bench.seeds, options.folds, valid, options.classes)
    wanted = n_validation_anomalies(n_anomalies, int(valid.sum()))
    runs: list[Run] = []
    per_block = {b: {"val": [], "test": []} for b in blocks}
    picked: list[str] = []
    total, done = len(todo) * (len(blocks) + 1), 0
    for split in todo:
        n_val = min(wanted, len(split.spare_anomalies))
        if n_val < wanted and not picked:
            bench.log(f"only {n_val} anomalies are outside the test set; using them all")
        rng = np.random.default_rng(split.seed)
        val_anomalies = rng.choice(split.spare_anomalies, size=n_val, replace=False)
        val_rows = np.concatenate([split.val_normal, val_anomalies])
        val_y = np.r_[np.zeros(len(split.val_normal)), np.ones(n_val)].astype(int)
        def fit(block, x_train, seed=split.seed):
            return make_detector(spec, seed).fit(x_train)

        def tick(_done, _total):
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

        choice = pick_block(features, split.train, val_rows, val_y, None, blocks=blocks,
                            fit=fit, progress=tick)
        test_metrics = {}
        for block in blocks:
            det = choice.detectors.pop(block)
            start = time.perf_counter()
            scores = det.anomaly_score(bench.inputs(FEATURES, block, split.test))
            metrics = evaluate(split.test_y, scores, scores > det.threshold_)
            metrics.update(fit_seconds=choice.fit_seconds[block],
                           score_seconds=time.perf_counter() - start)
            test_metrics[block] = metrics
            per_block[block]["val"].append(choice.validation_auroc[block])
            per_block[block]["test"].append(metrics["auroc"])
        picked.append(choice.block)
        runs.append(_run(spec, "picked", split, test_metrics[choice.block]))
        concat, _, _ = fit_and_score(
            spec, split.seed, bench.inputs(FEATURES, "concat", split.train),
            bench.inputs(FEATURES, "concat", split.test), split.test_y)
        runs.append(_run(spec, "concat", split, concat))
        done += 1
        if progress:
            progress(done, total)
    summary = summarise(runs, ("detector", "representation"))
    blocks_table = []
    for depth, block in enumerate(blocks):
        val_mean, val_std = mean_std(per_block[block]["val"])
        test_mean, test_std = mean_std(per_block[block]["test"])
        blocks_table.append({"depth": depth, "block": block, "val_auroc": val_mean,
                             "val_auroc_std": val_std, "test_auroc": test_mean,
                             "test_auroc_std": test_std,
                             "val_auroc_per_split": per_block[block]["val"],
                             "test_auroc_per_split": per_block[block]["test"]})
    extra = {"n_validation_anomalies": wanted, "picked_blocks": picked,
             "blocks": blocks_table}
    return RecipeResult("table2", bench, runs, summary, {}, extra)


def _run(spec, representation, split, metrics) -> Run:
    return Run(
        detector=spec, input=FEATURES, representation=representation, split=split.name,
        seed=split.seed, fold=split.fold, normal_class=split.normal_class,
        auroc=metrics["auroc"], auprc=metrics["auprc"], recall=metrics["recall"],
        fit_seconds=metrics["fit_seconds"], score_seconds=metrics["score_seconds"],
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
