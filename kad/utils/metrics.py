"""Evaluation metrics: AUROC (the headline), AUPRC and recall at the detector's threshold
(the paper's supplementary tables 12-14), summarised as mean ± standard deviation; and
the measures of where a map points: the Wilson interval of a share, and the per-region
overlap (PRO) curve and its normalised area up to a false-positive rate (AUPRO), as
defined for MVTec AD (Bergmann et al. 2021) and computed by anomalib."""

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


def wilson_interval(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the share ``hits / n``; ``(nan, nan)`` when ``n`` is 0."""
    from scipy.stats import binomtest

    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(hits), int(n)).proportion_ci(confidence_level=confidence,
                                                    method="wilson")
    return float(ci.low), float(ci.high)


#: 8-connectivity, as MVTec AD's evaluation (``scipy.ndimage.label`` with a 3x3 structure)
#: and anomalib (OpenCV's connected components) label ground-truth regions.
_EIGHT = np.ones((3, 3), dtype=bool)


def pro_curve(maps, masks, valid=None) -> tuple[np.ndarray, np.ndarray]:
    """The per-region overlap curve of anomaly ``maps`` (2-D arrays, higher = more
    anomalous) against ground-truth ``masks`` (same shapes, True on anomalous pixels):
    ``(fpr, pro)``, one point per distinct map value from the highest down, starting at
    ``(0, 0)``.

    At a threshold ``t``, ``fpr`` is the share of normal pixels (of every image) with a
    value ``>= t``, and ``pro`` the mean, over every connected region of every mask
    (8-connectivity), of the share of the region's pixels with a value ``>= t``. ``valid``
    (same shapes, optional): only these pixels count (e.g. the fundus); regions are
    labelled on the mask within them. Exact (no binning of thresholds): each pixel adds
    ``1 / normal pixels`` to ``fpr`` or ``1 / (region size x regions)`` to ``pro`` where
    the descending sweep passes it, as MVTec AD's ``compute_pro``.
    """
    from scipy import ndimage

    values, fp_steps, pro_steps = [], [], []
    n_regions = 0
    n_normal = 0
    for i, (heat, mask) in enumerate(zip(maps, masks, strict=True)):
        heat = np.asarray(heat, dtype=np.float64)
        mask = np.asarray(mask, dtype=bool)
        if heat.shape != mask.shape:
            raise ValueError(f"map {i} has shape {heat.shape}, its mask {mask.shape}")
        keep = (np.ones(mask.shape, bool) if valid is None
                else np.asarray(valid[i], dtype=bool))
        labels, count = ndimage.label(mask & keep, structure=_EIGHT)
        sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
        normal = keep & ~mask
        inside = labels > 0
        values.append(heat[normal])
        fp_steps.append(np.ones(int(normal.sum())))
        pro_steps.append(np.zeros(int(normal.sum())))
        values.append(heat[inside])
        fp_steps.append(np.zeros(int(inside.sum())))
        pro_steps.append(1.0 / sizes[labels[inside]])
        n_regions += count
        n_normal += int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("a PRO curve needs at least one anomalous region and one normal "
                         "pixel")
    values = np.concatenate(values)
    order = np.argsort(-values, kind="stable")
    values = values[order]
    fpr = np.cumsum(np.concatenate(fp_steps)[order]) / n_normal
    pro = np.cumsum(np.concatenate(pro_steps)[order]) / n_regions
    last = np.append(np.diff(values) != 0, True)  # one point per distinct value
    return np.concatenate([[0.0], fpr[last]]), np.concatenate([[0.0], pro[last]])


def aupro(maps, masks, valid=None, fpr_limit: float = 0.3) -> float:
    """The area under the PRO curve (:func:`pro_curve`) from a false-positive rate of 0
    to ``fpr_limit``, divided by ``fpr_limit`` (1 is perfect; a map of random values
    scores about ``fpr_limit / 2``). The curve is interpolated linearly at ``fpr_limit``,
    as MVTec AD's evaluation and anomalib do."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    fpr, pro = pro_curve(maps, masks, valid)
    end = float(np.interp(fpr_limit, fpr, pro))
    keep = fpr < fpr_limit
    x = np.append(fpr[keep], fpr_limit)
    y = np.append(pro[keep], end)
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) / fpr_limit)
