"""The worked example of the documentation runs: it fits, saves, loads, scores, thresholds,
explains and exports through ``import kad`` alone."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST
from synthetic import screening_folder

EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "python_api.py"


def _example():
    spec = importlib.util.spec_from_file_location("python_api", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.tf
def test_the_python_api_example_runs_and_agrees_with_kad_score(tmp_path, capsys):
    import kad

    root = screening_folder(tmp_path / "data", n_normal=30, n_abnormal=6)
    (root / "notes.txt").write_text("not an image")
    example = _example()
    done = example.main(root, tmp_path / "work", fpr=0.2, **{**FAST, "runtime": "keras"})
    found = done["scores"]
    records = found.records()
    # every input: 36 images, notes.txt and patients.csv (skipped, with the reason)
    assert len(records) == found.n_inputs == 30 + 6 + 2
    assert {r["status"] for r in records} >= {"scored", "skipped"}
    # the command line writes exactly these rows
    run = kad.screen(done["model"], [root], tmp_path / "out")
    with open(run.scores_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == [r["file"] for r in records]
    scored = [r for r in records if r["status"] == "scored"]
    np.testing.assert_allclose([float(r["score"]) for r in rows[:len(scored)]],
                               [r["score"] for r in scored], rtol=1e-5)
    # speckled images rank above smooth ones
    top = [Path(r["file"]).parent.name for r in scored[:6]]
    assert top.count("abnormal") >= 5
    assert done["explained"].seen_png.is_file()
    assert kad.load_pipeline(done["thresholded"]).threshold.details["alpha"] <= 0.2
    assert "flagged" in capsys.readouterr().out
    # the export scores the same inputs as the model file (fitted on Keras, scored on
    # OpenVINO: within the network's float noise)
    exported = {r["file"]: r for r in done["exported"].records()}
    assert sorted(exported) == sorted(r["file"] for r in records)
    np.testing.assert_allclose([exported[r["file"]]["score"] for r in scored],
                               [r["score"] for r in scored], rtol=1e-3)


def test_records_become_a_dataframe_only_with_pandas(monkeypatch):
    import sys

    from kad.errors import KadError
    from kad.screening.results import NotScored, ScoredImage
    from kad.screening.workflow import ScoredImages

    found = ScoredImages([ScoredImage("a.png", 2.0, 90.0, True, None, 0.05)],
                         [NotScored("b.txt", "skipped", "not an image")])
    records = found.records()
    assert [r["status"] for r in records] == ["scored", "skipped"]
    assert records[1]["reason"] == "not an image" and records[1]["score"] is None
    pd = pytest.importorskip("pandas")
    frame = found.to_dataframe()
    assert list(frame["file"]) == ["a.png", "b.txt"] and frame["score"][0] == 2.0
    assert isinstance(frame, pd.DataFrame)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(KadError, match="needs pandas.*pip install pandas, or use records"):
        found.to_dataframe()
