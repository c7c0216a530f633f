"""Nothing kad writes is left half-written, replaced unasked, mixed between runs, or read by
a spreadsheet as a formula."""

from __future__ import annotations

import csv
import errno
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

import kad.utils.files
from kad.errors import KadError
from kad.screening.results import SKIPPED, NotScored, ScoredImage, write_scores_csv
from kad.utils.files import (
    FOLDER_LOCK,
    OutputLockedError,
    WriteError,
    atomic_write,
    csv_cell,
    output_lock,
    staged_output,
)

runner = CliRunner()


def _disk_full(monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kad.utils.files.os, "fsync", full)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_keeps_the_earlier_file_when_the_disk_fills(tmp_path, monkeypatch):
    path = tmp_path / "scores.csv"
    path.write_text("earlier run\n")
    _disk_full(monkeypatch)
    with pytest.raises(WriteError) as caught:
        with atomic_write(path) as fh:
            fh.write("x" * 100_000)
    message = str(caught.value)
    assert message == f"cannot write {path}: the disk is full: free space there or choose " \
                      "another folder"
    assert path.read_text() == "earlier run\n" and _leftovers(tmp_path) == []


def test_atomic_write_leaves_nothing_on_ctrl_c(tmp_path):
    path = tmp_path / "report.html"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as fh:
            fh.write("<html>half")
            raise KeyboardInterrupt
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(kad.utils.files.os, "open", read_only)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'a.png'}: it is on a "
                                         "read-only file system"):
        kad.utils.files.write_bytes(tmp_path / "a.png", b"png")


def _rows():
    return [ScoredImage("=HYPERLINK(\"http://evil\",\"x\").png", 2.5, 99.0, True),
            ScoredImage("-2+3.png", -1.25, 10.0, False),
            ScoredImage("plain.png", 0.5, 50.0, False)]


def test_scores_csv_escapes_formulas_and_keeps_numbers(tmp_path):
    path = write_scores_csv(tmp_path / "scores.csv", _rows(),
                            [NotScored("@cmd.png", SKIPPED, "=1+1"),
                             NotScored("\tTAB.png", SKIPPED, "+bad"),
                             NotScored("\rCR.png", SKIPPED, "fine")])
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == [
        "'=HYPERLINK(\"http://evil\",\"x\").png", "'-2+3.png", "plain.png", "'@cmd.png",
        "'\tTAB.png", "'\rCR.png"]
    assert [r["reason"] for r in rows[3:]] == ["'=1+1", "'+bad", "fine"]
    assert {r["score"] for r in rows[:3]} == {"2.5", "-1.25", "0.5"}  # numbers stay numbers


def test_csv_cell_escapes_only_text_a_spreadsheet_would_compute():
    assert [csv_cell(v) for v in ("=1", "+1", "-1", "@a", "\ta", "\ra", "a=1", "", 3, -1.5)] \
        == ["'=1", "'+1", "'-1", "'@a", "'\ta", "'\ra", "a=1", "", 3, -1.5]


def test_scores_csv_is_never_left_half_written(tmp_path, monkeypatch):
    path = tmp_path / "scores.csv"
    write_scores_csv(path, _rows(), [])
    before = path.read_bytes()
    _disk_full(monkeypatch)
    with pytest.raises(WriteError) as caught:
        write_scores_csv(path, _rows()[:1], [])
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_png_preview_and_model_writers_are_atomic(tmp_path, monkeypatch):
    import cv2

    from kad.data.preview import save_preview
    from kad.registry import get_detector
    from kad.screening.heatmaps import _write_png

    image = tmp_path / "eye.png"
    cv2.imwrite(str(image), np.full((40, 40, 3), 120, np.uint8))
    targets = {name: tmp_path / name for name in ("heat.png", "preview.png", "det.kad")}
    for path in targets.values():
        path.write_bytes(b"earlier")
    detector = get_detector("knn").fit(np.random.default_rng(0).random((20, 3)))
    _disk_full(monkeypatch)
    writers = {
        "heat.png": lambda p: _write_png(p, np.zeros((8, 8, 3), np.uint8)),
        "preview.png": lambda p: save_preview([image], p, size=32),
        "det.kad": lambda p: detector.save(p),
    }
    for name, write in writers.items():
        with pytest.raises(KadError, match=f"cannot write {targets[name]}: the disk is full"):
            write(targets[name])
        assert targets[name].read_bytes() == b"earlier"
    assert _leftovers(tmp_path) == []


