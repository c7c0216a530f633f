"""A pipeline's recorded settings are checked on load by the schema the command line uses
(kad.utils.settings): a batch size of -5 or a NaN threshold is refused in one line."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

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
