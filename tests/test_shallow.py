"""What the shallow detectors compute, beyond the shared contract."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import IsolationForest

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


def test_an_image_scores_the_same_alone_as_beside_others():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(200, 40)), rng.normal(size=(150, 40))
    for name in ("mahalanobis", "knn", "ocsvm", "iforest"):
        det = get_detector(name).fit(train)
        together = det.anomaly_score(test)
        alone = np.array([det.anomaly_score(test[i:i + 1])[0] for i in range(len(test))])
        np.testing.assert_array_equal(alone, together, err_msg=name)
