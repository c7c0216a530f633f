"""Conformal thresholds and p-values, the fit-time split, honest metrics, block picking.

None of these needs TensorFlow: detectors run on synthetic feature vectors whose truth is
known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy.stats import chisquare

from kad.errors import KadError
from kad.screening.calibration import (
    assess,
    conformal_p_values,
    conformal_rank,
    min_calibration_size,
    plan_fit_split,
)
from kad.screening.selection import pick_block
from kad.screening.thresholds import conformal_threshold, threshold_at_fpr
from kad_plugins.shallow import KNNDetector as KNN


def _fitted_detector(rng, dim=8, n_train=200):
    detector = KNN(n_neighbors=5)
    detector.fit(rng.normal(size=(n_train, dim)))
    return detector


# -- the guarantee ------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,n_cal", [(0.1, 39), (0.05, 60), (0.2, 12)])
def test_the_false_positive_rate_on_fresh_normals_is_at_most_alpha(alpha, n_cal):
    """Over many random calibration/test splits of normals scored by a fitted detector, the
    share of fresh normals flagged averages at most alpha (and not far below: the bound is
    tight up to 1/(n+1) when scores have no ties)."""
    rng = np.random.default_rng(7)
    detector = _fitted_detector(rng)
    pool = detector.anomaly_score(rng.normal(size=(3000, 8)))
    rates = []
    for _ in range(800):
        order = rng.permutation(len(pool))
        cal, fresh = pool[order[:n_cal]], pool[order[n_cal:n_cal + 200]]
        threshold = conformal_threshold(cal, alpha)
        rates.append(float((fresh > threshold.value).mean()))
    rates = np.asarray(rates)
    error = 3 * rates.std(ddof=1) / np.sqrt(len(rates))  # Monte Carlo error, 3 sigma
    assert rates.mean() <= alpha + error
    assert rates.mean() >= alpha - 1.0 / (n_cal + 1) - error


def test_p_values_of_normals_are_uniform_and_of_anomalies_small():
    rng = np.random.default_rng(3)
    detector = _fitted_detector(rng)
    n_cal = 19
    normals = detector.anomaly_score(rng.normal(size=(4000, 8)))
    anomalies = detector.anomaly_score(rng.normal(loc=1.5, size=(200, 8)))
    picks = []
    for _ in range(2000):
        order = rng.permutation(len(normals))
        cal, one = normals[order[:n_cal]], normals[order[n_cal]]
        picks.append(conformal_p_values(cal, [one])[0])
    # one fresh normal per split: uniform on {1, ..., n+1} / (n+1)
    counts = np.bincount(np.rint(np.asarray(picks) * (n_cal + 1)).astype(int) - 1,
                         minlength=n_cal + 1)
    assert len(counts) == n_cal + 1 and counts.min() > 0
    assert chisquare(counts).pvalue > 0.001
    cal = normals[:n_cal]
    assert np.median(conformal_p_values(cal, anomalies)) <= 0.1


def test_flagged_at_alpha_exactly_when_the_p_value_is_at_most_alpha():
    rng = np.random.default_rng(0)
    cal = np.round(rng.normal(size=57), 1)  # ties on purpose
    scores = np.r_[np.round(rng.normal(size=500), 1), cal]
    for alpha in (0.02, 0.05, 0.1, 0.25, 0.5):
        threshold = conformal_threshold(cal, alpha)
        np.testing.assert_array_equal(scores > threshold.value,
                                      conformal_p_values(cal, scores) <= alpha)


def test_the_rank_and_the_smallest_calibration_set():
    # ceil((n+1)(1-alpha)) with no floating-point slip: 10 * 0.9 is 9, not 10
    assert conformal_rank(9, 0.1) == 9 and conformal_rank(19, 0.05) == 19
    assert conformal_rank(100, 0.1) == 91
    assert [min_calibration_size(a) for a in (0.1, 0.05, 0.01, 0.3)] == [9, 19, 99, 3]
    for alpha in (0.1, 0.05, 0.01, 0.3, 0.07):
        n = min_calibration_size(alpha)
        assert conformal_rank(n, alpha) <= n < conformal_rank(n - 1, alpha) + 1


def test_too_few_calibration_images_is_one_clear_line():
    with pytest.raises(KadError, match=r"needs at least 19 calibration images, but there are 10"):
        conformal_threshold(np.arange(10.0), 0.05)
    with pytest.raises(KadError, match=r"\(0, 1\)"):
        conformal_threshold(np.arange(10.0), 1.5)


def test_the_threshold_records_its_guarantee():
    details = conformal_threshold(np.arange(99.0), 0.1).details
    assert details["rank"] == 90 and details["n_calibration"] == 99
    assert details["fpr_bound"] == pytest.approx(0.1) and details["fpr_bound"] <= 0.1
    assert 0.1 < details["fpr_upper95_this_calibration"] < 0.2
    assert "at most 0.1" in details["guarantee"]


def test_threshold_at_fpr_needs_a_calibration_set():
    @dataclass
    class Fitted:
        calibration: dict | None

    with pytest.raises(KadError, match="no calibration set"):
        threshold_at_fpr(Fitted(None), 0.1)
    moved = threshold_at_fpr(Fitted({"scores": list(np.arange(20.0))}), 0.1)
    assert moved.method == "conformal" and moved.value == 18.0


# -- the fit-time split -------------------------------------------------------------------
@dataclass
class Toy:
    """The parts of a kad Dataset that splitting reads."""

    anomaly: np.ndarray | None
    patient: np.ndarray | None
    ids: np.ndarray
    name: str = "toy"

    def __len__(self):
        return len(self.ids)


def _toy(n_patients=120, sick=20, seed=0, patients=True):
    """Two eyes per patient; a sick patient has one or two anomalous eyes."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), 2).astype(str)
    anomaly = np.zeros(2 * n_patients, bool)
    for p in range(sick):
        anomaly[2 * p] = True
        anomaly[2 * p + 1] = rng.random() < 0.5
    ids = np.array([f"{p}_{'left' if i % 2 == 0 else 'right'}"
                    for i, p in enumerate(patient)])
    return Toy(anomaly, patient if patients else None, ids)


