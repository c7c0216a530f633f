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
