"""What the shallow detectors compute, beyond the shared contract."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from kad.detectors.base import load_detector
from kad.registry import get_detector


def test_mahalanobis_matches_scikit_learn():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(80, 30)), rng.normal(size=(20, 30)) * 2
    det = get_detector("mahalanobis").fit(train)
    expected = det.gaussian_.mahalanobis(test.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(det.anomaly_score(test), expected, rtol=1e-6)


def test_iforest_is_scikit_learns_with_its_sign_flipped():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(200, 5)), rng.normal(size=(30, 5)) * 3
    det = get_detector("iforest:random_state=3").fit(train)
    reference = IsolationForest(random_state=3).fit(train.astype(np.float32))
    np.testing.assert_array_equal(det.anomaly_score(test),
                                  -reference.score_samples(test.astype(np.float32)))


def test_knn_training_scores_skip_the_point_itself():
    train = np.array([[0.0], [1.0], [3.0], [10.0]])
    det = get_detector("knn:n_neighbors=1").fit(train)
    np.testing.assert_allclose(det.anomaly_scores_, [1.0, 1.0, 2.0, 7.0])
    np.testing.assert_allclose(det.anomaly_score(np.array([[2.0], [0.0]])), [1.0, 0.0])


@pytest.mark.parametrize("gamma", ["scale", "auto", 0.3])
def test_ocsvm_gradient_uses_the_gamma_the_svm_was_fitted_with(gamma):
    """``gamma_`` is the value ``gamma`` resolved to; with a constant feature the
    standardised variance is below 1, so ``"scale"`` and ``"auto"`` differ, and a gradient
    computed with the wrong one misses the finite differences."""
    rng = np.random.default_rng(2)
    train = rng.normal(size=(100, 4))
    train[:, 3] = 5.0
    det = get_detector("ocsvm", gamma=gamma).fit(train)
    expected = {"scale": 1 / (4 * 0.75), "auto": 1 / 4, 0.3: 0.3}[gamma]
    assert det.gamma_ == pytest.approx(expected)
    queries = rng.normal(size=(3, 4)) * 1.5
    eps = 1e-4
    numeric = np.stack([(det._score(queries + eps * e) - det._score(queries - eps * e)) / (2 * eps)
                        for e in np.eye(4)], axis=1)
    np.testing.assert_allclose(det.score_gradient(queries.astype(np.float32)), numeric,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["knn", "knn:method=kth,n_neighbors=3", "ocsvm"])
def test_gradients_survive_saving(name, tmp_path):
    """The gradient reads what kad keeps itself (the training vectors, the resolved gamma),
    which a model file holds."""
    rng = np.random.default_rng(3)
    det = get_detector(name).fit(rng.normal(size=(60, 5)))
    queries = rng.normal(size=(4, 5)).astype(np.float32)
    again = load_detector(det.save(tmp_path / "d.kad"))
    np.testing.assert_array_equal(again.score_gradient(queries), det.score_gradient(queries))
    np.testing.assert_array_equal(again.anomaly_score(queries), det.anomaly_score(queries))
