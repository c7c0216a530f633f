"""Every recipe through the CLI on small data with random weights; numbers are read from
results.json, not from the printed tables."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import FAST_CLI
from kad.cli import app
from synthetic import screening_folder

pytestmark = pytest.mark.tf
runner = CliRunner()
def _run(*args):
    result = runner.invoke(app, ["recipe", *args])
    assert result.exit_code == 0, result.output
    return result


def _results(folder):
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def screening(tmp_path_factory):
    return screening_folder(tmp_path_factory.mktemp("screening"))


def test_table1_on_digits_reports_every_column(tmp_path):
    out = tmp_path / "t1"
    _run("table1", "--dataset", "digits", *FAST_CLI, "--detectors", "iforest,knn",
         "--limit", "40", "--classes", "0,1,2", "--out", str(out))
    doc = _results(out)
    columns = {(r["detector"], r["input"]) for r in doc["summary"]}
    assert columns == {("iforest", "pixels"), ("iforest", "features"), ("knn", "pixels"),
                       ("knn", "features")}
    assert len(doc["runs"]) == 3 * 4
    for row in doc["summary"]:
        assert row["n_runs"] == 3 and 0.0 <= row["auprc"] <= 1.0
    pixels = next(r for r in doc["summary"] if r == r | {"detector": "knn", "input": "pixels"})
    assert pixels["auroc"] > 0.8  # digits are easy on pixels
    assert doc["cache"]["features"]["inputs"]["backbone"] == "mobilenet_v2:alpha=0.35"
    assert doc["versions"]["kad"] and (out / "results.csv").is_file()
    assert (out / "roc.png").stat().st_size > 1000


def test_the_same_seed_gives_the_same_numbers(tmp_path):
    args = ["table1", "--dataset", "digits", *FAST_CLI, "--limit", "30", "--classes", "3"]
    _run(*args, "--out", str(tmp_path / "a"))
    _run(*args, "--out", str(tmp_path / "b"))
    a, b = _results(tmp_path / "a"), _results(tmp_path / "b")
    assert [r["auroc"] for r in a["runs"]] == [r["auroc"] for r in b["runs"]]


def test_table1_medical_protocol_is_folds_times_seeds(screening, tmp_path):
    out = tmp_path / "m1"
    _run("table1", "--dataset", "folder:kind=natural", "--data-dir", str(screening), *FAST_CLI,
         "--inputs", "pixels", "--folds", "3", "--seeds", "2", "--out", str(out))
    doc = _results(out)
    assert len(doc["runs"]) == 6 and {r["seed"] for r in doc["runs"]} == {0, 1}
    assert doc["summary"][0]["auroc"] > 0.9  # speckle is easy to see


def test_table2_scores_every_block_and_picks_one(tmp_path):
    out = tmp_path / "t2"
    _run("table2", "--dataset", "digits", *FAST_CLI, "--limit", "40", "--classes", "0,7",
         "--n-anomalies", "10", "--out", str(out))
    doc = _results(out)
    assert doc["n_validation_anomalies"] == 10
    blocks = [b["block"] for b in doc["blocks"]]
    assert len(blocks) == 18 and blocks[-1] == "out_relu"
    assert set(doc["picked_blocks"]) <= set(blocks) and len(doc["picked_blocks"]) == 2
    picked_runs = [r for r in doc["runs"] if r["representation"] == "picked"]
    by_name = {b["block"]: b for b in doc["blocks"]}
    for i, (run, block) in enumerate(zip(picked_runs, doc["picked_blocks"], strict=True)):
        # the picked block has the best validation AUROC, and is reported on the test set
        best_val = max(b["val_auroc_per_split"][i] for b in doc["blocks"])
        assert by_name[block]["val_auroc_per_split"][i] == best_val
        assert run["auroc"] == by_name[block]["test_auroc_per_split"][i]
    assert {r["representation"] for r in doc["summary"]} == {"picked", "concat"}
    assert (out / "blocks.png").stat().st_size > 1000


def test_table3_mixes_each_ratio(screening, tmp_path):
    out = tmp_path / "t3"
    _run("table3", "--dataset", "folder:kind=natural", "--data-dir", str(screening), *FAST_CLI,
         "--ratios", "0.05,0.1", "--folds", "2", "--seeds", "1", "--out", str(out))
    doc = _results(out)
    assert sorted({r["ratio"] for r in doc["summary"]}) == [0.05, 0.1]
    for run in doc["runs"]:
        share = run["n_train_anomalies"] / run["n_train"]
        assert run["n_train_anomalies"] >= 1 and abs(share - run["ratio"]) < 0.02


def test_missing_weights_stop_the_main_job_with_one_clear_line(tmp_path, monkeypatch):
    from kad.errors import WeightsError
    from kad.features.backbones import Backbone

    def unavailable(self, shape):
        raise WeightsError("ImageNet weights for backbone inception_resnet_v2 are not "
                           "available: ... pass --weights PATH")

    monkeypatch.setattr(Backbone, "_build_imagenet", unavailable)
    result = runner.invoke(app, ["recipe", "table1", "--dataset", "digits", "--limit", "10",
                                 "--classes", "0", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "error:" in result.output and "--weights PATH" in result.output
    assert not (tmp_path / "x" / "results.json").exists()


def test_bad_options_are_one_clear_line():
    result = runner.invoke(app, ["recipe", "table1", "--dataset", "nope"])
    assert result.exit_code == 1 and "nope" in result.output
    result = runner.invoke(app, ["recipe", "table1", "--detectors", "iforrest", *FAST_CLI])
    assert result.exit_code == 1 and "Did you mean 'iforest'" in result.output


def test_the_recipe_backbone_reaches_the_supervised_upper_bound():
    from kad_recipes.common import make_detector

    defaults = {"backbone": "mobilenet_v2:alpha=0.35", "weights": "none"}
    det = make_detector("supervised", 3, defaults)
    assert det.backbone == "mobilenet_v2:alpha=0.35" and det.weights == "none"
    assert det.random_state == 3
    own = make_detector("supervised:backbone=inception_v3,random_state=9", 3, defaults)
    assert own.backbone == "inception_v3" and own.random_state == 9
    assert "backbone" not in make_detector("iforest", 0, defaults).get_params()


def test_table2_picks_a_size_block_detector_triple_and_caches_each_size_once(tmp_path,
                                                                            monkeypatch):
    from kad.features.backbones import Backbone
    from kad_recipes.common import RecipeOptions
    from kad_recipes.table2 import plot_candidates, run_table2

    built = []
    original = Backbone.build_extractor

    def counting(self, size, weights):
        built.append(size)
        return original(self, size, weights)

    monkeypatch.setattr(Backbone, "build_extractor", counting)
    options = RecipeOptions(dataset="digits", backbone="mobilenet_v2:alpha=0.35",
                            weights="none", image_size=[32, 48, 32],
                            detectors=["iforest:n_estimators=10", "knn"], limit=20,
                            classes=["7"], cache_dir=tmp_path / "cache",
                            runtime="keras")  # builds the network per extraction: countable
    result = run_table2(options, n_anomalies=10)
    assert sorted(built) == [32, 48]  # each size once, the repeated 32 too
    extra = result.extra
    assert extra["image_sizes"] == [32, 48]
    # 18 blocks + concat at each size, concat across sizes; two detectors each
    assert extra["grid"]["n_candidates"] == 2 * (2 * 19 + 1)
    by_label = {c["label"]: c for c in extra["candidates"]}
    for i, split in enumerate(extra["picked"]["per_split"]):
        best = max(c["val_auroc_per_split"][i] for c in extra["candidates"])
        row = by_label[split["picked"]["label"]]
        assert split["validation_auroc"] == row["val_auroc_per_split"][i] == best
        assert split["test_auroc"] == row["test_auroc_per_split"][i]
    assert sum(extra["picked"]["counts"].values()) == len(extra["picked"]["per_split"]) == 1
    # the paper's columns are still the first detector at the first size
    assert {r.representation for r in result.runs} >= {"picked", "concat"}
    assert {r.detector for r in result.runs if r.representation == "concat"} == {
        "iforest:n_estimators=10"}
    assert plot_candidates(tmp_path / "c.png", extra["candidates"], "t").stat().st_size > 1000
    keys = result.bench.cache_keys()["features_by_size"]
    assert sorted(keys) == [32, 48] and keys[32]["key"] != keys[48]["key"]
    built.clear()
    again = run_table2(options, n_anomalies=10)
    assert built == []  # both sizes come from the cache
    def picks(doc):  # timings aside, the same seed gives the same picks and numbers
        return [(s["picked"]["label"], s["validation_auroc"], s["test"]["auroc"])
                for s in doc["picked"]["per_split"]]

    assert picks(again.extra) == picks(extra)


def test_a_detector_of_block_maps_is_never_a_pixels_column_and_is_refused_before_any_work():
    from kad.errors import KadError
    from kad_plugins.patch_knn import PatchKNNDetector
    from kad_plugins.shallow import KNNDetector
    from kad_recipes.common import FEATURES, PIXELS, compatible, plan_columns

    # the recipes' features are pooled vectors; a detector of block maps takes neither
    assert not compatible(PatchKNNDetector, PIXELS)
    assert not compatible(PatchKNNDetector, FEATURES)
    assert compatible(KNNDetector, PIXELS) and compatible(KNNDetector, FEATURES)
    # the recipes pool every block, so it has no column: refused before any work
    with pytest.raises(KadError, match="patchknn scores unpooled block maps.*kad fit"):
        plan_columns(["knn", "patchknn"], [PIXELS, FEATURES])
    assert plan_columns(["knn"], [PIXELS, FEATURES]) == [("knn", PIXELS), ("knn", FEATURES)]