def test_no_image_is_used_twice_and_patients_stay_together():
    data = _toy()
    valid = np.ones(len(data), bool)
    valid[[5, 77]] = False
    split = plan_fit_split(data, calibration=0.2, selection=0.25, seed=1, valid=valid)
    parts = split.parts()
    every = np.concatenate(list(parts.values()))
    assert len(every) == len(np.unique(every)), "an image is in two parts"
    assert sorted(every.tolist() + list(split.left_out)) == list(range(len(data)))
    assert split.left_out == {5: "unreadable image", 77: "unreadable image"}
    owner = {}
    for name, rows in parts.items():
        for p in set(data.patient[rows]):
            assert owner.setdefault(p, name) == name, f"patient {p} is in two parts"
    assert not data.anomaly[split.train].any() and not data.anomaly[split.calibration].any()
    np.testing.assert_array_equal(split.selection_labels, data.anomaly[split.selection])
    np.testing.assert_array_equal(split.assessment_labels, data.anomaly[split.assessment])
    sick = np.unique(data.patient[data.anomaly])
    held = set(data.patient[split.selection]) | set(data.patient[split.assessment])
    assert set(sick) <= held
    described = split.describe()
    assert described["selection"]["anomalous"] > 0 and described["assessment"]["anomalous"] > 0
    # the shares are shares of the healthy patients
    healthy = 100
    assert len(set(data.patient[split.calibration])) == round(0.2 * healthy)


def test_rows_not_offered_are_left_out_with_the_reason():
    data = _toy()
    outside = np.flatnonzero(np.isin(data.patient, [str(p) for p in range(0, 120, 3)]))
    offered = np.setdiff1d(np.arange(len(data)), outside)
    split = plan_fit_split(data, seed=0, rows=offered)
    every = np.concatenate(list(split.parts().values()))
    assert not np.isin(every, outside).any()
    assert sorted(split.left_out) == outside.tolist()
    assert set(split.left_out.values()) == {"not among the rows offered for fitting"}


def test_the_split_follows_the_seed():
    data = _toy()
    first, again = plan_fit_split(data, seed=3), plan_fit_split(data, seed=3)
    other = plan_fit_split(data, seed=4)
    for name in first.parts():
        np.testing.assert_array_equal(first.parts()[name], again.parts()[name])
    assert not np.array_equal(first.calibration, other.calibration)


def test_too_few_anomalies_are_all_used_to_select_and_the_split_says_so():
    data = _toy(sick=3)
    split = plan_fit_split(data, seed=0)
    assert split.assessment_labels.sum() == 0 and split.selection_labels.sum() == data.anomaly.sum()
    assert (split.assessment_labels == 0).sum() > 0  # specificity can still be measured
    assert any("cannot be measured" in note for note in split.notes)


def test_a_single_validation_patient_goes_to_selection():
    data = _toy(n_patients=17, sick=12)
    split = plan_fit_split(data, calibration=0.2, selection=0.25, seed=0)
    healthy = set(data.patient[12 * 2:])  # the first 12 patients are sick
    assert len(healthy & set(data.patient[split.selection])) == 1
    assert not healthy & set(data.patient[split.assessment])
    assert set(split.selection_labels.tolist()) == {0, 1} and split.assessment_labels.sum() > 0


def test_without_anomalies_only_train_and_calibration():
    data = _toy(sick=0, patients=False)
    split = plan_fit_split(data, calibration=0.25, seed=0)
    assert len(split.selection) == len(split.assessment) == 0
    assert len(split.calibration) == 60 and len(split.train) == 180
    assert any("no patient ids" in note for note in split.notes)


def test_shares_that_leave_nothing_to_train_on_are_refused():
    with pytest.raises(KadError, match="normal images are left to train on"):
        plan_fit_split(_toy(n_patients=1, sick=0, patients=False), calibration=0.5)
    with pytest.raises(KadError, match=r"calibration share must be in \[0, 1\)"):
        plan_fit_split(_toy(), calibration=1.0)


