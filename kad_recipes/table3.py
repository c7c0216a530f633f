"""Table 3 — anomalies mixed into training (the fully unsupervised setting).

For each ratio ρ, anomalies that are never in the test set are added to the training
normals so that they make up ρ of the training set. Defaults follow the paper: 1-3% for
medical data, 5-25% for natural images. Baselines under contamination (Supplementary
Table 16) are other ``--detectors``.
"""

from __future__ import annotations

import numpy as np

from kad.data.protocols import mix_anomalies, splits

from .common import RecipeOptions, Workbench, plan_columns, summarise
from .table1 import RecipeResult, evaluate_column

NATURAL_RATIOS = (0.05, 0.10, 0.15, 0.20, 0.25)
MEDICAL_RATIOS = (0.01, 0.02, 0.03)


def run_table3(options: RecipeOptions, ratios: list[float] | None = None,
               progress=None,
               bench: Workbench | None = None) -> RecipeResult:
    bench = bench or Workbench(options)
    ratios = list(ratios or (NATURAL_RATIOS if bench.natural else MEDICAL_RATIOS))
    columns = plan_columns(options.detectors, options.inputs)
    valid = bench.valid({kind for _, kind in columns})
    todo = splits(bench.dataset, bench.seeds, options.folds, valid, options.classes)
    runs, curves = [], {}
    total, done = len(todo) * len(columns) * len(ratios), 0
    for split in todo:
        for ratio in ratios:
            rows, mixed = mix_anomalies(split, ratio, split.seed)
            # Only a supervised detector (the upper bound) is shown these labels.
            y = np.isin(rows, mixed).astype(int)
            for spec, kind in columns:
                run, curve = evaluate_column(bench, split, spec, kind, options.representation,
                                             rows, y, ratio=ratio, n_train_anomalies=len(mixed))
                runs.append(run)
                curves.setdefault(run.label, []).append(curve)
                done += 1
                if progress:
                    progress(done, total)
    summary = summarise(runs, ("detector", "input", "representation", "ratio"))
    return RecipeResult("table3", bench, runs, summary, curves, {"ratios": ratios})
