"""A model file with a lesion maps model: ``kad fit --maps`` (by default for fundus
photographs), whose maps ``kad score --heatmaps`` and ``kad explain`` draw while the model
gives every score."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import MNV2
from kad.cli import app
from kad.errors import ArtifactError, KadError
from synthetic import screening_folder

pytestmark = pytest.mark.tf
runner = CliRunner()
#: Fundus preprocessing at the smallest sizes it takes (synthetic images have no fundus:
#: the recipe falls back to a centred square).
FUNDUS = {"backbone": MNV2, "weights": "none", "image_size": 32,
          "preprocessing": "fundus:size=32", "batch_size": 8, "runtime": "keras"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A model fitted on a fundus folder at kad fit's defaults for maps, and new images.
    The model file is read once for the module (its networks built once):
    ``load_pipeline`` hands back the same pipeline for the same file."""
    from kad.data.datasets import load_dataset
    from kad.screening import pipeline
    from kad.screening.workflow import fit_model
    from kad.utils.progress import Recorder

    root = tmp_path_factory.mktemp("lesion-maps")
    screening_folder(root / "fit", n_normal=16, n_abnormal=0, seed=3)
    screening_folder(root / "new", n_normal=2, n_abnormal=2, seed=4)
    dataset = load_dataset("folder", root / "fit")  # fundus photographs by default
    progress = Recorder()
    run = fit_model(dataset, root / "m.kad", progress=progress, **FUNDUS)
    run.progress = progress
    read, loaded = pipeline.load_pipeline, {}
    run.read = read  # for a test that changes the model it reads

    def once(path):
        if str(path) != str(root / "m.kad"):
            return read(path)
        if str(path) not in loaded:
            loaded[str(path)] = read(path)
        return loaded[str(path)]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_pipeline", once)
        yield root, run


def test_kad_fit_adds_the_lesion_maps_model_for_fundus_photographs(fitted):
    from kad.screening.pipeline import load_pipeline
    from kad.screening.workflow import FUNDUS_MAPS, MAPS_SCALE
    from kad.utils.artifact import read_manifest
    from kad.utils.specs import parse_spec

    root, run = fitted
    model = load_pipeline(root / "m.kad")
    maps = model.maps
    assert type(model.detector).__name__ == "KNNDetector"  # the scores stay kNN's
    assert maps is not None and maps.is_maps and maps.maps is None
    spec = parse_spec(FUNDUS_MAPS, "detector")
    assert type(maps.detector).__name__ == "PatchKNNDetector"
    assert maps.detector.get_params()["sampling"] == spec.options["sampling"]
    assert maps.image_size == MAPS_SCALE * model.image_size
    assert maps.preprocessing == model.preprocessing
    assert maps.training["n_images"] == model.training["n_images"]  # the same images
    named = [t for t in run.progress.tasks() if t.startswith("lesion maps model")]
    assert named == [f"lesion maps model ({FUNDUS_MAPS} at {maps.image_size} px)"]
    info = read_manifest(root / "m.kad")["info"]["maps"]
    assert info["detector"] == "PatchKNNDetector" and info["image_size"] == maps.image_size
    # the maps model scores as it did in memory: saved and read back exactly
    x = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
    fitted_maps = run.pipeline.maps
    inputs = fitted_maps.representation.assemble(
        fitted_maps.runner().predict(fitted_maps.input_scaling().preprocess(x * 255.0)))
    np.testing.assert_array_equal(fitted_maps.detector.anomaly_score(inputs),
                                  maps.detector.anomaly_score(inputs))


