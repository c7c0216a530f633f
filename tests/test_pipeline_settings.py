"""A pipeline's recorded settings are checked on load by the schema the command line uses
(kad.utils.settings): a batch size of -5 or a NaN threshold is refused in one line."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_artifact import _pipeline, _rewrite

from kad.errors import ArtifactError
from kad.screening.pipeline import load_pipeline
from kad.utils import settings


def _edit(src: Path, dst: Path, edit) -> Path:
    """A copy of the model file ``src`` whose pipeline record ``edit`` changed in place."""
    with zipfile.ZipFile(src) as zf:
        tree = json.loads(zf.read("object.json"))
    edit(tree["pipeline"])
    return _rewrite(src, dst, tree=tree)


def _set(key, value):
    def edit(record):
        parent = record
        *path, last = key.split(".")
        for part in path:
            parent = parent[part]
        parent[last] = value
    return edit


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _pipeline().save(tmp_path_factory.mktemp("settings") / "p.kad")


@pytest.mark.parametrize("key, value, allowed", [
    ("batch_size", -5, r"an integer in \[1, 4096\]"),
    ("batch_size", 10**9, r"an integer in \[1, 4096\]"),
    ("batch_size", 2.5, r"an integer in \[1, 4096\]"),
    ("image_size", 10**6, r"an integer in \[32, 4096\]"),
    ("threshold.value", float("nan"), "a finite number"),
    ("threshold.method", "magic", "one of conformal, sensitivity, contamination"),
    ("runtime", "cuda", "one of auto, keras, openvino"),
    ("preprocessing", "", "a preprocessing spec"),
    ("weights_fingerprint", "x", "64 hexadecimal digits"),
    ("training.scores", [], "a list of up to"),
])
def test_a_setting_out_of_range_is_refused(saved, tmp_path, key, value, allowed):
    crafted = _edit(saved, tmp_path / "crafted.kad", _set(key, value))
    with pytest.raises(ArtifactError) as caught:
        load_pipeline(crafted)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{crafted} is damaged: its setting "
                                                      f"{key} is ")
    assert re.search(allowed, message), message


def test_scores_must_be_finite(saved, tmp_path):
    crafted = _edit(saved, tmp_path / "c.kad", lambda r: r["training"]["scores"].append(
        float("inf")))
    with pytest.raises(ArtifactError, match=r"setting training.scores\[\d+\] is inf"):
        load_pipeline(crafted)


def test_the_command_line_uses_the_same_bounds():
    from typer.testing import CliRunner

    from kad.cli import app

    result = CliRunner().invoke(app, ["fit", "--out", "x.kad", "--batch-size",
                                      str(settings.MAX_BATCH_SIZE + 1)])
    assert result.exit_code == 2 and "4096" in result.output
    assert settings.batch_size(64) == 64


def _with_calibration_heatmaps(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    pipeline = _pipeline()
    peaks = rng.random(12)
    pipeline.calibration = {"scores": sorted(rng.random(12).tolist()), "n": 12, "heatmaps": {
        "method": "gradient", "grid": 8, "steps": 16, "n": 12, "peaks": peaks,
        "levels": np.array([0.5, 0.9, 0.99]),
        "quantiles": np.stack([peaks / 3, peaks / 2, peaks / 1.1], axis=1), "unreadable": 0,
        "measured_on": "the heatmaps of all 12 calibration normals, by gradient"}}
    pipeline.threshold.value = float(np.sort(pipeline.calibration["scores"])[9])
    return pipeline.save(tmp_path / "anchored.kad"), pipeline


def test_the_calibration_heatmaps_survive_save_and_load_exactly(tmp_path):
    from kad.screening.heatmap_scale import anchor

    path, pipeline = _with_calibration_heatmaps(tmp_path)
    loaded = load_pipeline(path)
    kept, saved = loaded.calibration["heatmaps"], pipeline.calibration["heatmaps"]
    assert set(kept) == set(saved)
    for key in ("peaks", "levels", "quantiles"):
        assert kept[key].dtype == np.float64 and np.array_equal(kept[key], saved[key])
    assert anchor(loaded, "gradient") == anchor(pipeline, "gradient")
    # the manifest says what they are, without the arrays
    info = json.loads(zipfile.ZipFile(path).read("manifest.json"))["info"]
    assert info["calibration"]["heatmaps"]["n"] == 12 and "peaks" not in info["calibration"][
        "heatmaps"]
    # a record that does not match its arrays is refused in one line
    crafted = _edit(path, tmp_path / "crafted.kad", _set("calibration.heatmaps.n", 13))
    with pytest.raises(ArtifactError, match=r"calibration.heatmaps.peaks is 'an array of "
                                            r"float64 \(12,\)'; it must be a float array "
                                            r"of shape \(13,\)"):
        load_pipeline(crafted)
