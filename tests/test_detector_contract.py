"""The detector contract, checked for every detector registered under ``kad.detectors``:
kad's built-ins and any installed third-party plugin alike."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from kad.detectors.base import BaseDetector, NotFittedError, load_detector
from kad.errors import PluginError
from kad.registry import DETECTORS, discover, load
from kad.utils.deps import has_keras

NAMES = list(discover(DETECTORS))


def _detector(name) -> BaseDetector:
    try:
        cls = load(DETECTORS, name)
    except PluginError as exc:
        if isinstance(exc.__cause__, ImportError) and not has_keras():
            pytest.skip(f"{name} needs TensorFlow/Keras, which is not installed")
        raise
    return cls(**cls.quick_params)


def _task(kind: str, seed: int = 0):
    """Training data of normals (plus labelled anomalies for supervised detectors) and a
    test set whose planted outliers are easy to tell apart."""
    rng = np.random.default_rng(seed)
    if kind == "features":
        normal = rng.normal(size=(240, 16)).astype(np.float32)
        outliers = (rng.normal(size=(40, 16)) + 4.0).astype(np.float32)
    else:  # images: dim smooth gradients against bright speckle
        base = np.linspace(0.1, 0.4, 32, dtype=np.float32)[None, None, :, None]
        normal = np.clip(base + rng.normal(0, 0.02, size=(240, 32, 32, 3)), 0, 1)
        outliers = rng.uniform(0.5, 1.0, size=(40, 32, 32, 3))
        normal, outliers = normal.astype(np.float32), outliers.astype(np.float32)
    train_x, test_normal = normal[:180], normal[180:]
    train_y = np.zeros(len(train_x), dtype=int)
    train_out, test_out = outliers[:20], outliers[20:]
    test_x = np.concatenate([test_normal, test_out])
    test_y = np.r_[np.zeros(len(test_normal)), np.ones(len(test_out))].astype(int)
    return train_x, train_y, train_out, test_x, test_y


def _fit(det: BaseDetector, kind: str):
    train_x, train_y, train_out, test_x, test_y = _task(kind)
    if det.supervised:
        train_x = np.concatenate([train_x, train_out])
        train_y = np.r_[train_y, np.ones(len(train_out), dtype=int)]
        assert det.fit(train_x, train_y) is det
    else:
        assert det.fit(train_x) is det
    return test_x, test_y


def _kind(det: BaseDetector) -> str:
    # detectors of block maps take (n, h, w, c) arrays: the images serve as 3-channel maps
    return "images" if det.input_kind in ("images", "maps") else "features"


@pytest.fixture(scope="module", params=NAMES)
def fitted(request):
    det = _detector(request.param)
    test_x, test_y = _fit(det, _kind(det))
    return det, test_x, test_y


def test_every_builtin_is_registered():
    assert {"iforest", "ocsvm", "knn", "mahalanobis"} <= set(NAMES)


def test_scores_have_shape_and_are_not_constant(fitted):
    det, test_x, _ = fitted
    scores = det.anomaly_score(test_x)
    assert scores.shape == (len(test_x),)
    assert np.isfinite(scores).all()
    assert np.std(scores) > 1e-6, "constant scores: the detector collapsed"


def test_planted_outliers_get_the_highest_scores(fitted):
    det, test_x, test_y = fitted
    assert roc_auc_score(test_y, det.anomaly_score(test_x)) >= 0.9


def test_predictions_follow_the_threshold(fitted):
    det, test_x, _ = fitted
    scores = det.anomaly_score(test_x)
    # scikit-learn's outlier labels: -1 for anomalies (scored above threshold_), +1 otherwise
    np.testing.assert_array_equal(det.predict(test_x), np.where(scores > det.threshold_, -1, 1))


def test_contamination_sets_the_share_of_training_data_flagged(fitted):
    det, _, _ = fitted
    train = det.anomaly_scores_
    share = float(np.mean(train > det.threshold_))
    # the (1 - contamination) quantile flags the contamination share, to one sample; constant
    # scores flag none and fail
    assert abs(share - det.contamination) <= 1.0 / len(train), share


def test_scikit_learn_methods_are_the_anomaly_score_turned_round(fitted):
    """score_samples and decision_function run scikit-learn's way (lower is more abnormal),
    for image detectors too, which scikit-learn's own checks cannot feed."""
    det, test_x, _ = fitted
    scores = det.anomaly_score(test_x)
    np.testing.assert_array_equal(det.score_samples(test_x), -scores)
    np.testing.assert_array_equal(det.decision_function(test_x), det.threshold_ - scores)
    np.testing.assert_array_equal(det.decision_function(test_x),
                                  det.score_samples(test_x) - det.offset_)
    np.testing.assert_array_equal(det.predict(test_x) == -1, det.decision_function(test_x) < 0)


def test_clone_is_unfitted_with_the_same_parameters(fitted):
    det, test_x, _ = fitted
    twin = clone(det)
    assert twin.get_params() == det.get_params()
    with pytest.raises(NotFittedError):
        twin.anomaly_score(test_x)


def test_save_and_load_give_identical_scores(fitted, tmp_path):
    det, test_x, _ = fitted
    path = det.save(tmp_path / "detector.kad")
    again = load_detector(path)
    np.testing.assert_array_equal(again.anomaly_score(test_x), det.anomaly_score(test_x))
    assert again.threshold_ == det.threshold_


def test_wrong_input_shape_is_refused(fitted):
    det, test_x, _ = fitted
    with pytest.raises(ValueError, match="features, but .* is expecting"):
        det.anomaly_score(test_x[:, :3] if test_x.ndim == 2 else test_x[:, :8, :8])


@pytest.mark.parametrize("name", NAMES)
def test_bad_contamination_is_refused(name):
    det = _detector(name).set_params(contamination=0.7)
    with pytest.raises(ValueError, match="contamination"):
        _fit(det, _kind(det))