def test_score_heatmaps_draw_the_lesion_maps_and_keep_the_models_scores(fitted):
    import csv

    from kad.data.datasets import FileSource
    from kad.screening.heatmaps import explain
    from kad.screening.pipeline import load_pipeline
    from kad.screening.workflow import _maps_model

    root, _ = fitted
    drawn = runner.invoke(app, [str(a) for a in [
        "score", root / "m.kad", root / "new", "--heatmaps", "--out", root / "drawn"]])
    assert drawn.exit_code == 0, drawn.output
    assert "lesion maps model" in drawn.output

    model = load_pipeline(root / "m.kad")
    files = sorted((root / "new").rglob("*.png"))
    ids = [str(f) for f in files]
    own = dict(zip(ids, model.score(FileSource(files), ids).scores, strict=True))
    with open(root / "drawn" / "scores.csv", newline="") as fh:
        written = {row["file"]: float(row["score"]) for row in csv.DictReader(fh)
                   if row["status"] == "scored"}
    assert len(written) == len(files)  # every score is the model's own, not the maps'
    assert all(np.isclose(own[f], v, rtol=1e-5, atol=0) for f, v in written.items())

    for heat in explain(model.maps, FileSource(files), ids):
        [array] = [p for p in (root / "drawn" / "heatmaps").glob("*_map.npy")
                   if json.loads(p.with_suffix(".json").read_text())["image"] == heat.id]
        np.testing.assert_allclose(np.load(array, allow_pickle=False), heat.map,
                                   rtol=1e-5, atol=1e-6)
        sidecar = json.loads(array.with_suffix(".json").read_text())
        assert sidecar["model"] == f"{root / 'm.kad'} (its lesion maps model)"
    assert "its lesion maps model" in (root / "drawn" / "report.html").read_text()

    # a method named draws with the model itself, and no heatmaps need no maps model
    assert _maps_model(None, "gradient", 8, 2, None, model, True) is None
    assert _maps_model(None, "auto", 8, 2, None, model, False) is None
    assert _maps_model(None, "auto", 8, 2, None, model, True) is model.maps


