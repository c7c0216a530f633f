"""The command line as a user meets it."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import kad
from conftest import FAST_CLI
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


@pytest.mark.parametrize("command", ["backbones", "detectors"])
def test_the_listings_name_the_entry_point_group_plugins_declare(command):
    """A third party registers under the group the listing names: the one kad's own
    built-ins are found in."""
    from importlib.metadata import entry_points

    result = runner.invoke(app, [command], env={"COLUMNS": "400"})
    group = result.output.split("entry-point group ", 1)[1].split(")", 1)[0]
    assert "mobilenet_v2" in entry_points(group=group).names or "knn" in entry_points(
        group=group).names, group
    helps = typer_commands()[command].help
    assert "entry-point group" not in helps or group in helps


@pytest.mark.tf
def test_extract_caches_every_block(tmp_path):
    args = ["extract", "--dataset", "digits", *FAST_CLI, "--cache-dir", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1797 images" in result.output and "out_relu" in result.output
    # feature entries; converted OpenVINO models live in openvino/ beside them
    entries = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "openvino"]
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


def test_preview_shows_what_it_can_and_lists_the_rest(tmp_path):
    """A file that is not an image, or not readable, is listed and the others are shown
    (it stopped the whole preview); a folder is searched; an existing picture is said to
    be replaced."""
    image = np.zeros((300, 400, 3), np.uint8)
    cv2.circle(image, (200, 150), 120, (40, 90, 200), -1)
    folder = tmp_path / "eyes"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(folder / name), image)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "readme.txt").write_text("notes")
    out = tmp_path / "p.png"
    out.write_bytes(b"an older picture")
    result = runner.invoke(app, ["preview", str(folder), str(tmp_path / "readme.txt"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "2 input(s) are not in the preview" in said
    assert "broken.jpg" in said and "readme.txt" in said
    assert "2 of 4 inputs shown" in said and f"replaced the earlier {out}" in said
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape[0] > 2 * 256  # two rows
    # nothing readable: one line, nothing written
    result = runner.invoke(app, ["preview", str(folder / "broken.jpg"),
                                 "--out", str(tmp_path / "none.png")])
    assert result.exit_code == 1 and "broken.jpg" in result.output
    assert not (tmp_path / "none.png").exists()


def test_a_missing_data_dir_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["extract", "--dataset", "dr", "--data-dir",
                                 str(tmp_path / "nowhere"), "--weights", "none"])
    assert result.exit_code == 1 and "nowhere" in result.output
    assert "Traceback" not in result.output


def test_messages_are_printed_as_written_never_read_as_markup(monkeypatch):
    import kad.features.extract
    from kad.errors import MissingDependencyError

    def missing(*args, **kwargs):
        raise MissingDependencyError("this needs Keras 3; install it with: pip install 'kad[tf]'")

    monkeypatch.setattr(kad.features.extract, "extract_features", missing)
    result = runner.invoke(app, ["extract", "--dataset", "digits"])
    assert result.exit_code == 1 and "pip install 'kad[tf]'" in result.output


def test_interrupting_score_does_not_promise_a_resume(monkeypatch, tmp_path):
    import kad.screening.workflow

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kad.screening.workflow, "screen", interrupted)
    result = runner.invoke(app, ["score", str(tmp_path / "m.kad"), str(tmp_path)])
    assert result.exit_code == 130 and "resume" not in result.output
    assert "nothing was written" in result.output


@pytest.mark.tf
def test_the_cache_commands_find_a_damaged_entry_and_extraction_replaces_it(tmp_path):
    args = ["extract", "--dataset", "digits", *FAST_CLI, "--cache-dir", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    listed = runner.invoke(app, ["cache", "list", "--cache-dir", str(tmp_path)])
    assert listed.exit_code == 0 and "digits" in listed.output and "complete" in listed.output
    ok = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert ok.exit_code == 0 and "1 entries verified, 0 damaged" in ok.output
    block = next(tmp_path.glob("*/blocks/out_relu.npy"))
    data = bytearray(block.read_bytes())
    data[-5] ^= 0xFF
    block.write_bytes(bytes(data))
    bad = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "out_relu.npy" in bad.output and "1 damaged" in bad.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "does not match its checksum" in again.output
    assert runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)]).exit_code == 0
    removed = runner.invoke(app, ["cache", "remove", "--all", "--cache-dir", str(tmp_path)])
    assert removed.exit_code == 0 and "1 entries removed" in removed.output
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "openvino"]


@pytest.mark.tf
def test_two_shards_from_the_command_line_join_into_one_entry(tmp_path):
    args = ["extract", "--dataset", "digits", *FAST_CLI, "--cache-dir", str(tmp_path)]
    first = runner.invoke(app, [*args, "--shard", "1/2"])
    assert first.exit_code == 0 and "waiting for shard(s) 0" in first.output, first.output
    second = runner.invoke(app, [*args, "--shard", "0/2"])
    assert second.exit_code == 0 and "1797 images" in second.output, second.output
    whole = runner.invoke(app, args)
    assert whole.exit_code == 0 and "1797 images" in whole.output
    entries = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    entries = [e for e in entries if e != "openvino"]
    assert len(entries) == 1 and ".shard-" not in entries[0]


def test_an_unwritable_out_folder_stops_score_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["score", str(tmp_path / "model.kad"), str(tmp_path),
                                 "--out", str(blocker / "sub")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


def test_the_image_size_help_states_the_size_kad_picks(tmp_path):
    from kad.data.datasets import load_dataset
    from kad.features.backbones import get_backbone
    from kad.features.extraction import default_input_size
    from synthetic import screening_folder

    root = screening_folder(tmp_path, n_normal=2, n_abnormal=1, size=32)
    backbone = get_backbone("mobilenet_v2:alpha=0.35")
    fundus = default_input_size(load_dataset("folder", root), backbone)
    native = default_input_size(load_dataset("folder:kind=natural", root), backbone)
    assert (fundus, native) != (native, native)  # folders of fundus photographs differ
    commands = typer_commands()
    for name in ("fit", "extract"):
        helps = [p.help for p in commands[name].params if p.name == "image_size"]
        assert f"{fundus} for fundus photographs" in helps[0], helps
        assert "folder:kind=natural" in helps[0] and "native size" in helps[0]


def typer_commands():
    import typer

    return typer.main.get_command(app).commands


def test_install_hints_in_the_help_survive_rich_markup():
    """``pip install 'kad[int8]'`` in an option's or a command's help is shown as written:
    rich would otherwise read ``[int8]`` as a style tag and drop it."""
    import re

    commands = typer_commands()
    shown = 0
    for name, command in commands.items():
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        extras = set(re.findall(r"kad\\?\[(\w+)\]", " ".join(texts)))
        if not extras:
            continue
        out = runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"}).output
        for extra in extras:
            assert f"kad[{extra}]" in out, (name, extra)
            shown += 1
    assert shown >= 3  # fit's int8, export's openvino and extract's ray at least
