"""One progress protocol: the library reports named tasks, the command line draws them."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kad.cli import app
from kad.cli.render import RichProgress
from kad.utils.progress import Recorder, task

FAST = ["--backbone", "mobilenet_v2:alpha=0.35", "--weights", "none", "--image-size", "32"]


def test_a_task_ends_however_its_block_ends_and_none_reports_nothing():
    recorder = Recorder()
    with pytest.raises(KeyboardInterrupt), task(recorder, "epochs", 3) as update:
        update(1)
        raise KeyboardInterrupt
    assert recorder.events == [("begin", "epochs", None, 3), ("update", "epochs", 1, 3),
                               ("end", "epochs", None, None)]
    with task(None, "epochs", 3) as update:
        assert update(1) is None
    with task(recorder, "images") as update:  # the total may become known on the way
        update(2, 10)
        update(4)
    assert recorder.last("images") == (4, 10)


def _bars() -> tuple[RichProgress, io.StringIO]:
    out = io.StringIO()
    return RichProgress(Console(file=out, width=120, force_terminal=False)), out


def test_the_bar_appears_at_the_first_update_so_cached_work_draws_nothing():
    progress, out = _bars()
    with task(progress, "features of cached", 10):
        pass
    assert out.getvalue() == "" and progress._live is None
    with task(progress, "scoring", 3) as update:
        for done in range(1, 4):
            update(done)
    text = out.getvalue()
    assert "scoring" in text and "3/3" in text and "cached" not in text
    assert progress._live is None, "the display stops with the last task"


def test_nested_tasks_are_drawn_together_and_an_inner_one_goes_when_it_ends():
    progress, out = _bars()
    with task(progress, "table1 runs", 2) as runs:
        for run in range(1, 3):
            with task(progress, "DSEBM epochs", 4) as epochs:
                for epoch in range(1, 5):
                    epochs(epoch)
                # both lines at once, the runs' from the first epoch on
                assert [t.description for t in progress._live.tasks] == [
                    "table1 runs", "DSEBM epochs"]
            assert len(progress._live.tasks) == 1
            runs(run)
    assert "table1 runs" in out.getvalue() and "2/2" in out.getvalue()
    assert progress._live is None


def test_names_from_data_are_never_read_as_markup():
    progress, out = _bars()
    with task(progress, "features of [bold]x[/bold]", 1) as update:
        update(1)
    assert "[bold]x[/bold]" in out.getvalue()


@pytest.mark.tf
def test_a_recipe_reports_its_runs_with_each_detectors_epochs_inside(tmp_path):
    from kad_recipes.common import FEATURES, RecipeOptions
    from kad_recipes.table1 import run_table1

    options = RecipeOptions(dataset="digits", backbone="mobilenet_v2:alpha=0.35",
                            weights="none", image_size=32,
                            detectors=["knn", "dsebm:epochs=2,patience=None"],
                            inputs=[FEATURES], limit=30, classes=["3"], cache_dir=tmp_path)
    recorder = Recorder()
    result = run_table1(options, progress=recorder)
    assert len(result.runs) == 2
    assert recorder.tasks()[0] == "features of digits"
    done, total = recorder.last("features of digits")
    assert done == total == len(result.bench.dataset)
    assert recorder.last("table1 runs") == (2, 2)
    assert recorder.last("DSEBM epochs") == (2, 2)
    hooks = [(hook, name) for hook, name, _, _ in recorder.events if hook != "update"]
    # the detector's task opens and closes within the run loop's
    assert hooks[-4:] == [("begin", "table1 runs"), ("begin", "DSEBM epochs"),
                          ("end", "DSEBM epochs"), ("end", "table1 runs")]
    quiet = run_table1(options)  # progress=None: the same runs, nothing reported
    assert [r.auroc for r in quiet.runs] == [r.auroc for r in result.runs]


@pytest.mark.tf
def test_the_command_line_draws_the_bars_on_stderr(tmp_path):
    result = CliRunner().invoke(app, ["recipe", "table1", "--dataset", "digits", *FAST,
                                      "--detectors", "knn", "--inputs", "features",
                                      "--limit", "30", "--classes", "3",
                                      "--cache-dir", str(tmp_path / "cache"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "features of digits" in result.stderr and "table1 runs" in result.stderr
    assert "table1 runs" not in result.stdout