def test_explain_draws_the_lesion_map_and_gives_the_models_score(fitted):
    from kad.data.datasets import FileSource
    from kad.screening.pipeline import load_pipeline

    root, _ = fitted
    image = sorted((root / "new" / "abnormal").glob("*.png"))[0]
    out = root / "explained.png"
    result = runner.invoke(app, ["explain", str(root / "m.kad"), str(image), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = load_pipeline(root / "m.kad")
    score = model.score(FileSource([image]), [str(image)]).scores[0]
    assert f"score {score:.4g}" in result.output
    assert "map by detector of" in result.output and "lesion maps model" in result.output
    assert json.loads(out.with_suffix(".json").read_text())["model"].endswith(
        "(its lesion maps model)")


def test_threshold_keeps_the_lesion_maps_model(fitted, tmp_path, monkeypatch):
    from kad.screening import pipeline
    from kad.screening.workflow import set_threshold

    root, run = fitted
    monkeypatch.setattr(pipeline, "load_pipeline", run.read)  # a fresh copy to change
    moved = tmp_path / "moved.kad"
    set_threshold(root / "m.kad", fpr=0.5, out_path=moved)
    before, after = run.read(root / "m.kad"), run.read(moved)
    assert after.threshold.value != before.threshold.value
    assert after.maps is not None
    np.testing.assert_array_equal(after.maps.detector.bank_, before.maps.detector.bank_)
    # the heatmap scale rests on the maps model's own threshold, which did not move: said so
    from kad.screening.calibration import fit_summary

    scale = [line for line in fit_summary(after).lines() if line.startswith("heatmap scale")]
    assert len(scale) == 1 and "the lesion maps model's own threshold" in scale[0]


def test_auto_maps_are_for_fundus_photographs_of_a_pooled_detector_and_none_for_none():
    from types import SimpleNamespace

    from kad.registry import get_detector
    from kad.screening.workflow import FUNDUS_MAPS, MapsRequest

    auto = MapsRequest.of("auto", None)
    knn, patch = get_detector("knn"), get_detector("patchknn")
    assert auto.spec_for(SimpleNamespace(preprocessing="fundus:size=256",
                                         detector=knn)) == FUNDUS_MAPS
    assert auto.spec_for(SimpleNamespace(preprocessing="natural", detector=knn)) is None
    # a patch kNN model draws its own maps: no second one (at twice its size) beside it
    assert auto.spec_for(SimpleNamespace(preprocessing="fundus:size=448",
                                         detector=patch)) is None
    assert MapsRequest.of("none", None) is None and MapsRequest.of(None, None) is None
    asked = MapsRequest.of("patchknn:n_neighbors=3", 512)
    assert asked.spec_for(SimpleNamespace(preprocessing="natural", detector=knn)) == \
        "patchknn:n_neighbors=3"
    assert asked.size == 512


@pytest.mark.parametrize("options, says", [
    (["--maps", "knn"], "draws no map of its own"),
    (["--maps", "none", "--maps-size", "64"], "--maps is none"),
    # auto fits no maps model here, so the size would be ignored
    (["--maps-size", "64", "--preprocessing", "natural"], "fits none for natural images"),
    (["--maps-size", "64", "--detector", "patchknn"], "draws its own maps"),
    (["--maps", "nosuchdetector"], "nosuchdetector"),
])
def test_a_maps_option_that_cannot_work_is_refused_before_any_work(tmp_path, options, says):
    screening_folder(tmp_path / "fit", n_normal=6, n_abnormal=0)
    out = tmp_path / "m.kad"
    result = runner.invoke(app, ["fit", "--data-dir", str(tmp_path / "fit"), "--out", str(out),
                                 "--cache-dir", str(tmp_path / "cache"),
                                 *[f"--{k.replace('_', '-')}={v}" for k, v in FUNDUS.items()],
                                 *options])
    assert result.exit_code == 1 and says in result.output, result.output
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_damaged_maps_record_is_refused_with_the_file_named(fitted, tmp_path):
    import zipfile

    from kad.screening.pipeline import load_pipeline
    from kad.utils.artifact import OBJECT, open_artifact, write_artifact

    root, _ = fitted
    artifact = open_artifact(root / "m.kad", kind="pipeline")
    tree = dict(artifact.tree)
    tree["maps"] = {"pipeline": tree["maps"]["pipeline"]}  # its detector gone
    with zipfile.ZipFile(root / "m.kad") as zf:
        members = {n: zf.read(n) for n in zf.namelist()
                   if n not in (OBJECT, "manifest.json") and "maps.detector" not in n}
    damaged = tmp_path / "damaged.kad"
    write_artifact(damaged, "pipeline", tree, members)
    with pytest.raises(ArtifactError, match="damaged.kad.*lesion maps model"):
        load_pipeline(damaged)


def test_an_export_leaves_the_lesion_maps_model_out_and_says_so(fitted, tmp_path):
    pytest.importorskip("openvino")
    from kad.screening.export import export_pipeline
    from kad.screening.pipeline import load_pipeline

    root, _ = fitted
    run = export_pipeline(root / "m.kad", tmp_path / "export")
    assert any("lesion maps model" in n for n in run.notes), run.notes
    assert load_pipeline(tmp_path / "export").maps is None
    with pytest.raises(KadError, match="lesion maps model"):
        load_pipeline(root / "m.kad").maps.save(tmp_path / "alone.kad")


def test_lesions_measures_the_lesion_maps_with_the_models_scores(fitted, tmp_path):
    import cv2

    from kad.data.datasets import FileSource
    from kad.screening.lesions import measure_lesions
    from kad.screening.pipeline import load_pipeline

    root, _ = fitted
    photos = sorted((root / "new" / "abnormal").glob("*.png"))
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in photos:
        mask = np.zeros(cv2.imread(str(path)).shape[:2], np.uint8)
        mask[8:20, 8:20] = 255
        cv2.imwrite(str(masks / f"{path.stem}_EX.png"), mask)
    run = measure_lesions(root / "m.kad", photos, masks, tmp_path / "out",
                          normals=[root / "new" / "normal"])
    assert run.summary.settings["maps"] == "its lesion maps model"
    assert run.method == "detector"  # patch kNN's own maps, not kNN's gradient
    model = load_pipeline(root / "m.kad")
    own = model.score(FileSource(photos), [str(p) for p in photos])
    measured = {r.id: r.score for r in run.results if r.status == "measured"}
    assert measured and all(np.isclose(measured[str(p)], s) for p, s in
                            zip(photos, own.scores, strict=True) if str(p) in measured)


def test_serve_draws_the_lesion_map_and_answers_the_models_score(fitted):
    from kad.data.datasets import FileSource
    from kad.screening.pipeline import load_pipeline
    from kad.serve.batching import BatchScorer
    from kad.serve.uploads import Upload

    root, _ = fitted
    photo = sorted((root / "new" / "abnormal").glob("*.png"))[0]
    model = load_pipeline(root / "m.kad")
    scorer = BatchScorer(model).start()
    try:
        [record] = scorer.submit([Upload(photo.name, photo.read_bytes())],
                                 heatmaps=True).result(timeout=120)
    finally:
        scorer.close()
    assert record["heatmap_method"] == "detector" and record["heatmap_png"]
    own = model.score(FileSource([photo]), [str(photo)]).scores[0]
    assert float(record["score"]) == pytest.approx(own)
