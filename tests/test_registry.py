"""Plugins come from entry points: third-party ones work like built-ins, broken ones are
reported without breaking the listing, wrong kinds and duplicate names are refused."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import kad
from kad.errors import PluginError, SpecError
from kad.registry import (
    DETECTORS,
    PluginWarning,
    clear_cache,
    discover,
    get_detector,
    list_detectors,
    load,
)
from plugin_env import activate, install, install_example

runner = CliRunner()


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site-packages"
    folder.mkdir()
    activate(folder, monkeypatch)
    yield folder
    clear_cache()


def _kad(*args):
    from kad.cli import app

    return runner.invoke(app, list(args))


def test_discovery_does_not_import_plugins():
    import sys

    clear_cache()
    sys.modules.pop("kad_plugins.shallow", None)
    assert "iforest" in discover(DETECTORS)
    assert "kad_plugins.shallow" not in sys.modules
    load(DETECTORS, "iforest")
    assert "kad_plugins.shallow" in sys.modules


def test_a_third_party_detector_works_like_a_builtin(site, monkeypatch):
    install_example(site)
    activate(site, monkeypatch)
    rows = {r.name: r for r in list_detectors()}
    assert rows["zscore"].ok and rows["zscore"].distribution == "kad-example-plugin"
    assert rows["zscore"].version == "0.3.0"
    result = _kad("detectors")
    assert result.exit_code == 0 and "zscore" in result.output
    rng = np.random.default_rng(0)
    det = get_detector("zscore").fit(rng.normal(size=(100, 4)))
    scores = det.anomaly_score(np.r_[rng.normal(size=(5, 4)), rng.normal(size=(5, 4)) + 6])
    assert scores[5:].min() > scores[:5].max()


def test_a_third_party_detector_runs_in_a_recipe(site, monkeypatch, tmp_path):
    install_example(site)
    activate(site, monkeypatch)
    result = _kad("recipe", "table1", "--dataset", "digits", "--inputs", "pixels",
                  "--detectors", "zscore", "--limit", "30", "--classes", "0,1",
                  "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    import json

    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert summary[0]["detector"] == "zscore" and summary[0]["auroc"] > 0.5


@pytest.mark.tf
def test_a_third_party_detector_of_block_maps_gets_them_from_a_pipeline(site, monkeypatch,
                                                                        tmp_path):
    """The public seam for detectors of maps: ``input_kind = "maps"`` and
    ``for_representation``; the pipeline builds the BlockMaps, fits, scores, saves and
    draws the detector's own heatmap, as for patch kNN."""
    from conftest import FAST
    from kad.data.datasets import FileSource, load_dataset
    from kad.screening.heatmaps import explain
    from synthetic import screening_folder

    install_example(site)
    activate(site, monkeypatch)
    root = screening_folder(tmp_path / "data", n_normal=12, n_abnormal=2, size=32)
    dataset = load_dataset("folder", root, kind="natural")
    pipeline = kad.fit_pipeline(dataset, detector="zmap",
                                representation="block_2_add,block_5_add",
                                cache_dir=tmp_path / "cache", **FAST)
    assert isinstance(pipeline.representation, kad.BlockMaps)
    # the layout reached the detector: the two blocks' channels, in order
    assert pipeline.detector.block_channels == pipeline.representation.channels == (8, 16)
    source = FileSource([root / i for i in dataset.ids[:3]])
    scores = pipeline.score(source).scores
    again = kad.load_pipeline(pipeline.save(tmp_path / "zmap.kad"))
    np.testing.assert_array_equal(again.score(source).scores, scores)
    drawn = explain(again, source)
    assert {d.method for d in drawn} == {"detector"}
    np.testing.assert_array_equal([d.score for d in drawn], scores)


def test_a_broken_plugin_is_reported_and_does_not_break_listing(site, monkeypatch):
    install(site, "kad-broken", "0.3.0", {DETECTORS: {"dagmm2": "kad_broken_mod:Detector"}},
            {"kad_broken_mod": "import not_a_real_module_xyz\n"})
    activate(site, monkeypatch)
    rows = {r.name: r for r in list_detectors()}
    assert "iforest" in rows and rows["iforest"].ok
    assert not rows["dagmm2"].ok and "ModuleNotFoundError" in rows["dagmm2"].status
    with pytest.raises(PluginError) as info:
        get_detector("dagmm2")
    message = str(info.value)
    assert 'failed to load detector plugin "dagmm2"' in message
    assert "kad-broken 0.3.0" in message and "kad_broken_mod:Detector" in message
    assert "not_a_real_module_xyz" in message
    result = _kad("detectors")
    assert result.exit_code == 0 and "broken" in result.output


def test_an_object_of_the_wrong_type_is_refused(site, monkeypatch):
    install(site, "kad-wrong", "1.0", {DETECTORS: {"notadetector": "kad_wrong_mod:make"}},
            {"kad_wrong_mod": "def make():\n    return 1\n"})
    activate(site, monkeypatch)
    with pytest.raises(PluginError, match="not a subclass of kad.BaseDetector"):
        load(DETECTORS, "notadetector")


def test_a_third_party_reusing_a_builtin_name_is_warned_and_the_builtin_kept(site, monkeypatch):
    install(site, "kad-clash", "2.0", {DETECTORS: {"iforest": "kad_clash_mod:Other"}})
    activate(site, monkeypatch)
    with pytest.warns(PluginWarning) as caught:
        found = discover(DETECTORS)
    message = str(caught[0].message)
    assert "kad-clash 2.0" in message and f"kad {kad.__version__}" in message
    assert found["iforest"].distribution == "kad" and len(found) > 5
    rng = np.random.default_rng(0)
    assert get_detector("iforest:n_estimators=10").fit(rng.normal(size=(50, 3))).threshold_


def test_two_third_parties_claiming_one_name_make_only_that_name_ambiguous(site, monkeypatch):
    install(site, "kad-one", "1.0", {DETECTORS: {"twin": "mod_one:Twin"}})
    install(site, "kad-two", "1.0", {DETECTORS: {"twin": "mod_two:Twin"}})
    activate(site, monkeypatch)
    with pytest.raises(PluginError, match="kad-one 1.0.*kad-two 1.0|kad-two 1.0.*kad-one 1.0"):
        get_detector("twin")
    rows = {r.name: r for r in list_detectors()}
    assert not rows["twin"].ok and rows["knn"].ok


def test_a_detector_option_typo_is_one_line_naming_the_option():
    with pytest.raises(SpecError, match="detector 'knn' has no option 'n_neighbour'.*"
                                        "did you mean 'n_neighbors'"):
        get_detector("knn:n_neighbour=3")
    result = _kad("recipe", "table1", "--dataset", "digits", "--inputs", "pixels",
                  "--detectors", "knn:n_neighbour=3", "--limit", "20")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "n_neighbour" in result.output and len(result.output.strip().splitlines()) <= 3


def test_an_unknown_name_lists_the_available_ones():
    with pytest.raises(PluginError) as info:
        get_detector("iforrest")
    assert "Did you mean 'iforest'" in str(info.value)
    assert "knn" in str(info.value) and "mahalanobis" in str(info.value)


def test_detector_options_use_the_spec_spelling():
    det = get_detector("knn:n_neighbors=5,method=kth")
    assert det.n_neighbors == 5 and det.method == "kth"
