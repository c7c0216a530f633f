"""A loaded detector's state is checked before its first use
(BaseDetector.validate_fitted_state): a file built only from allowed types, holding values
no fit produces, is refused in one line instead of crashing the process that scores."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_artifact import _rewrite

from kad.detectors.base import BaseDetector, DamagedStateError, load_detector
from kad.errors import ArtifactError
from kad.registry import get_detector

X = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)


def _array(value) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(value), allow_pickle=False)
    return buffer.getvalue()


def _crafted_forest(tmp_path: Path) -> Path:
    """An Isolation Forest whose first tree sends its root's left child far outside."""
    import skops.io as sio

    det = get_detector("iforest", n_estimators=5).fit(X)
    tree = det.forest_.estimators_[0].tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][0] = 50_000_000
    tree.__setstate__({**state, "nodes": nodes})
    path = get_detector("iforest", n_estimators=5).fit(X).save(tmp_path / "ok.kad")
    return _rewrite(path, tmp_path / "crafted.kad",
                    {"sklearn/detector.state.forest_.skops": sio.dumps(det.forest_)})


def test_a_forest_whose_child_points_outside_is_refused_not_run(tmp_path):
    crafted = _crafted_forest(tmp_path)
    np.save(tmp_path / "x.npy", X)
    script = ("import sys, numpy as np; from kad.detectors.base import load_detector; "
              "from kad.errors import ArtifactError\n"
              "try:\n    d = load_detector(sys.argv[1])\n"
              "except ArtifactError as e:\n    print(e); sys.exit(1)\n"
              "print(d.anomaly_score(np.load(sys.argv[2]))[:3])")
    done = subprocess.run([sys.executable, "-c", script, str(crafted), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr[-500:])
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith(f"{crafted} is damaged")
    assert "forest_ tree 0's node 0 has its left child at 50000000" in line
    assert line.endswith("refit the model")


@pytest.mark.parametrize("name, member, value, message", [
    ("iforest", "threshold", float("nan"), "threshold_ is nan, not a finite number"),
    ("knn", "arrays/detector.state.anomaly_scores_.npy", [1.0, np.inf],
     "anomaly_scores_ holds 1 non-finite values"),
    ("mahalanobis", "arrays/detector.state.reference_.npy", np.zeros(3),
     r"reference_ has shape \(3,\), not \(5\)"),
])
def test_generic_state_is_checked(tmp_path, name, member, value, message):
    det = get_detector(name).fit(X)
    path = det.save(tmp_path / "d.kad")
    if member == "threshold":
        det.threshold_ = value
        crafted = det.save(tmp_path / "crafted.kad")
    else:
        crafted = _rewrite(path, tmp_path / "crafted.kad", {member: _array(value)})
    with pytest.raises(ArtifactError, match=rf"crafted.kad is damaged: the '{name}' "
                                            rf"detector's {message}; refit the model"):
        load_detector(crafted)


def test_a_knn_matrix_of_the_wrong_width_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.neighbors import NearestNeighbors

    det = get_detector("knn").fit(X)
    path = det.save(tmp_path / "d.kad")
    other = NearestNeighbors(n_neighbors=2).fit(np.zeros((60, 3)) + np.arange(60)[:, None])
    crafted = _rewrite(path, tmp_path / "crafted.kad",
                       {"sklearn/detector.state.nn_.skops": sio.dumps(other)})
    with pytest.raises(ArtifactError, match=r"damaged: the 'knn' detector's nn_'s training "
                                            r"matrix has shape \(60, 3\), not \(any, 5\)"):
        load_detector(crafted)


def test_a_knn_tree_that_does_not_match_its_rows_is_refused(tmp_path):
    import skops.io as sio

    det = get_detector("knn").fit(X)
    assert det.nn_._fit_method == "kd_tree"
    state = list(det.nn_._tree.__getstate__())
    state[1] = state[1][::-1].copy()  # the index permutation, reversed
    det.nn_._tree.__setstate__(tuple(state))
    path = get_detector("knn").fit(X).save(tmp_path / "d.kad")
    crafted = _rewrite(path, tmp_path / "crafted.kad",
                       {"sklearn/detector.state.nn_.skops": sio.dumps(det.nn_)})
    with pytest.raises(ArtifactError, match="nn_'s kd_tree index does not match its training"):
        load_detector(crafted)


def test_svm_and_mahalanobis_shapes_are_checked(tmp_path):
    path = get_detector("mahalanobis").fit(X).save(tmp_path / "m.kad")
    import skops.io as sio

    det = get_detector("mahalanobis").fit(X)
    det.gaussian_.precision_ = det.gaussian_.precision_[:4, :4]
    crafted = _rewrite(path, tmp_path / "m2.kad",
                       {"sklearn/detector.state.gaussian_.skops": sio.dumps(det.gaussian_)})
    with pytest.raises(ArtifactError, match=r"gaussian_.precision_ has shape \(4, 4\)"):
        load_detector(crafted)
    svm = get_detector("ocsvm").fit(X)
    path = svm.save(tmp_path / "s.kad")
    svm.svm_.dual_coef_ = svm.svm_._dual_coef_ = svm.svm_._dual_coef_[:, :-1]
    crafted = _rewrite(path, tmp_path / "s2.kad",
                       {"sklearn/detector.state.svm_.skops": sio.dumps(svm.svm_)})
    with pytest.raises(ArtifactError, match=r"svm_.dual_coef_ has shape \(1, \d+\), not"):
        load_detector(crafted)


def test_a_patch_bank_of_the_wrong_width_is_refused(tmp_path):
    maps = np.random.default_rng(0).normal(size=(6, 4, 4, 8)).astype(np.float32)
    det = get_detector("patchknn", bank_size=50, max_dims=4, block_channels=(3, 5)).fit(maps)
    path = det.save(tmp_path / "p.kad")
    assert load_detector(path).threshold_ == det.threshold_
    crafted = _rewrite(path, tmp_path / "crafted.kad",
                       {"arrays/detector.state.bank_.npy": _array(det.bank_[:, :5])})
    with pytest.raises(ArtifactError, match=r"'patchknn' detector's bank_ has shape \(50, 5\), "
                                            r"not \(any, 7\)"):
        load_detector(crafted)


class _Picky(BaseDetector):
    def __init__(self, contamination=0.1):
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - unsupervised
        self.mean_ = X.mean(axis=0)

    def _score(self, X):
        return np.abs(X - self.mean_).sum(axis=1)

    def validate_fitted_state(self):
        super().validate_fitted_state()
        raise DamagedStateError("mean_ is not what it should be")


def test_the_hook_is_the_contract_of_every_detector():
    det = _Picky().fit(X)
    with pytest.raises(DamagedStateError, match="mean_ is not"):
        det.validate_fitted_state()
    fitted = get_detector("iforest", n_estimators=5).fit(X)
    fitted.validate_fitted_state()  # a fitted detector passes
    fitted.input_shape_ = (6,)
    with pytest.raises(DamagedStateError, match=r"input_shape_ is \(6,\), which does not hold "
                                                "the 5 features"):
        fitted.validate_fitted_state()