def test_recipe_results_are_atomic_and_escaped(tmp_path, monkeypatch):
    from dataclasses import fields

    from kad_recipes.common import Run, write_results

    values = {f.name: 0 for f in fields(Run)}
    values.update(detector="=cmd|' /C calc'!A0", input="features", representation="concat",
                  split="s0", normal_class="-1", auroc=0.5)
    run = Run(**values)
    dataset = type("D", (), {"name": "digits", "fingerprint": "f",
                             "summary": lambda self: {}, "__len__": lambda self: 3})()
    bench = SimpleNamespace(options=SimpleNamespace(to_json=lambda: {}), dataset=dataset,
                            seeds=1, cache_keys=lambda: {}, unreadable={})
    write_results(tmp_path, "table1", bench, [run], [])
    with open(tmp_path / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["detector"] == "'=cmd|' /C calc'!A0" and row["normal_class"] == "'-1"
    assert row["auroc"] == "0.5"
    before = (tmp_path / "results.csv").read_bytes()
    _disk_full(monkeypatch)
    with pytest.raises(WriteError, match="the disk is full"):
        write_results(tmp_path, "table1", bench, [run], [])
    assert (tmp_path / "results.csv").read_bytes() == before and _leftovers(tmp_path) == []


# -- one run at a time ------------------------------------------------------------------------


def test_a_second_run_on_a_locked_output_stops_and_names_the_holder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out / FOLDER_LOCK, out):
        with pytest.raises(OutputLockedError) as caught:
            with staged_output(out):
                pytest.fail("the second run must not start")
    message = str(caught.value)
    assert f"{out} is being written by another kad run (process {os.getpid()} on " \
           f"{socket.gethostname()}, since " in message
    assert "\n" not in message
    assert not (out / FOLDER_LOCK).exists(), "the lock is released with its run"
    with staged_output(out):  # free again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import json

    lock = tmp_path / FOLDER_LOCK
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname(),
                                "since": "2020-01-01 00:00:00"}))
    with output_lock(lock, tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": "another-host",
                                "since": "2020-01-01 00:00:00"}))
    with pytest.raises(OutputLockedError, match="process 4206649 on another-host"):
        with output_lock(lock, tmp_path):
            pass
    assert lock.exists(), "another host's lock is not ours to remove"


def test_staged_files_appear_together_and_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("run 1")
    (out / "heatmaps").mkdir()
    (out / "heatmaps" / "old.png").write_text("run 1")
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out) as stage:
            (stage.path / "scores.csv").write_text("run 2")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["heatmaps", "notes.txt", "scores.csv"]
    assert (out / "scores.csv").read_text() == "run 1"
    with staged_output(out) as stage:
        (stage.path / "scores.csv").write_text("run 2")
        (stage.path / "report.html").write_text("run 2")
        (stage.path / "heatmaps").mkdir()
        (stage.path / "heatmaps" / "new.png").write_text("run 2")
        assert (out / "scores.csv").read_text() == "run 1"
        replaced = stage.publish()
    assert sorted(p.name for p in replaced) == ["heatmaps", "scores.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["heatmaps", "notes.txt", "report.html",
                                                     "scores.csv"]
    assert [p.name for p in (out / "heatmaps").iterdir()] == ["new.png"]  # never mixed
    assert (out / "notes.txt").read_text() == "the user's"


# -- the commands ------------------------------------------------------------------------------


class _Fake:
    """What kad score, fit and threshold need of a pipeline before any work."""

    has_network = True  # a model file, not an export


