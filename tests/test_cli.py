"""The command line as a user meets it."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import kad
from kad.cli import app

runner = CliRunner()


@pytest.mark.parametrize("code", [
    "import kad",
    "import kad.cli; kad.cli.app(['--help'], standalone_mode=False)",
    "import kad.cli; kad.cli.app(['recipe', 'table1', '--help'], standalone_mode=False)",
])
def test_import_and_help_do_not_import_tensorflow(code):
    check = code + "; import sys; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_detectors_lists_the_builtins_with_their_distribution():
    result = runner.invoke(app, ["detectors"])
    assert result.exit_code == 0
    for name in ("iforest", "ocsvm", "knn", "mahalanobis"):
        assert name in result.output
    assert f"kad {kad.__version__}" in result.output


def test_backbones_lists_the_builtins():
    result = runner.invoke(app, ["backbones"])
    assert result.exit_code == 0
    for name in ("inception_resnet_v2", "inception_v3", "mobilenet_v2", "keras"):
        assert name in result.output


@pytest.mark.tf
def test_extract_caches_every_block(tmp_path):
    args = ["extract", "--dataset", "digits", "--backbone", "mobilenet_v2:alpha=0.35",
            "--weights", "none", "--image-size", "32", "--cache-dir", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1797 images" in result.output and "out_relu" in result.output
    entries = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "blocks" / "out_relu.npy").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and str(entries[0]) in again.output.replace("\n", "")


def test_extract_refuses_a_too_small_image_size():
    result = runner.invoke(app, ["extract", "--dataset", "digits", "--image-size", "40",
                                 "--weights", "none"])
    assert result.exit_code == 1 and "minimum is 75" in result.output


def test_preview_writes_a_before_after_picture(tmp_path):
    image = np.zeros((300, 400, 3), np.uint8)
    cv2.circle(image, (200, 150), 120, (40, 90, 200), -1)
    cv2.imwrite(str(tmp_path / "eye.jpg"), image)
    result = runner.invoke(app, ["preview", str(tmp_path / "eye.jpg"),
                                 "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    picture = cv2.imread(str(tmp_path / "p.png"))
    assert picture is not None and picture.shape[1] >= 2 * 256


def test_a_missing_data_dir_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["extract", "--dataset", "dr", "--data-dir",
                                 str(tmp_path / "nowhere"), "--weights", "none"])
    assert result.exit_code == 1 and "nowhere" in result.output
    assert "Traceback" not in result.output
