"""``kad score --heatmaps --maps-from MAPS.kad``: scores from one model, heatmaps from another."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FAST
from kad.cli import app
from kad.errors import ImageReadError, KadError
from synthetic import screening_folder

pytestmark = pytest.mark.tf
runner = CliRunner()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A kNN model (scores) and a patch kNN model (maps), fitted on the same normals, and
    four new images. Each model file is read once for the module (its network built once):
    ``load_pipeline`` hands back the same pipeline for the same file."""
    from kad.data.datasets import load_dataset
    from kad.screening import pipeline
    from kad.screening.workflow import fit_model

    root = tmp_path_factory.mktemp("maps-from")
    screening_folder(root / "fit", n_normal=24, n_abnormal=0, seed=3)
    screening_folder(root / "new", n_normal=2, n_abnormal=2, seed=4)
    dataset = load_dataset("folder", root / "fit", kind="natural")
    fit_model(dataset, root / "screen.kad", heatmap_scale=False, runtime="keras", **FAST)
    fit_model(dataset, root / "lesions.kad", detector="patchknn:bank_size=500", runtime="keras",
              **FAST)
    read, loaded = pipeline.load_pipeline, {}

    def once(path):
        key = str(path)
        if key not in loaded:
            loaded[key] = read(path)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_pipeline", once)
        yield root


def _files(root):
    return sorted((root / "new").rglob("*.png"))


def test_scores_come_from_the_model_and_heatmaps_from_the_maps_model(two):
    from kad.data.datasets import FileSource
    from kad.screening.heatmaps import explain
    from kad.screening.pipeline import load_pipeline

    alone, mixed = two / "alone", two / "mixed"
    runner_args = ["score", two / "screen.kad", two / "new", "--heatmaps", "--steps", "2"]
    first = runner.invoke(app, [str(a) for a in [*runner_args, "--out", alone]])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [str(a) for a in [*runner_args, "--out", mixed,
                                                   "--maps-from", two / "lesions.kad"]])
    assert second.exit_code == 0, second.output
    assert f"from {two / 'lesions.kad'}" in second.output
    # every score, p-value and flag is the scoring model's, byte for byte
    assert (alone / "scores.csv").read_bytes() == (mixed / "scores.csv").read_bytes()

    files = _files(two)
    maps = explain(load_pipeline(two / "lesions.kad"), FileSource(files),
                   [str(f) for f in files])
    for heat in maps:
        [array] = [p for p in (mixed / "heatmaps").glob("*_map.npy")
                   if json.loads(p.with_suffix(".json").read_text())["image"] == heat.id]
        drawn = np.load(array, allow_pickle=False)
        np.testing.assert_allclose(drawn, heat.map, rtol=1e-5, atol=1e-6)
        sidecar = json.loads(array.with_suffix(".json").read_text())
        assert sidecar["model"] == str(two / "lesions.kad")
        own = np.load(alone / "heatmaps" / array.name, allow_pickle=False)
        assert own.shape != drawn.shape or not np.allclose(own, drawn)  # not the kNN's maps

    # the colour scale is anchored on the maps model's calibration normals, at its threshold
    from kad.screening.heatmap_scale import anchor

    page = (mixed / "report.html").read_text()
    assert f'The heatmaps come from {two / "lesions.kad"}' in page
    value = anchor(load_pipeline(two / "lesions.kad"), maps[0].method).value
    assert (f"anchored on the calibration normals of {two / 'lesions.kad'}: full colour at "
            f"{value:.3g}") in page
    assert 'id="maps-from"' not in (alone / "report.html").read_text()


def test_an_image_the_maps_model_cannot_read_is_listed_and_counts_add_up(two, monkeypatch):
    from kad.screening import heatmaps
    from kad.screening.pipeline import load_pipeline
    from kad.screening.workflow import UNREADABLE, score_images

    files = _files(two)
    refused = files[0]
    load = heatmaps._load

    def picky(explainer, source, index, size):
        if source.describe(index) == str(refused):
            raise ImageReadError(refused, "refused here")
        return load(explainer, source, index, size)

    monkeypatch.setattr(heatmaps, "_load", picky)
    maps = load_pipeline(two / "lesions.kad")
    found = score_images(two / "screen.kad", [two / "new"], heatmaps_dir=two / "picky",
                         maps_from=maps)
    assert len(found.rows) == len(files) - 1  # the other input, patients.csv, is skipped
    [out] = [o for o in found.not_scored if o.status == UNREADABLE]
    assert out.status == UNREADABLE and str(out.file) == str(refused)
    assert "refused here" in out.reason and "lesions.kad" in out.reason
    assert set(found.heatmaps.files) == {r.file for r in found.rows}


@pytest.mark.parametrize("extra, says", [
    ([], "add --heatmaps"),
    (["--heatmaps", "--engine", "ray"], "drop --engine ray or --maps-from"),
])
def test_maps_from_is_refused_before_any_work(two, extra, says):
    out = two / "refused"
    result = runner.invoke(app, [str(a) for a in [
        "score", two / "screen.kad", two / "new", "--out", out, "--maps-from",
        two / "lesions.kad", *extra]])
    assert result.exit_code == 1 and says in result.output, result.output
    assert not out.exists()


def test_a_maps_file_that_is_not_a_model_is_refused_before_scoring(two, monkeypatch):
    from kad.screening import workflow
    from kad.screening.pipeline import Pipeline

    bogus = two / "notes.kad"
    bogus.write_text("not a model")
    monkeypatch.setattr(Pipeline, "score", lambda *a, **k: pytest.fail("scored first"))
    with pytest.raises(KadError, match="notes.kad"):
        workflow.screen(two / "screen.kad", [two / "new"], two / "bogus", heatmaps=True,
                        maps_from=bogus)
    assert not (two / "bogus").exists()

