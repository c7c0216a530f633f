"""Table 1 — novelty detection: detectors trained on normal images only.

Rows are datasets, columns are detectors on inputs: the paper's method is ``iforest`` on
the concatenation of every block (``features``); its raw-pixel baseline is the same
detector on ``pixels``. Any installed detector can be a column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kad.data.protocols import splits
from kad.utils.metrics import roc
from kad.utils.progress import Progress, task

from .common import FEATURES, RecipeOptions, Run, Workbench, fit_and_score, plan_columns, summarise


@dataclass
class RecipeResult:
    recipe: str
    bench: Workbench
    runs: list[Run]
    summary: list[dict]
    curves: dict[str, list] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def training_rows(split, supervised: bool) -> tuple[np.ndarray, np.ndarray]:
    """Normal training rows, plus the split's spare anomalies (labelled) for a supervised
    detector, the paper's upper bound."""
    if not supervised:
        return split.train, np.zeros(len(split.train), dtype=int)
    rows = np.concatenate([split.train, split.spare_anomalies])
    return rows, np.r_[np.zeros(len(split.train)), np.ones(len(split.spare_anomalies))].astype(int)


def evaluate_column(bench: Workbench, split, spec: str, kind: str, representation: str,
                    train_rows: np.ndarray, train_y: np.ndarray, ratio: float | None = None,
                    n_train_anomalies: int = 0, progress: Progress | None = None):
    from kad.registry import get_detector

    supervised = get_detector(spec).supervised
    rep = representation if kind == FEATURES else "-"
    x_train = bench.inputs(kind, rep, train_rows)
    x_test = bench.inputs(kind, rep, split.test)
    metrics, scores, _ = fit_and_score(spec, split.seed, x_train, x_test, split.test_y,
                                       train_y, bench.detector_defaults, progress)
    run = Run(
        detector=spec, input=kind, representation=rep, split=split.name, seed=split.seed,
        fold=split.fold, normal_class=split.normal_class, auroc=metrics["auroc"],
        auprc=metrics["auprc"], recall=metrics["recall"],
        fit_seconds=metrics["fit_seconds"], score_seconds=metrics["score_seconds"],
        n_train=len(train_rows), n_test=len(split.test),
        n_test_anomalies=int(split.test_y.sum()), supervised=supervised, ratio=ratio,
        n_train_anomalies=n_train_anomalies or int(np.sum(train_y)),
    )
    return run, roc(split.test_y, scores)


def run_table1(options: RecipeOptions, progress: Progress | None = None,
               bench: Workbench | None = None) -> RecipeResult:
    """Every detector column on every split; ``progress`` gets the task ``table1 runs``
    (one per split and column) and, within it, each detector's own tasks."""
    from kad.registry import get_detector

    bench = bench or Workbench(options, progress=progress)
    columns = plan_columns(options.detectors, options.inputs)
    valid = bench.valid({kind for _, kind in columns})
    todo = splits(bench.dataset, bench.seeds, options.folds, valid, options.classes)
    runs, curves = [], {}
    with task(progress, "table1 runs", len(todo) * len(columns)) as update:
        for split in todo:
            for spec, kind in columns:
                rows, y = training_rows(split, get_detector(spec).supervised)
                run, curve = evaluate_column(bench, split, spec, kind, options.representation,
                                             rows, y, progress=progress)
                runs.append(run)
                curves.setdefault(run.label, []).append(curve)
                update(len(runs))
    summary = summarise(runs, ("detector", "input", "representation"))
    return RecipeResult("table1", bench, runs, summary, curves)
