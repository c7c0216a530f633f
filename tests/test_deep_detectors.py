"""The deep baselines learn: after a short training each one beats both chance and the same
network untrained (``epochs=0``) on an easy image task whose answer is known.

Tasks (all small, to run on two CPU cores):

* *bars*: a bright horizontal bar at a random row is normal; the same images transposed
  (vertical bars) are anomalies. Both classes have the same pixel statistics, so an
  untrained network has nothing to go on; a trained one has learned the orientation.
* *bands*: the same with smooth horizontal Gaussian bands (smooth images suit the
  gradient-based latent search of AnoGAN and the score matching of DSEBM).
* *digits*: scikit-learn's 8x8 digits upscaled (supervised: 0 = normal, 1 = abnormal).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

pytestmark = pytest.mark.tf


# -- tasks ---------------------------------------------------------------------------
def _gray(x):
    return np.repeat(x[..., None], 3, axis=3).astype(np.float32)


def bars(n, size, rng):
    x = np.clip(rng.normal(0.1, 0.05, size=(n, size, size)), 0, 1)
    for image in x:
        row = rng.integers(1, size - 2)
        start, stop = rng.integers(0, size // 3), rng.integers(2 * size // 3, size + 1)
        image[row:row + 2, start:stop] = rng.uniform(0.6, 1.0)
    return _gray(x)


def bands(n, size, rng, width=1.5):
    rows = np.arange(size)[None, :, None]
    centre = rng.uniform(1.5, size - 2.5, size=(n, 1, 1))
    amplitude = rng.uniform(0.6, 0.9, size=(n, 1, 1))
    x = 0.1 + amplitude * np.exp(-0.5 * ((rows - centre) / width) ** 2) * np.ones((1, 1, size))
    return _gray(np.clip(x + rng.normal(0, 0.03, size=x.shape), 0, 1))


def orientation_task(make, size=16, n_train=300, n_test=100, seed=0):
    """Horizontal patterns are normal, vertical ones (transposed) anomalous."""
    rng = np.random.default_rng(seed)
    train = make(n_train, size, rng)
    test = np.concatenate([make(n_test, size, rng),
                           make(n_test, size, rng).transpose(0, 2, 1, 3)])
    return train, test, np.r_[np.zeros(n_test), np.ones(n_test)]


def trained_vs_untrained(cls, params, task, untrained=None):
    """AUROC after training with ``params`` and with the same network untrained."""
    train, test, labels = task
    aurocs = []
    for extra in (untrained or {"epochs": 0}, {}):
        det = cls(**{**params, **extra}).fit(train)
        aurocs.append(roc_auc_score(labels, det.anomaly_score(test)))
    return tuple(aurocs)


def assert_learns(untrained, trained, floor=0.9, margin=0.05):
    assert trained >= floor, f"trained AUROC {trained:.3f} < {floor}"
    assert trained >= untrained + margin, (
        f"training did not help: trained {trained:.3f} vs untrained {untrained:.3f}")


# -- Deep SVDD -----------------------------------------------------------------------
def test_deep_svdd_learns():
    from kad_plugins.deep_svdd import DeepSVDDDetector

    params = {"image_size": 16, "epochs": 8, "pretrain_epochs": 8, "learning_rate": 1e-3,
              "batch_size": 32}
    untrained, trained = trained_vs_untrained(
        DeepSVDDDetector, params, orientation_task(bars),
        untrained={"epochs": 0, "pretrain_epochs": 0},
    )
    assert_learns(untrained, trained)


def test_deep_svdd_same_seed_same_scores():
    from kad_plugins.deep_svdd import DeepSVDDDetector

    train, test, _ = orientation_task(bars, n_train=64, n_test=16)
    params = {**DeepSVDDDetector.quick_params, "epochs": 1, "pretrain_epochs": 1,
              "validation_fraction": 0.0, "random_state": 3}
    first = DeepSVDDDetector(**params).fit(train).anomaly_score(test)
    second = DeepSVDDDetector(**params).fit(train).anomaly_score(test)
    np.testing.assert_array_equal(first, second)
    other = DeepSVDDDetector(**{**params, "random_state": 4}).fit(train).anomaly_score(test)
    assert not np.array_equal(first, other)


def test_deep_svdd_centre_fix_and_collapse_check():
    from kad.detectors.deep import CollapseWarning, check_collapse
    from kad_plugins.deep_svdd import fix_center

    np.testing.assert_allclose(fix_center(np.array([0.05, -0.05, 0.0, 0.5, -2.0]), 0.1),
                               [0.1, -0.1, 0.1, 0.5, -2.0])
    with pytest.warns(CollapseWarning, match="collapsed"):
        assert check_collapse(np.full(50, 3.2), scale=3.2, what="Deep SVDD")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_collapse(np.linspace(0, 1, 50), scale=3.2, what="Deep SVDD")


def test_deep_svdd_detects_a_collapsed_network():
    from kad.detectors.deep import CollapseWarning
    from kad_plugins.deep_svdd import DeepSVDDDetector

    rng = np.random.default_rng(0)
    train = rng.normal(size=(64, 8)).astype(np.float32)
    det = DeepSVDDDetector(**DeepSVDDDetector.quick_params).fit(train)
    assert det.collapsed_ is False
    # The trivial solution: all weights zero maps every input to the same point (0), so
    # every score is ||c||^2. Without biases, training cannot reach it (c is eps-fixed).
    det.encoder_.set_weights([np.zeros_like(w) for w in det.encoder_.get_weights()])
    with pytest.warns(CollapseWarning):
        assert det.check_collapse(det.anomaly_score(train))
    # ... and fit itself reports a collapse it trains into.
    collapsing = DeepSVDDDetector(**DeepSVDDDetector.quick_params)
    collapsing._score = lambda X: np.ones(len(X))
    with pytest.warns(CollapseWarning):
        collapsing.fit(train)
    assert collapsing.collapsed_ is True


# -- DAGMM ---------------------------------------------------------------------------
def test_dagmm_learns():
    from kad_plugins.dagmm import DAGMMDetector

    params = {"image_size": 16, "epochs": 20, "learning_rate": 1e-3, "batch_size": 32}
    untrained, trained = trained_vs_untrained(DAGMMDetector, params, orientation_task(bars))
    assert_learns(untrained, trained)


def test_dagmm_default_distances_depend_on_the_input():
    from kad_plugins.dagmm import DAGMMDetector

    rng = np.random.default_rng(0)
    params = {**DAGMMDetector.quick_params, "epochs": 0}
    features = DAGMMDetector(**params).fit(rng.normal(size=(40, 6)))
    images = DAGMMDetector(**params).fit(rng.uniform(size=(40, 16, 16, 3)))
    assert features.net_.distances == ("relative", "cosine", "euclidean")
    assert images.net_.distances == ("relative", "cosine")
    chosen = DAGMMDetector(**params, distances=("relative", "cosine"))
    assert chosen.fit(rng.normal(size=(40, 6))).net_.distances == ("relative", "cosine")


def test_dagmm_with_one_component_is_a_single_gaussian():
    from scipy.stats import multivariate_normal

    from kad_plugins.dagmm import DAGMMDetector

    x = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    det = DAGMMDetector(**{**DAGMMDetector.quick_params, "n_components": 1, "epochs": 1}).fit(x)
    z = det._predict(det.net_, det._prepare(x))["z"].astype(np.float64)
    cov = np.cov(z.T, bias=True) + det.cov_eps * np.eye(z.shape[1])
    np.testing.assert_allclose(det.phi_, [1.0])
    np.testing.assert_allclose(det.anomaly_score(x),
                               -multivariate_normal(z.mean(axis=0), cov).logpdf(z), rtol=1e-6)


def test_dagmm_energy_matches_a_reference_mixture():
    import tensorflow as tf
    from scipy.stats import multivariate_normal

    from kad_plugins.dagmm import gmm_energy, gmm_parameters

    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 3))
    gamma = rng.dirichlet(np.ones(4), size=40)
    phi, mu, cov = (t.numpy() for t in gmm_parameters(tf.constant(z), tf.constant(gamma)))
    np.testing.assert_allclose(phi, gamma.mean(axis=0))
    energy, _ = gmm_energy(tf.constant(z), phi, mu, cov, 1e-6)
    cov = cov + 1e-6 * np.eye(3)
    density = sum(phi[k] * multivariate_normal(mu[k], cov[k]).pdf(z) for k in range(4))
    np.testing.assert_allclose(energy.numpy(), -np.log(density), rtol=1e-8)


# -- DSEBM ---------------------------------------------------------------------------
@pytest.mark.parametrize("score_type", ["energy", "reconstruction"])
def test_dsebm_learns(score_type):
    from kad_plugins.dsebm import DSEBMDetector

    # Images of 24 px, resized to the network's 16 px working size.
    params = {"score_type": score_type, "image_size": 16, "epochs": 10, "batch_size": 32}
    untrained, trained = trained_vs_untrained(DSEBMDetector, params,
                                              orientation_task(bands, size=24))
    assert_learns(untrained, trained)


# -- AnoGAN --------------------------------------------------------------------------
def test_anogan_learns():
    from kad_plugins.anogan import AnoGANDetector

    params = {"image_size": 16, "latent_dim": 16, "filters": 16, "epochs": 20,
              "learning_rate": 1e-3, "batch_size": 32, "n_search_steps": 30}
    untrained, trained = trained_vs_untrained(AnoGANDetector, params,
                                              orientation_task(bands))
    assert_learns(untrained, trained)


# -- DeepGEO -------------------------------------------------------------------------
def test_deep_geo_learns():
    from kad_plugins.deep_geo import DeepGeoDetector

    params = {"image_size": 16, "width": 8, "epochs": 1}
    untrained, trained = trained_vs_untrained(DeepGeoDetector, params,
                                              orientation_task(bars, n_train=200))
    assert_learns(untrained, trained)


def test_deep_geo_transformations():
    from kad_plugins.deep_geo import DeepGeoDetector, Transformations

    t = Transformations(16, 4)
    assert len(t) == 72 and len({m.tobytes() for m in t.index}) == 72
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(t.apply(x, 0), x)  # identity first
    np.testing.assert_array_equal(t.apply(x, 1), np.rot90(x, 1, axes=(1, 2)))
    assert t.params[36][0]  # the second half is flipped
    # translations scale with the working size: a quarter of it, 8 px at 32 px
    assert DeepGeoDetector(image_size=32)._transformations().translation == 8


def test_dirichlet_fit_recovers_its_parameters():
    from kad_plugins.deep_geo import fit_dirichlet

    rng = np.random.default_rng(0)
    truth = np.array([[0.5, 2.0, 5.0, 1.0], [3.0, 3.0, 3.0, 30.0]])
    p = np.stack([rng.dirichlet(a, size=20000) for a in truth])
    alpha = fit_dirichlet(p.mean(axis=1), np.log(p).mean(axis=1))
    np.testing.assert_allclose(alpha, truth, rtol=0.05)


# -- supervised ----------------------------------------------------------------------
def _digits_pair(normal, abnormal, n, rng, size=32):
    digits = load_digits()
    images = _gray(np.kron(digits.images / 16.0, np.ones((size // 8, size // 8))))
    a = rng.permutation(np.flatnonzero(digits.target == normal))[:n]
    b = rng.permutation(np.flatnonzero(digits.target == abnormal))[:n]
    return np.concatenate([images[a], images[b]]), np.r_[np.zeros(len(a)), np.ones(len(b))]


def test_supervised_learns():
    from kad_plugins.supervised import SupervisedDetector

    rng = np.random.default_rng(0)
    train_x, train_y = _digits_pair(0, 1, 80, rng)
    test_x, test_y = _digits_pair(0, 1, 80, rng)
    # Random weights (no download); fine-tuning the last 40 layers of the backbone keeps
    # the traced training step small.
    params = {**SupervisedDetector.quick_params, "fine_tune": 40, "learning_rate": 3e-3,
              "validation_fraction": 0.0}
    aurocs = []
    for epochs in (0, 5):
        det = SupervisedDetector(**{**params, "epochs": epochs}).fit(train_x, train_y)
        aurocs.append(roc_auc_score(test_y, det.anomaly_score(test_x)))
    assert_learns(*aurocs)


def test_supervised_needs_both_classes():
    from kad_plugins.supervised import SupervisedDetector

    x = np.random.default_rng(0).random((10, 32, 32, 3)).astype(np.float32)
    det = SupervisedDetector(**SupervisedDetector.quick_params)
    with pytest.raises(ValueError, match="both classes"):
        det.fit(x, np.zeros(10))
    with pytest.raises(ValueError, match="needs labels"):
        det.fit(x)


# -- shared machinery ----------------------------------------------------------------
def test_training_reports_one_update_per_epoch_and_prints_nothing(capsys):
    from sklearn.base import clone

    from kad.utils.progress import Recorder
    from kad_plugins.dsebm import DSEBMDetector

    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    det = DSEBMDetector(**{**DSEBMDetector.quick_params, "epochs": 3, "patience": None})
    recorder = Recorder()
    det.fit(x, progress=recorder)
    assert recorder.events == [("begin", "DSEBM epochs", None, 3),
                               *(("update", "DSEBM epochs", e, 3) for e in (1, 2, 3)),
                               ("end", "DSEBM epochs", None, None)]
    assert "_progress" not in vars(det), "the progress is not kept on the detector"
    assert "progress" not in det.get_params() and clone(det).get_params() == det.get_params()
    clone(det).fit(x)  # progress=None: silent
    assert capsys.readouterr() == ("", "")


def test_a_file_saved_with_the_retired_verbose_parameter_still_loads(tmp_path, monkeypatch):
    from kad.detectors.base import load_detector
    from kad_plugins.dsebm import DSEBMDetector

    x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    det = DSEBMDetector(**{**DSEBMDetector.quick_params, "epochs": 1}).fit(x)
    params = DSEBMDetector.get_params
    with monkeypatch.context() as m:  # as a detector of before saved itself
        m.setattr(DSEBMDetector, "get_params",
                  lambda self, deep=True: {**params(self, deep), "verbose": 1})
        path = det.save(tmp_path / "old.kad")
    loaded = load_detector(path)
    assert "verbose" not in loaded.get_params()
    np.testing.assert_allclose(loaded.anomaly_score(x), det.anomaly_score(x), rtol=1e-5)


def test_validation_split_is_disjoint_and_seeded():
    from kad.detectors.deep import split_validation

    train, val = split_validation(100, 0.2, random_state=0)
    assert len(val) == 20 and not set(train) & set(val) and len(train) + len(val) == 100
    again = split_validation(100, 0.2, random_state=0)
    np.testing.assert_array_equal(val, again[1])
    assert len(split_validation(3, 0.2, random_state=0)[1]) == 0  # too small to split
    labels = np.r_[np.zeros(90), np.ones(10)]
    train, val = split_validation(100, 0.2, random_state=0, labels=labels)
    assert labels[val].sum() == 2  # stratified


@pytest.mark.shared
def test_supervised_fine_tunes_imagenet_weights():
    from conftest import MOBILENET_WEIGHTS, need
    from kad_plugins.supervised import SupervisedDetector

    weights = need(MOBILENET_WEIGHTS)
    rng = np.random.default_rng(1)
    train_x, train_y = _digits_pair(3, 8, 60, rng, size=64)
    test_x, test_y = _digits_pair(3, 8, 60, rng, size=64)
    # A linear probe on ImageNet features (frozen backbone, batch norm in inference mode).
    params = {**SupervisedDetector.quick_params, "weights": str(weights), "image_size": 64,
              "epochs": 5, "learning_rate": 3e-3}
    det = SupervisedDetector(**params).fit(train_x, train_y)
    assert roc_auc_score(test_y, det.anomaly_score(test_x)) >= 0.9
