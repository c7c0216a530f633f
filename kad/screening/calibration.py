"""Operating points that hold on new patients.

Split-conformal calibration (Vovk et al. 2005; Lei et al. 2018): a share of the normal
images is kept aside, never used to fit the detector or pick a block. Their scores set a
threshold with a guarantee that needs no labelled anomaly: for a new image exchangeable with
the normal images (a healthy eye from the same population), the probability that it is
flagged is at most ``alpha``. With ``n`` calibration scores, the threshold is the
``k = ceil((n + 1)(1 - alpha))``-th smallest of them, which needs ``n >= 1/alpha - 1``.
The conformal p-value of an image, ``(1 + #{calibration scores >= s}) / (n + 1)``, is
uniform for such an image, and an image is flagged at level ``alpha`` exactly when its
p-value is at most ``alpha``.

The guarantee is on average over the draw of the calibration set. For the one set drawn,
the false-positive rate is itself random: it follows ``Beta(n + 1 - k, k)`` (no ties), and
:func:`kad.screening.thresholds.conformal_threshold` records its 95% upper bound too.

:func:`plan_fit_split` divides a dataset's patients into disjoint parts: training normals,
calibration normals, and (with labelled anomalies) a *selection* part that picks the block
and sets a sensitivity threshold, and an *assessment* part used for nothing but the
sensitivity and specificity that are reported. :func:`assess` measures those, with Wilson
95% intervals, and says so plainly when the labelled anomalies are too few.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kad.errors import KadError

DEFAULT_CALIBRATION = 0.2
DEFAULT_SELECTION = 0.25
# Fewer labelled anomalies than this and none are held out for assessment: each half would
# be too small to pick a block with, or to say anything about sensitivity.
MIN_ANOMALIES_TO_ASSESS = 10
_EPS = 1e-9


# -- conformal calibration --------------------------------------------------------------
def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise KadError(f"the false-positive rate must be in (0, 1), got {alpha}; e.g. --fpr 0.05")
    return alpha


def conformal_rank(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))``: the rank (1-based, smallest first) of the calibration
    score used as threshold. Larger than ``n`` when ``n`` is too small for ``alpha``."""
    alpha = _check_alpha(alpha)
    return int(math.ceil((n + 1) * (1.0 - alpha) - _EPS))


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration images for which level ``alpha`` can be guaranteed."""
    alpha = _check_alpha(alpha)
    return max(1, int(math.ceil(1.0 / alpha - 1.0 - _EPS)))


def min_fpr(n: int) -> float:
    """The smallest false-positive rate ``n`` calibration images can guarantee:
    ``1 / (n + 1)`` (the threshold is then the largest calibration score)."""
    return 1.0 / (int(n) + 1)


def fpr_text(alpha: float, n: int | None = None) -> str:
    """``alpha`` written with at most 3 significant digits, rounded *up*, so that the value
    typed as shown is never below ``alpha``: a minimum rate a message suggests is one that
    works. With ``n``, the value shown is checked to be guaranteeable with ``n`` images."""
    alpha = float(alpha)
    digits = 3 - int(math.floor(math.log10(alpha))) - 1
    while True:
        scale = 10.0 ** digits
        text = f"{math.ceil(alpha * scale - _EPS) / scale:.{max(digits, 0)}f}".rstrip("0")
        text = text.rstrip(".")
        value = float(text)
        if value >= alpha and (n is None or conformal_rank(n, value) <= n):
            return text
        alpha = value + 1.0 / scale  # rounding error: one step up


def _calibration_scores(scores) -> np.ndarray:
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if not np.isfinite(values).all():
        raise KadError("calibration scores must be finite; unreadable images must be left out")
    return values


def conformal_p_values(calibration_scores, scores) -> np.ndarray:
    """``(1 + #{calibration scores >= s}) / (n + 1)`` for every score ``s`` (NaN stays NaN).
    Small means unlike the calibration normals; flagged at level alpha iff <= alpha."""
    cal = _calibration_scores(calibration_scores)
    if len(cal) == 0:
        raise KadError("conformal p-values need at least one calibration score")
    scores = np.asarray(scores, dtype=np.float64)
    at_least = len(cal) - np.searchsorted(cal, scores, side="left")
    values = (1.0 + at_least) / (len(cal) + 1.0)
    return np.where(np.isnan(scores), np.nan, values)


# -- near-copies: calibration images that are not new patients ---------------------------
#: A calibration image whose nearest training image is closer than this fraction of the
#: median distance between two training images is taken for a near-copy of it (another
#: photograph of the same eye, a duplicate). A tenth: distinct eyes were never that close
#: in the feature spaces tried, several photographs of one eye mostly were.
NEAR_COPY_RATIO = 0.1
#: Above this share of near-copies among the calibration images, the conformal guarantee
#: is withheld: the calibration images are not like new patients.
NEAR_COPY_SHARE = 0.1


@dataclass
class NearCopies:
    """How many calibration images have a near-copy among the training images."""

    n: int
    n_calibration: int
    ratio: float
    median_training_distance: float

    @property
    def share(self) -> float:
        return self.n / self.n_calibration if self.n_calibration else 0.0

    @property
    def withholds(self) -> bool:
        return self.share > NEAR_COPY_SHARE

    def reason(self, by_patient: bool) -> str:
        fix = ("check that patients.csv gives every photograph of a patient the same id"
               if by_patient else "add patients.csv (image,patient) or --patient-pattern "
               "REGEX so that each patient's photographs stay together, and refit")
        return (f"withheld: {self.n} of {self.n_calibration} calibration images "
                f"({self.share:.0%}) have a near-copy among the training images (closer "
                f"than {self.ratio:g} of the median distance between training images), so "
                "they are not like new patients and the false-positive rate on new patients "
                f"may be far higher than asked; {fix}")

    def as_dict(self) -> dict:
        return {"n": self.n, "n_calibration": self.n_calibration, "share": self.share,
                "ratio": self.ratio, "max_share": NEAR_COPY_SHARE,
                "median_training_distance": self.median_training_distance}


def near_copies(train, calibration, ratio: float = NEAR_COPY_RATIO, seed: int = 0,
                sample: int = 500) -> NearCopies:
    """Count the calibration images (rows of ``calibration``, the detector's inputs) whose
    nearest training image is closer than ``ratio`` times the median Euclidean distance
    between two training images (measured on at most ``sample`` of them)."""
    from sklearn.metrics import pairwise_distances
    from sklearn.neighbors import NearestNeighbors

    train = np.asarray(train, dtype=np.float32).reshape(len(train), -1)
    cal = np.asarray(calibration, dtype=np.float32).reshape(len(calibration), -1)
    rng = np.random.default_rng(seed)
    picked = train if len(train) <= sample else train[rng.choice(len(train), sample, False)]
    pairs = pairwise_distances(picked)
    median = float(np.median(pairs[np.triu_indices(len(picked), 1)])) if len(picked) > 1 \
        else 0.0
    nearest = NearestNeighbors(n_neighbors=1).fit(train).kneighbors(cal)[0][:, 0]
    return NearCopies(int((nearest < ratio * median).sum()), len(cal), ratio, median)


# -- splitting a dataset for fitting -----------------------------------------------------
@dataclass
class FitSplit:
    """Disjoint row sets of a dataset for ``kad fit``; patients never straddle two sets.

    ``train`` fits the detector; ``calibration`` (normals only) sets the conformal threshold
    and the p-values; ``selection`` (labelled normals and anomalies) picks the block and sets
    a sensitivity threshold; ``assessment`` (labelled) measures the reported sensitivity and
    specificity and nothing else. ``left_out`` names every row used nowhere, with the reason.
    """

    train: np.ndarray
    calibration: np.ndarray
    selection: np.ndarray
    selection_labels: np.ndarray
    assessment: np.ndarray
    assessment_labels: np.ndarray
    left_out: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    by_patient: bool = False
    #: Rows left out of each part, by part, because their image could not be read
    #: (:func:`kad.screening.fitting.split_rows`).
    unreadable: dict[str, int] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return len(self.selection) > 0

    def parts(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "calibration": self.calibration,
                "selection": self.selection, "assessment": self.assessment}

    def counts(self) -> dict[str, int]:
        return {name: int(len(rows)) for name, rows in self.parts().items()}

    def describe(self) -> dict:
        """Counts per part (JSON-able), as stored in the model and printed by ``kad fit``."""
        def labelled(labels):
            return {"normal": int((labels == 0).sum()), "anomalous": int((labels == 1).sum())}

        return {
            "train": int(len(self.train)), "calibration": int(len(self.calibration)),
            "selection": labelled(self.selection_labels),
            "assessment": labelled(self.assessment_labels),
            "left_out": len(self.left_out), "by_patient": self.by_patient,
            "notes": list(self.notes),
        }


def _share(items: np.ndarray, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``items`` and cut off ``round(fraction * len)`` of them (at least one when
    the fraction is positive and there are two or more)."""
    items = rng.permutation(items)
    k = int(round(fraction * len(items)))
    if fraction > 0 and len(items) >= 2:
        k = min(max(k, 1), len(items) - 1)
    return items[:k], items[k:]


def plan_fit_split(dataset, calibration: float = DEFAULT_CALIBRATION,
                   selection: float = DEFAULT_SELECTION, seed: int = 0,
                   valid: np.ndarray | None = None,
                   min_anomalies: int = MIN_ANOMALIES_TO_ASSESS,
                   rows: np.ndarray | None = None) -> FitSplit:
    """Divide ``dataset`` into the disjoint parts of :class:`FitSplit`, by patient.

    Patients (``dataset.patient``, else each image on its own) with a labelled anomaly go
    wholly to the labelled parts. Of the patients with normal images only, a ``calibration``
    share goes to calibration and, when there are labelled anomalies, a ``selection`` share
    to the labelled parts; the rest train. The labelled patients are then halved, anomalous
    and normal ones separately, into selection and assessment, unless there are fewer than
    ``min_anomalies`` anomalies: then every anomaly goes to selection, the assessment keeps
    its normals only, and a note says that sensitivity cannot be measured honestly.
    ``valid`` (a mask) leaves out unreadable images, and ``rows`` (indices) restricts the
    split to some images, e.g. to keep other patients for a later test; both are listed in
    ``left_out`` with the reason.
    """
    share = selection  # the share of normal patients; ``selection`` below is their rows
    for name, value in (("calibration", calibration), ("selection", share)):
        if not 0.0 <= value < 1.0:
            raise KadError(f"the {name} share must be in [0, 1), got {value}")
    n = len(dataset)
    usable = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    anomaly = (np.zeros(n, bool) if dataset.anomaly is None
               else np.asarray(dataset.anomaly, bool))
    by_patient = dataset.patient is not None
    groups = np.asarray(dataset.patient if by_patient else dataset.ids, dtype=str)
    offered = np.ones(n, bool)
    if rows is not None:
        offered = np.zeros(n, bool)
        offered[np.asarray(rows, dtype=int)] = True
    left_out = {int(i): "not among the rows offered for fitting"
                for i in np.flatnonzero(~offered)}
    left_out.update({int(i): "unreadable image" for i in np.flatnonzero(~usable)})
    rows = np.flatnonzero(usable & offered)
    rng = np.random.default_rng(seed)

    sick = np.unique(groups[rows[anomaly[rows]]])
    healthy = np.setdiff1d(np.unique(groups[rows]), sick)
    has_anomalies = len(sick) > 0
    cal_groups, rest = _share(healthy, calibration, rng)
    if has_anomalies:
        val_groups, train_groups = _share(rest, share / max(1.0 - calibration, 1e-9), rng)
    else:
        val_groups, train_groups = np.array([], dtype=str), rest
    notes: list[str] = []
    n_anomalies = int(anomaly[rows].sum())
    # assessment takes its half first, so that a single patient goes to selection, which
    # cannot do without one
    ass_sick, sel_sick = _share(sick, 0.5, rng)
    if has_anomalies and n_anomalies < min_anomalies:
        sel_sick, ass_sick = sick, np.array([], dtype=str)
        notes.append(
            f"only {n_anomalies} labelled anomalies: all of them pick the block and set the "
            f"threshold, so sensitivity on new patients cannot be measured (at least "
            f"{min_anomalies} are needed to hold half of them out)")
    ass_healthy, sel_healthy = _share(val_groups, 0.5, rng)

    def rows_of(members) -> np.ndarray:
        return np.sort(rows[np.isin(groups[rows], members)])

    train, cal = rows_of(train_groups), rows_of(cal_groups)
    selection = rows_of(np.r_[sel_sick, sel_healthy])
    assessment = rows_of(np.r_[ass_sick, ass_healthy])
    if len(train) < 2:
        raise KadError(f"{dataset.name}: only {len(train)} normal images are left to train on "
                       f"after calibration {calibration:g} and selection {share:g}; "
                       "lower the shares or add normal images")
    if not by_patient:
        notes.append("no patient ids: images are split one by one (add patients.csv so that "
                     "the two eyes of a patient stay together)")
    return FitSplit(train, cal, selection, anomaly[selection].astype(int), assessment,
                    anomaly[assessment].astype(int), left_out, notes, by_patient)


# -- honest numbers ----------------------------------------------------------------------
@dataclass
class Proportion:
    """A proportion ``k / n`` with its Wilson 95% interval."""

    value: float
    low: float
    high: float
    k: int
    n: int

    @classmethod
    def of(cls, k: int, n: int) -> Proportion | None:
        if n == 0:
            return None
        from kad.utils.metrics import wilson_interval

        low, high = wilson_interval(k, n)
        return cls(k / n, low, high, int(k), int(n))

    def text(self) -> str:
        return (f"{self.value:.1%} (95% CI {self.low:.1%}–{self.high:.1%}, "
                f"{self.k}/{self.n})")


@dataclass
class Assessment:
    """Sensitivity, specificity and AUROC at a threshold, and what they were measured on.

    ``honest`` is true when none of the images was used to fit, calibrate, pick the block
    or set the threshold. A ``None`` metric could not be measured; ``notes`` say why.
    """

    measured_on: str
    honest: bool
    threshold: float
    sensitivity: Proportion | None
    specificity: Proportion | None
    auroc: float | None
    auroc_ci95: tuple[float, float] | None
    n_normal: int
    n_anomalous: int
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Plain sentences for a terminal or a report."""
        out = [f"measured on {self.measured_on}"]
        if self.sensitivity:
            out.append(f"sensitivity {self.sensitivity.text()}")
        if self.specificity:
            out.append(f"specificity {self.specificity.text()}")
        if self.auroc is not None:
            low, high = self.auroc_ci95
            out.append(f"AUROC {self.auroc:.3f} (95% CI {low:.3f}–{high:.3f})")
        return out + list(self.notes)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def auroc_interval(auroc: float, n_anomalous: int, n_normal: int) -> tuple[float, float]:
    """Hanley & McNeil (1982) 95% interval of an AUROC from its sample sizes."""
    a = min(max(auroc, 1e-12), 1 - 1e-12)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_anomalous - 1) * (q1 - a * a)
           + (n_normal - 1) * (q2 - a * a)) / (n_anomalous * n_normal)
    half = 1.959964 * math.sqrt(max(var, 0.0))
    return max(0.0, auroc - half), min(1.0, auroc + half)


def assess(scores, labels, threshold: float, measured_on: str, honest: bool = True,
           min_anomalies: int = MIN_ANOMALIES_TO_ASSESS) -> Assessment:
    """Sensitivity and specificity (Wilson 95% intervals) of ``score > threshold`` and the
    AUROC (Hanley-McNeil interval) on labelled images; says what cannot be measured."""
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    flagged = scores > threshold
    n_anom, n_norm = int((labels == 1).sum()), int((labels == 0).sum())
    notes = []
    if not honest:
        notes.append("these images also picked the block or set the threshold: the figures "
                     "are optimistic")
    if n_anom == 0:
        notes.append("no held-out labelled anomaly: sensitivity on new patients is unknown")
    elif n_anom < min_anomalies:
        notes.append(f"only {n_anom} held-out anomalies: the sensitivity interval is wide")
    if n_norm == 0:
        notes.append("no held-out labelled normal image: specificity is unknown")
    auroc = ci = None
    if n_anom and n_norm:
        auroc = float(roc_auc_score(labels, scores))
        ci = auroc_interval(auroc, n_anom, n_norm)
    return Assessment(
        measured_on=measured_on, honest=honest, threshold=float(threshold),
        sensitivity=Proportion.of(int(flagged[labels == 1].sum()), n_anom),
        specificity=Proportion.of(int((~flagged[labels == 0]).sum()), n_norm),
        auroc=auroc, auroc_ci95=ci, n_normal=n_norm, n_anomalous=n_anom, notes=notes,
    )


@dataclass
class FitSummary:
    """What ``kad fit`` and ``kad threshold`` print: the threshold and how it was set, its
    guarantee, and the held-out sensitivity and specificity, each saying what it was
    measured on."""

    threshold: float
    method: str
    n_train: int
    n_calibration: int
    guarantee: str | None
    at_fitting: str | None   # in-sample figures of a sensitivity threshold (optimistic)
    held_out: Assessment | None
    notes: list[str] = field(default_factory=list)
    #: Where the report's heatmaps take full colour (:mod:`kad.screening.heatmap_scale`).
    heatmap_scale: str | None = None

    def lines(self) -> list[str]:
        out = [f"threshold {self.threshold:.4g} ({self.method}); trained on {self.n_train} "
               f"normal images, {self.n_calibration} more kept aside for calibration"]
        if self.guarantee:
            out.append(f"guarantee: {self.guarantee}")
        if self.at_fitting:
            out.append(self.at_fitting)
        if self.held_out:
            out += self.held_out.lines()
        else:
            out.append("no labelled images were held out: sensitivity and specificity on new "
                       "patients were not measured")
        out += [n for n in self.notes if not self.held_out or n not in self.held_out.notes]
        return out + ([f"heatmap scale: {self.heatmap_scale}"] if self.heatmap_scale else [])


def fit_summary(pipeline) -> FitSummary:
    """The :class:`FitSummary` of a fitted (or re-thresholded) pipeline."""
    threshold = pipeline.threshold
    details = threshold.details
    calibration = getattr(pipeline, "calibration", None) or {}
    at_fitting = None
    if threshold.method == "sensitivity":
        lo, hi = details["specificity_ci95"]
        moved = details.get("labels")  # set later by kad threshold on this labels CSV
        at_fitting = (
            f"{'on ' + moved if moved else 'at fitting'}: sensitivity "
            f"{details['sensitivity']:.1%} on "
            f"{details['n_anomalous']} labelled anomalies, specificity "
            f"{details['specificity']:.1%} (95% CI {lo:.1%}–{hi:.1%}) on "
            f"{details['n_normal']} labelled normals; these images set the threshold, so "
            "the figures are optimistic")
        if calibration.get("scores"):  # normals that set nothing here: an honest rate
            cal = np.asarray(calibration["scores"], dtype=np.float64)
            rate = Proportion.of(int((cal > threshold.value).sum()), len(cal))
            at_fitting += (f"; it flags {rate.k} of the {rate.n} calibration normals, which "
                           f"set nothing: a false-positive rate of {rate.text()}")
    notes = list(pipeline.training.get("split", {}).get("notes", []))
    if details.get("fallback"):
        notes.insert(0, details["fallback"])
    if not calibration:
        notes.append("no calibration set: no p-values and no guaranteed false-positive rate")
    return FitSummary(
        threshold=float(threshold.value), method=threshold.method,
        n_train=int(pipeline.training["n_images"]), n_calibration=int(calibration.get("n", 0)),
        guarantee=details.get("guarantee"), at_fitting=at_fitting,
        held_out=pipeline.assessed(), notes=notes,
        heatmap_scale=_heatmap_scale(pipeline) if calibration else None,
    )


def _heatmap_scale(pipeline) -> str:
    """How report heatmaps are scaled: on the calibration normals of the model that draws
    them (its lesion maps model where it has one)."""
    from kad.screening.heatmap_scale import HeatAnchor, anchor

    drawer = pipeline.drawer()
    found = anchor(drawer, None)
    whose = "" if drawer is pipeline else " of the lesion maps model"
    if isinstance(found, HeatAnchor):
        return (f"report heatmaps (by {found.method}{whose}) take full colour at "
                f"{found.value:.3g}, anchored on {found.describe()}")
    return f"report heatmaps scale on their own maps: {found.reason}"
