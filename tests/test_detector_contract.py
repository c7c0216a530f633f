"""The detector contract, checked once for every detector registered under
``kad.detectors``: kad's built-ins and a third-party plugin (the tests' example package,
installed the way pip installs one) alike.

What a single detector computes beyond this contract (that it learns on data whose answer
is known, its own options) is tested in that detector's own file.
"""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from conftest import quick_detector
from kad.detectors.base import BaseDetector, NotFittedError, load_detector
from kad.registry import DETECTORS, clear_cache, discover
from plugin_env import EXAMPLE, activate, install_example


def _example_detectors() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    return list(meta["entry-points"]["kad.detectors"])


BUILTINS = list(discover(DETECTORS))
NAMES = BUILTINS + [n for n in _example_detectors() if n not in BUILTINS]


@pytest.fixture(scope="module", autouse=True)
def _third_party(tmp_path_factory):
    """The example plugin installed for this module's tests."""
    site = tmp_path_factory.mktemp("site-packages")
    install_example(site)
    with pytest.MonkeyPatch.context() as mp:
        activate(site, mp)
        yield
    clear_cache()


def _task(kind: str, seed: int = 0):
    """Training data of normals (plus labelled anomalies for supervised detectors) and a
    test set whose planted outliers are easy to tell apart."""
    rng = np.random.default_rng(seed)
    if kind == "features":
        normal = rng.normal(size=(240, 16)).astype(np.float32)
        outliers = (rng.normal(size=(40, 16)) + 4.0).astype(np.float32)
    else:  # images, or block maps of 3 channels: dim smooth gradients against bright speckle
        side = 32 if kind == "images" else 8  # a map's every location is scored: keep it small
        base = np.linspace(0.1, 0.4, side, dtype=np.float32)[None, None, :, None]
        normal = np.clip(base + rng.normal(0, 0.02, size=(240, side, side, 3)), 0, 1)
        outliers = rng.uniform(0.5, 1.0, size=(40, side, side, 3))
        normal, outliers = normal.astype(np.float32), outliers.astype(np.float32)
    train_x, test_normal = normal[:180], normal[180:]
    train_y = np.zeros(len(train_x), dtype=int)
    train_out, test_out = outliers[:20], outliers[20:]
    test_x = np.concatenate([test_normal, test_out])
    test_y = np.r_[np.zeros(len(test_normal)), np.ones(len(test_out))].astype(int)
    return train_x, train_y, train_out, test_x, test_y


def _fit(det: BaseDetector):
    train_x, train_y, train_out, test_x, test_y = _task(_kind(det))
    if det.supervised:
        train_x = np.concatenate([train_x, train_out])
        train_y = np.r_[train_y, np.ones(len(train_out), dtype=int)]
        assert det.fit(train_x, train_y) is det
    else:
        assert det.fit(train_x) is det
    return test_x, test_y


def _kind(det: BaseDetector) -> str:
    return "features" if det.input_kind in ("features", "both") else det.input_kind


@pytest.fixture(scope="module", params=NAMES)
def fitted(request):
    """``(detector, test inputs, their labels, their scores)``, fitted once per module."""
    det = quick_detector(request.param)
    with pytest.raises(NotFittedError):
        det.anomaly_score(_task(_kind(det))[3])
    test_x, test_y = _fit(det)
    return det, test_x, test_y, det.anomaly_score(test_x)


def test_the_registry_lists_the_builtins_and_the_third_party_detector():
    assert {"iforest", "ocsvm", "knn", "mahalanobis", "patchknn"} <= set(BUILTINS)
    assert "zscore" in NAMES and "zscore" not in BUILTINS


@pytest.mark.parametrize("name", NAMES)
def test_an_unfitted_detector_refuses_to_score(name):
    det = quick_detector(name)
    x = _task(_kind(det))[3]
    for method in (det.anomaly_score, det.predict, det.decision_function, det.score_samples):
        with pytest.raises(NotFittedError):
            method(x)