# -- honest numbers -----------------------------------------------------------------------
def test_assess_gives_wilson_intervals_and_says_what_it_cannot_measure():
    labels = np.r_[np.zeros(50, int), np.ones(20, int)]
    scores = np.r_[np.linspace(0, 1, 50), np.linspace(0.95, 2, 20)]
    result = assess(scores, labels, threshold=0.9, measured_on="test images")
    assert result.sensitivity.k == 20 and result.sensitivity.n == 20
    assert result.specificity.k == 45 and result.specificity.value == pytest.approx(0.9)
    assert result.specificity.low < 0.9 < result.specificity.high
    assert result.sensitivity.low < 1.0 == result.sensitivity.high
    assert result.auroc_ci95[0] < result.auroc <= result.auroc_ci95[1]
    assert "test images" in result.lines()[0]
    normals_only = assess(scores[:50], labels[:50], 0.9, "normals")
    assert normals_only.sensitivity is None and normals_only.auroc is None
    assert any("sensitivity on new patients is unknown" in n for n in normals_only.notes)
    few = assess(scores[:55], labels[:55], 0.9, "few")
    assert any("only 5 held-out anomalies" in n for n in few.notes)


# -- block picking ------------------------------------------------------------------------
class Blocks:
    """A feature set whose block ``b2`` alone separates the anomalies."""

    def __init__(self, anomaly, seed=0):
        rng = np.random.default_rng(seed)
        self.blocks = ["b0", "b1", "b2", "b3"]
        self.ids = [str(i) for i in range(len(anomaly))]
        self.data = {b: rng.normal(size=(len(anomaly), 4)) for b in self.blocks}
        self.data["b2"][anomaly] += 3.0
        self.data["b1"][anomaly] += 0.5

    def resolve(self, representation):
        return self.blocks if representation == "concat" else representation.split(",")

    def matrix(self, blocks, rows):
        names = self.resolve(blocks) if isinstance(blocks, str) else blocks
        return np.concatenate([self.data[b][rows] for b in names], axis=1)


def test_pick_block_keeps_the_block_that_separates_the_validation_anomalies():
    anomaly = np.r_[np.zeros(160, bool), np.ones(20, bool)]
    features = Blocks(anomaly)
    train = np.arange(100)
    rows = np.r_[np.arange(100, 160), np.arange(160, 170)]
    choice = pick_block(features, train, rows, anomaly[rows].astype(int), KNN(n_neighbors=5))
    assert choice.block == "b2"
    assert choice.validation_auroc["b2"] == max(choice.validation_auroc.values())
    assert set(choice.detectors) == set(features.blocks)
    with pytest.raises(KadError, match="must not be among the training"):
        pick_block(features, train, np.r_[rows, 0], np.r_[anomaly[rows], 0].astype(int),
                   KNN(n_neighbors=5))


# -- advice that works ------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 8, 10, 18, 33, 98, 150, 997])
def test_the_rate_a_refusal_suggests_works_typed_as_shown(n):
    import re

    with pytest.raises(KadError) as refused:
        conformal_threshold(np.arange(float(n)), 0.5 / (n + 1))
    suggested = re.search(r"--fpr (\S+) or more", str(refused.value)).group(1)
    threshold = conformal_threshold(np.arange(float(n)), float(suggested))  # no refusal
    assert threshold.details["rank"] == n


def test_no_calibration_image_does_not_suggest_a_rate_that_cannot_be_asked():
    from kad.screening.thresholds import too_few_calibration_images

    text = too_few_calibration_images(0.05, 0, "raise --calibration")
    assert "--fpr" not in text and "raise --calibration" in text
    with pytest.raises(KadError) as refused:
        conformal_threshold(np.array([]), 0.05)
    assert "--fpr 1" not in str(refused.value)


def test_the_default_rate_falls_back_to_what_the_calibration_images_can_guarantee():
    from kad.screening.thresholds import DEFAULT_FPR, ThresholdRule

    rule = ThresholdRule().resolve(labelled=False)
    assert rule.fpr == DEFAULT_FPR and rule.asked_fpr is None
    threshold = rule.apply(calibration_scores=np.arange(8.0))
    details = threshold.details
    assert details["alpha"] == pytest.approx(1 / 9) and details["rank"] == 8
    assert threshold.value == 7.0
    assert "at most 0.112" in details["guarantee"]
    assert "needs 19 calibration images and there are 8" in details["fallback"]
    assert "guarantees 0.112 instead" in details["fallback"]
    # enough images: the default itself; a rate asked for is never changed
    assert "fallback" not in rule.apply(calibration_scores=np.arange(19.0)).details
    with pytest.raises(KadError, match="needs at least 19"):
        ThresholdRule(fpr=0.05).resolve(labelled=False).apply(
            calibration_scores=np.arange(8.0))


def test_a_guaranteed_rate_is_never_shown_below_its_value():
    details = conformal_threshold(np.arange(10.0), 1 / 11).details  # bound 0.090909...
    assert "at most 0.0910" in details["guarantee"] or "at most 0.091 " in details["guarantee"]