def test_kad_score_stops_while_another_run_writes_the_folder(tmp_path, monkeypatch):
    import kad.screening.pipeline
    from kad.cli import app

    monkeypatch.setattr(kad.screening.pipeline, "load_pipeline", lambda path: _Fake())
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "a.png").write_bytes(b"x")
    with output_lock(out / FOLDER_LOCK, out):
        result = runner.invoke(app, ["score", str(tmp_path / "m.kad"), str(tmp_path / "a.png"),
                                     "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "is being written by another kad run (process" in result.output
    assert sorted(p.name for p in out.iterdir()) == []


def test_interrupting_kad_score_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    import kad.screening.pipeline
    import kad.screening.workflow
    from kad.cli import app

    def interrupted(pipeline, model, inputs, out_dir, **kwargs):
        (out_dir / "scores.csv").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(kad.screening.pipeline, "load_pipeline", lambda path: _Fake())
    monkeypatch.setattr(kad.screening.workflow, "_screen", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("earlier run")
    result = runner.invoke(app, ["score", str(tmp_path / "m.kad"), str(tmp_path),
                                 "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert "nothing was written" in result.output and "--out is as it was" in result.output
    assert [p.name for p in out.iterdir()] == ["scores.csv"]
    assert (out / "scores.csv").read_text() == "earlier run"


def test_kad_threshold_never_rewrites_the_model_unasked(tmp_path, monkeypatch):
    import kad.screening.pipeline
    from kad.cli import app

    monkeypatch.setattr(kad.screening.pipeline, "load_pipeline", lambda path: _Fake())
    model = tmp_path / "model.kad"
    model.write_bytes(b"the model")
    result = runner.invoke(app, ["threshold", str(model), "--fpr", "0.1"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "--out NEW.kad" in result.output \
        and "--in-place" in result.output
    other = tmp_path / "other.kad"
    other.write_bytes(b"another model")
    result = runner.invoke(app, ["threshold", str(model), "--fpr", "0.1", "--out", str(other)])
    assert result.exit_code == 1 and "pass --overwrite to replace it" in result.output
    result = runner.invoke(app, ["threshold", str(model), "--fpr", "0.1", "--out", str(other),
                                 "--in-place"])
    assert result.exit_code == 1 and "not both" in result.output
    assert model.read_bytes() == b"the model" and other.read_bytes() == b"another model"


def test_kad_fit_refuses_to_replace_a_file_unless_asked(tmp_path):
    from kad.cli import app
    from synthetic import screening_folder

    model = tmp_path / "model.kad"
    model.write_bytes(b"the user's file")
    screening_folder(tmp_path / "data", n_normal=30, n_abnormal=4, seed=0)
    result = runner.invoke(app, ["fit", "--dataset", "folder", "--data-dir",
                                 str(tmp_path / "data"), "--out", str(model)])
    assert result.exit_code == 1, result.output
    assert f"{model} exists" in result.output and "--overwrite" in result.output
    assert model.read_bytes() == b"the user's file"


def test_a_recipe_stops_before_any_work_while_another_writes_its_out(tmp_path, monkeypatch):
    import kad_recipes.table1
    from kad.cli import app

    def work(*args, **kwargs):
        pytest.fail("no work while --out is locked")

    monkeypatch.setattr(kad_recipes.table1, "run_table1", work)
    out = tmp_path / "t1"
    out.mkdir()
    with output_lock(out / FOLDER_LOCK, out):
        result = runner.invoke(app, ["recipe", "table1", "--dataset", "digits",
                                     "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert f"{out} is being written by another kad run (process {os.getpid()}" in \
        result.output.replace("\n", "")
    assert list(out.iterdir()) == []


def test_a_second_kad_fit_to_the_same_file_stops_before_any_work(tmp_path):
    from kad.cli import app
    from kad.utils.files import file_lock_path
    from synthetic import screening_folder

    model = tmp_path / "model.kad"
    screening_folder(tmp_path / "data", n_normal=30, n_abnormal=4, seed=0)
    with output_lock(file_lock_path(model), model):
        result = runner.invoke(app, ["fit", "--dataset", "folder", "--data-dir",
                                     str(tmp_path / "data"), "--out", str(model),
                                     "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1, result.output
    assert f"{model} is being written by another kad run (process {os.getpid()}" in \
        result.output.replace("\n", "")
    assert not model.exists() and not list((tmp_path / "cache").glob("*-*"))


def test_a_full_disk_at_any_stage_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """Whatever writes when the disk fills (a library below kad's own writers, say), the
    command ends with one line naming the file and what to do, not a traceback."""
    from kad.cli import app

    model = tmp_path / "model.kad"
    model.write_bytes(b"")
    where = tmp_path / "deep" / "inside.npy"

    def fills(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr("kad.screening.workflow.screen", fills)
    result = runner.invoke(app, ["score", str(model), str(tmp_path), "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"error: cannot write {where}: the disk is full: free space there or "
                     "choose another folder"]
