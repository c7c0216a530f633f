"""Table 3 — anomalies mixed into training (the fully unsupervised setting).

For each ratio ρ, anomalies that are never in the test set are added to the training
normals so that they make up ρ of the training set. Defaults follow the paper: 1-3% for
medical data, 5-25% for natural images. Baselines under contamination (Supplementary
Table 16) are other ``--detectors``.
"""

from __future__ import annotations

import numpy as np

from kad.data.protocols import mix_anomalies, splits
from kad.utils.progress import Progress, task

from .common import RecipeOptions, Workbench, plan_columns, summarise
from .table1 import RecipeResult, evaluate_column

NATURAL_RATIOS = (0.05, 0.10, 0.15, 0.20, 0.25)
MEDICAL_RATIOS = (0.01, 0.02, 0.03)


def run_table3(options: RecipeOptions, ratios: list[float] | None = None,
               progress: Progress | None = None,
               bench: Workbench | None = None) -> RecipeResult:
    """Every detector column at every ratio on every split; ``progress`` gets the task
    ``table3 runs`` and, within it, each detector's own tasks."""
    bench = bench or Workbench(options, progress=progress)
    ratios = list(ratios or (NATURAL_RATIOS if bench.natural else MEDICAL_RATIOS))
    columns = plan_columns(options.detectors, options.inputs)
    valid = bench.valid({kind for _, kind in columns})
    todo = splits(bench.dataset, bench.seeds, options.folds, valid, options.classes)
    runs, curves = [], {}
    with task(progress, "table3 runs", len(todo) * len(columns) * len(ratios)) as update:
        for split in todo:
            for ratio in ratios:
                rows, mixed = mix_anomalies(split, ratio, split.seed)
                # Only a supervised detector (the upper bound) is shown these labels.
                y = np.isin(rows, mixed).astype(int)
                for spec, kind in columns:
                    run, curve = evaluate_column(
                        bench, split, spec, kind, options.representation, rows, y,
                        ratio=ratio, n_train_anomalies=len(mixed), progress=progress)
                    runs.append(run)
                    curves.setdefault(run.label, []).append(curve)
                    update(len(runs))
    summary = summarise(runs, ("detector", "input", "representation", "ratio"))
    return RecipeResult("table3", bench, runs, summary, curves, {"ratios": ratios})
