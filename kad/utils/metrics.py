"""Evaluation metrics: AUROC (the headline), AUPRC and recall at the detector's threshold
(the paper's supplementary tables 12-14), summarised as mean ± standard deviation."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def evaluate(y_true, scores, flagged=None) -> dict[str, float]:
    """``auroc``, ``auprc`` and (when ``flagged`` is given) ``recall`` of anomalies."""
    from sklearn.metrics import average_precision_score, recall_score, roc_auc_score

    y_true = np.asarray(y_true, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    if len(np.unique(y_true)) != 2:
        raise ValueError("evaluation needs both normal (0) and anomalous (1) test images")
    result = {
        "auroc": float(roc_auc_score(y_true, scores)),
        "auprc": float(average_precision_score(y_true, scores)),
    }
    if flagged is not None:
        result["recall"] = float(recall_score(y_true, np.asarray(flagged, dtype=int),
                                              zero_division=0))
    return result


def roc(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y_true, dtype=int), np.asarray(scores))
    return fpr, tpr


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=0))


def percent(mean: float, std: float | None = None) -> str:
    """``88.2 ± 6.6`` from fractions, as the paper prints."""
    if np.isnan(mean):
        return "—"
    if std is None or np.isnan(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"