def test_scores_have_shape_and_are_not_constant(fitted):
    _, test_x, _, scores = fitted
    assert scores.shape == (len(test_x),)
    assert np.isfinite(scores).all()
    assert np.std(scores) > 1e-6, "constant scores: the detector collapsed"


def test_planted_outliers_get_the_highest_scores(fitted):
    _, _, test_y, scores = fitted
    assert roc_auc_score(test_y, scores) >= 0.9


def test_contamination_sets_the_share_of_training_data_flagged(fitted):
    det = fitted[0]
    train = det.anomaly_scores_
    # the (1 - contamination) quantile flags the contamination share, to one sample; constant
    # scores flag none and fail
    share = float(np.mean(train > det.threshold_))
    assert abs(share - det.contamination) <= 1.0 / len(train), share


def test_scikit_learn_methods_are_the_anomaly_score_turned_round(fitted):
    """predict, score_samples and decision_function run scikit-learn's way (-1 and lower
    are more abnormal), for image detectors too, which scikit-learn's own checks cannot
    feed."""
    det, test_x, _, scores = fitted
    np.testing.assert_array_equal(det.predict(test_x), np.where(scores > det.threshold_, -1, 1))
    np.testing.assert_array_equal(det.score_samples(test_x), -scores)
    np.testing.assert_array_equal(det.decision_function(test_x), det.threshold_ - scores)
    np.testing.assert_array_equal(det.threshold_ - scores, -scores - det.offset_)


def test_a_score_does_not_depend_on_the_inputs_scored_with_it(fitted):
    det, test_x, _, scores = fitted
    rows = [0, 7, len(test_x) - 1]  # normals and an outlier, each alone
    alone = np.array([det.anomaly_score(test_x[i:i + 1])[0] for i in rows])
    # float32 networks' kernels differ in the last bits with the batch size
    np.testing.assert_allclose(alone, scores[rows], rtol=1e-5, atol=1e-7)


def test_clone_is_unfitted_with_the_same_parameters(fitted):
    det, test_x, _, _ = fitted
    twin = clone(det)
    assert twin.get_params() == det.get_params()
    with pytest.raises(NotFittedError):
        twin.anomaly_score(test_x)


def test_set_params_is_what_get_params_returns(fitted):
    det = fitted[0]
    params = det.get_params(deep=False)
    again = type(det)().set_params(**params)
    assert again.get_params(deep=False) == params


def test_save_and_load_give_identical_scores_without_a_pickle(fitted, tmp_path, monkeypatch):
    det, test_x, _, scores = fitted
    path = det.save(tmp_path / "detector.kad")
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():  # a pickle starts with its PROTO opcode, 0x80
            assert not member.endswith((".pkl", ".pickle")), member
            assert zf.read(member)[:1] != b"\x80", f"{member} is a pickle"

    def refuse(*args, **kwargs):
        raise AssertionError("loading a detector unpickled data")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    again = load_detector(path)
    assert type(again) is type(det) and again.get_params() == det.get_params()
    assert again.input_shape_ == det.input_shape_ and isinstance(again.input_shape_, tuple)
    assert again.threshold_ == det.threshold_
    np.testing.assert_array_equal(again.anomaly_score(test_x), scores)


def test_wrong_input_shape_is_refused(fitted):
    det, test_x, _, _ = fitted
    with pytest.raises(ValueError, match="features, but .* is expecting"):
        det.anomaly_score(test_x[:, :3] if test_x.ndim == 2 else test_x[:, :4, :4])


def test_the_wrong_kind_of_input_is_refused(fitted):
    det, test_x, _, _ = fitted
    if det.input_kind in ("images", "maps"):
        with pytest.raises(ValueError, match="not feature vectors"):
            det.anomaly_score(test_x.reshape(len(test_x), -1))
    else:  # a 3-D array is neither feature vectors nor images
        with pytest.raises(ValueError, match="leading batch axis"):
            det.anomaly_score(np.zeros((2, 4, 4), np.float32))


@pytest.mark.parametrize("name", NAMES)
def test_bad_contamination_is_refused(name):
    det = quick_detector(name).set_params(contamination=0.7)
    with pytest.raises(ValueError, match="contamination"):
        _fit(det)
