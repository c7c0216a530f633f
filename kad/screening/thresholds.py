"""Where the threshold comes from: every rule kad sets one by, in one place.

A pipeline flags an image when its score is above ``threshold.value``. The value is set by
one of these rules, by ``kad fit`` and ``kad threshold`` alike (:class:`ThresholdRule`):

``conformal``
    A false-positive rate ``alpha`` on calibration normals, images used for nothing
    else (:func:`conformal_threshold`; see :mod:`kad.screening.calibration`): a healthy
    image like them is flagged with probability at most ``alpha``. No labelled anomaly
    needed. The default when there are calibration images and no sensitivity is asked.
``sensitivity``
    The highest value that flags at least a share of labelled anomalies, with the
    specificity it buys on the labelled normals (:func:`threshold_at_sensitivity`). The
    default when there are labelled anomalies and no false-positive rate is asked
    (:data:`DEFAULT_SENSITIVITY`).
``contamination``
    The detector's own, the ``1 - contamination`` quantile of its training scores
    (:func:`contamination_threshold`): what is left without calibration images or labels.
    Its false-positive rate is an in-sample figure, and is never reported as a guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kad.errors import KadError
from kad.screening.calibration import (
    _calibration_scores,
    _check_alpha,
    conformal_rank,
    fpr_text,
    min_calibration_size,
    min_fpr,
)

__all__ = [
    "DEFAULT_FPR",
    "DEFAULT_SENSITIVITY",
    "Threshold",
    "ThresholdRule",
    "conformal_threshold",
    "contamination_threshold",
    "threshold_at_fpr",
    "threshold_at_sensitivity",
]

DEFAULT_FPR = 0.05
DEFAULT_SENSITIVITY = 0.95


@dataclass
class Threshold:
    """The flagging threshold (flag when score > value) and how it was chosen:
    ``"conformal"``, ``"sensitivity"`` or ``"contamination"`` (see the module docstring);
    ``details`` say on what it was measured."""

    value: float
    method: str
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ThresholdRule:
    """What a user asked for: a false-positive rate, a sensitivity, or neither (the
    default for the data at hand, :meth:`resolve`)."""

    fpr: float | None = None
    sensitivity: float | None = None
    #: The rate is :data:`DEFAULT_FPR`, filled in by :meth:`resolve` because nothing was
    #: asked: with too few calibration images for it, :meth:`apply` sets the smallest rate
    #: they can guarantee instead, and says so.
    fpr_by_default: bool = False

    def __post_init__(self) -> None:
        if self.fpr is not None and self.sensitivity is not None:
            raise KadError("give --fpr or --sensitivity, not both: one threshold is set")
        if self.fpr is not None:
            _check_alpha(self.fpr)
        if self.sensitivity is not None and not 0.0 < self.sensitivity <= 1.0:
            raise KadError(f"the sensitivity must be in (0, 1], got {self.sensitivity}; "
                           f"e.g. --sensitivity {DEFAULT_SENSITIVITY}")

    def resolve(self, *, labelled: bool, calibrated: bool = True) -> ThresholdRule:
        """The rule with its defaults filled in: with labelled anomalies and nothing asked,
        :data:`DEFAULT_SENSITIVITY`; else, with calibration images, :data:`DEFAULT_FPR`;
        else the detector's contamination (both left None). Refuses a sensitivity without
        labelled anomalies and a false-positive rate without calibration images."""
        if self.sensitivity is not None and not labelled:
            raise KadError("a sensitivity needs labelled anomalies (images in abnormal/ of a "
                           "folder dataset, or a dataset with grades such as dr); use --fpr "
                           "for a threshold set on normal images alone")
        if self.fpr is not None and not calibrated:
            raise KadError("a threshold by false-positive rate needs calibration images "
                           "(normal images kept aside: --calibration)")
        if self.fpr is not None or self.sensitivity is not None:
            return self
        if labelled:
            return ThresholdRule(sensitivity=DEFAULT_SENSITIVITY)
        return ThresholdRule(fpr=DEFAULT_FPR, fpr_by_default=True) if calibrated else self

    @property
    def asked_fpr(self) -> float | None:
        """The false-positive rate the user asked for (None when it is the default)."""
        return None if self.fpr_by_default else self.fpr

    @property
    def method(self) -> str:
        return ("conformal" if self.fpr is not None
                else "sensitivity" if self.sensitivity is not None else "contamination")

    def apply(self, *, calibration_scores=None, normal_scores=None, anomaly_scores=None,
              detector=None) -> Threshold:
        """The threshold this (resolved) rule gives: from ``calibration_scores``
        (conformal), from labelled ``normal_scores`` and ``anomaly_scores``
        (sensitivity), or from the fitted ``detector`` (contamination)."""
        if self.fpr is not None:
            n = 0 if calibration_scores is None else len(np.ravel(calibration_scores))
            if self.fpr_by_default and 0 < n < min_calibration_size(self.fpr):
                return conformal_threshold(calibration_scores, min_fpr(n),
                                           default_fallback=self.fpr)
            return conformal_threshold(calibration_scores, self.fpr)
        if self.sensitivity is not None:
            return threshold_at_sensitivity(normal_scores, anomaly_scores, self.sensitivity)
        return contamination_threshold(detector)


def too_few_calibration_images(alpha: float, n: int, raise_share: str) -> str:
    """The one line refusing rate ``alpha`` with ``n`` calibration images; the rate it
    suggests instead is rounded up, so that it works typed as shown. ``raise_share`` names
    how to get more calibration images."""
    needs = (f"a false-positive rate of {alpha:g} needs at least "
             f"{min_calibration_size(alpha)} calibration images, but there are {n}")
    if n == 0:
        return f"{needs}; {raise_share} or add normal images"
    return (f"{needs}; {raise_share}, add normal images, or ask for --fpr "
            f"{fpr_text(min_fpr(n), n)} or more")


def conformal_threshold(calibration_scores, alpha: float,
                        default_fallback: float | None = None) -> Threshold:
    """The split-conformal threshold at false-positive rate ``alpha`` (flag when
    score > value), with method ``"conformal"``.

    Its details hold ``alpha``, ``n_calibration``, the ``rank`` used, the guaranteed bound
    ``1 - rank / (n + 1)`` (at most ``alpha``), the 95% upper bound on the false-positive
    rate for this calibration set, and ``guarantee``, a sentence saying what holds.
    ``default_fallback``: the default rate that could not be guaranteed, ``alpha`` being
    the smallest the calibration images can; ``fallback`` then says so in one line.
    """
    from scipy.stats import beta

    alpha = _check_alpha(alpha)
    cal = _calibration_scores(calibration_scores)
    n = len(cal)
    k = conformal_rank(n, alpha)
    if k > n:
        raise KadError(too_few_calibration_images(alpha, n, "raise --calibration"))
    bound = 1.0 - k / (n + 1)
    upper = float(beta.ppf(0.95, n + 1 - k, k))
    asked = (f"the smallest {n} calibration images can guarantee" if default_fallback
             else f"asked {alpha:g}")
    details = {
        "alpha": alpha, "n_calibration": n, "rank": k, "fpr_bound": bound,
        "fpr_upper95_this_calibration": upper,
        "guarantee": (
            f"a healthy image like the {n} calibration normals is flagged with probability "
            f"at most {fpr_text(bound)} ({asked}); for this calibration set the "
            f"false-positive rate is below {fpr_text(upper)} with 95% confidence"
        ),
    }
    if default_fallback:
        details["default_fpr"] = default_fallback
        details["fallback"] = (
            f"the default false-positive rate {default_fallback:g} needs "
            f"{min_calibration_size(default_fallback)} calibration images and there are "
            f"{n}: the threshold guarantees {fpr_text(bound)} instead (add normal images "
            f"or raise --calibration for a lower rate)")
    return Threshold(float(cal[k - 1]), "conformal", details)


def threshold_at_fpr(pipeline, alpha: float) -> Threshold:
    """A new conformal threshold for a fitted pipeline from its stored calibration scores
    (no refitting); assign it to ``pipeline.threshold`` to use it."""
    calibration = getattr(pipeline, "calibration", None)
    if not calibration or not calibration.get("scores"):
        raise KadError("this model has no calibration set; refit it with kad fit "
                       "--calibration 0.2 to set a threshold by --fpr")
    threshold = conformal_threshold(calibration["scores"], alpha)
    if calibration.get("guarantee_withheld"):  # near-copies of training images: see fit
        threshold.details["guarantee"] = calibration["guarantee_withheld"]
        threshold.details["guarantee_withheld"] = calibration["guarantee_withheld"]
    return threshold


def threshold_at_sensitivity(normal_scores, anomaly_scores, sensitivity: float) -> Threshold:
    """The highest threshold that flags at least ``sensitivity`` of the labelled anomalies,
    with the specificity it buys on the labelled normals and Wilson 95% intervals."""
    from scipy.stats import binomtest

    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    normal = np.asarray(normal_scores, dtype=np.float64)
    anomalous = np.sort(np.asarray(anomaly_scores, dtype=np.float64))[::-1]
    if len(anomalous) == 0 or len(normal) == 0:
        raise KadError("setting a threshold at a sensitivity needs labelled normal and "
                       "anomalous images")
    k = int(np.ceil(sensitivity * len(anomalous)))
    value = float(np.nextafter(anomalous[k - 1], -np.inf))  # flag when score > value
    flagged = int((anomalous > value).sum())
    passed = int((normal <= value).sum())
    sens_ci = binomtest(flagged, len(anomalous)).proportion_ci(method="wilson")
    spec_ci = binomtest(passed, len(normal)).proportion_ci(method="wilson")
    return Threshold(value, "sensitivity", {
        "target_sensitivity": sensitivity,
        "sensitivity": flagged / len(anomalous),
        "sensitivity_ci95": [sens_ci.low, sens_ci.high],
        "specificity": passed / len(normal),
        "specificity_ci95": [spec_ci.low, spec_ci.high],
        "n_normal": len(normal), "n_anomalous": len(anomalous),
    })


def contamination_threshold(detector) -> Threshold:
    """The fitted detector's own threshold, the ``1 - contamination`` quantile of its
    training scores: in-sample, so it promises nothing about new images."""
    return Threshold(float(detector.threshold_), "contamination",
                     {"contamination": detector.contamination})
