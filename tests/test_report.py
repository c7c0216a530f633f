"""The report's parts that need no network: names, the batch test, the heatmaps' scale."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kad.screening._report_images import SKETCH, HeatmapSketches, Sketch, on_photograph
from kad.screening.results import display_names
from kad.screening.shift import batch_shift


def test_files_are_named_by_their_path_under_what_was_given(tmp_path):
    new = tmp_path / "new"
    files = [new / "sub1" / "x.jpeg", new / "sub2" / "x.jpeg", tmp_path / "eye.png"]
    names = display_names(files, [new, tmp_path / "eye.png"])
    assert names == {str(files[0]): "sub1/x.jpeg", str(files[1]): "sub2/x.jpeg",
                     str(files[2]): files[2].as_posix()}  # named directly: as given
    # the same relative path under two folders given: both keep the path as given
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    assert display_names([a, b], [a.parent, b.parent]) == {str(a): a.as_posix(),
                                                           str(b): b.as_posix()}
    # without what was given: relative to the folder the files share
    assert display_names(files[:2]) == {str(files[0]): "sub1/x.jpeg",
                                        str(files[1]): "sub2/x.jpeg"}


def _model(calibration):
    return SimpleNamespace(calibration=None if calibration is None else {
        "scores": list(calibration)})


def test_a_batch_unlike_the_calibration_normals_is_called_out():
    rng = np.random.default_rng(0)
    model = _model(rng.normal(0, 1, 300))
    alike = batch_shift(model, rng.normal(0, 1, 200))
    assert alike is not None and not alike.shifted and alike.p_value > 0.01
    assert "consistent with the calibration normals" in alike.line()
    other_camera = batch_shift(model, rng.normal(1.0, 1, 200))
    assert other_camera.shifted and other_camera.p_value < 1e-6
    assert other_camera.n_new == 200 and other_camera.n_calibration == 300
    line = other_camera.line()
    assert "does not look like the calibration normals" in line
    assert "Kolmogorov-Smirnov" in line and f"p = {other_camera.p_value:.2g}" in line
    assert batch_shift(_model(None), [1.0, 2.0]) is None  # no calibration normals
    assert batch_shift(model, [np.nan, 1.0]) is None  # one usable score


def test_the_test_stays_quiet_for_healthy_batches_with_few_calibration_normals():
    """Conformal p-values of one batch take only n + 1 values and share one calibration
    set: a one-sample test of them against the uniform would call out a large healthy
    batch; the two-sample test does not, at its level."""
    from scipy.stats import kstest

    from kad.screening.calibration import conformal_p_values

    rng = np.random.default_rng(1)
    two_sample, one_sample = [], []
    for _ in range(100):
        calibration, healthy = rng.normal(0, 1, 19), rng.normal(0, 1, 2000)
        two_sample.append(batch_shift(_model(calibration), healthy).shifted)
        p_values = conformal_p_values(calibration, healthy)
        one_sample.append(kstest(p_values, "uniform").pvalue < 0.01)
    assert np.mean(two_sample) <= 0.04 and np.mean(one_sample) > 0.9


def _sketch(peak):
    heat = np.zeros((SKETCH, SKETCH), np.float32)
    heat[10:20, 10:20] = peak
    return Sketch(heat, peak, (0, 0, 40, 20), (20, 40))


def test_heatmaps_share_one_scale_so_a_faint_region_stays_faint():
    sketches = HeatmapSketches(method="gradient")
    sketches.sketches = {"faint": _sketch(1.0), "glaring": _sketch(10.0)}
    scale = sketches.scale()
    assert scale.top == pytest.approx(10.0)
    assert "2 images of this report" in scale.anchored
    assert scale.levels(sketches.get("faint").map).max() == pytest.approx(0.1)
    assert scale.levels(sketches.get("glaring").map).max() == pytest.approx(1.0)
    # on the photograph (twice as wide as high, the whole of it seen by the model)
    back = on_photograph(sketches.get("glaring"), (20, 40))
    assert back.shape == (20, 40) and back.max() == pytest.approx(10.0)
    rows, cols = np.nonzero(back > 5)
    assert rows.min() >= 2 and rows.max() <= 7 and cols.min() >= 5 and cols.max() <= 13


def _anchored_model(threshold: float, method: str = "gradient"):
    """Twenty calibration normals scoring 1..20, their heatmaps peaking at 0.1..2.0."""
    peaks = np.arange(1, 21) / 10.0
    return SimpleNamespace(
        threshold=SimpleNamespace(value=threshold),
        flag=lambda scores: np.asarray(scores) > threshold,  # as Pipeline.flag
        calibration={"scores": list(np.arange(1.0, 21.0)), "n": 20, "heatmaps": {
            "method": method, "grid": 8, "steps": 16, "n": 20, "peaks": peaks,
            "levels": np.array([0.5, 0.9, 0.99]),
            "quantiles": np.stack([peaks / 4, peaks / 2, peaks * 0.9], axis=1),
            "unreadable": 0, "measured_on": "the heatmaps of all 20 calibration normals"}})


def test_the_scale_is_anchored_where_healthy_regions_reach_at_the_threshold_rate():
    from kad.screening.heatmap_scale import HeatAnchor, NoAnchor, anchor

    strict, lenient = anchor(_anchored_model(19.5), "gradient"), anchor(_anchored_model(15.5),
                                                                        "gradient")
    assert isinstance(strict, HeatAnchor) and isinstance(lenient, HeatAnchor)
    # 1 of 20 calibration normals above the threshold: the 95% quantile of the peaks
    assert (strict.flagged, strict.rate, strict.n) == (1, 0.05, 20)
    assert strict.value == pytest.approx(1.905)
    assert lenient.flagged == 5 and lenient.value == pytest.approx(1.525)  # moved with it
    assert "1 of the 20 calibration normals" in strict.describe()
    assert strict.exceeded_by(1.95) and not strict.exceeded_by(1.9)
    # a threshold above every calibration score: the highest peak
    assert anchor(_anchored_model(99.0), "gradient").value == pytest.approx(2.0)
    # maps made another way than the calibration normals' are not compared with them
    other = anchor(_anchored_model(19.5), "occlusion")
    assert isinstance(other, NoAnchor) and "--heatmap-method gradient" in other.reason
    steps = anchor(_anchored_model(19.5), "gradient", grid=4, steps=32)
    assert isinstance(steps, NoAnchor) and "--steps 32" in steps.reason
    assert isinstance(anchor(_anchored_model(19.5, "occlusion"), "occlusion", grid=8,
                             steps=32), HeatAnchor)  # steps do not change occlusion maps


def test_an_anchored_scale_draws_the_report_against_healthy_regions():
    sketches = HeatmapSketches(method="gradient", steps=16)
    sketches.sketches = {"faint": _sketch(0.5), "glaring": _sketch(10.0)}
    scale = sketches.scale(_anchored_model(19.5))
    assert scale.anchor is not None and scale.top == pytest.approx(1.905)
    assert "calibration normals" in scale.anchored and "20" in scale.anchored
    # the faint map stays faint whatever else the report holds; the glaring one saturates
    assert scale.levels(sketches.get("faint").map).max() == pytest.approx(0.5 / 1.905)
    assert scale.levels(sketches.get("glaring").map).max() == 1.0
    assert scale.healthy(10.0).startswith("above") and scale.healthy(0.5).startswith("within")
    # without the calibration normals' maps: the report's own scale, saying why
    old = _anchored_model(19.5)
    del old.calibration["heatmaps"]
    fallback = sketches.scale(old)
    assert fallback.anchor is None and fallback.top == pytest.approx(10.0)
    assert "holds no heatmaps of its calibration normals" in fallback.anchored
    assert fallback.healthy(10.0) == ""
