"""Plugins come from entry points: third-party ones work like built-ins, broken ones are
reported without breaking the listing, wrong kinds and duplicate names are refused."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import kad
from kad.errors import PluginError
from kad.registry import DETECTORS, clear_cache, discover, get_detector, list_detectors, load
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


def test_a_duplicate_name_is_an_error_naming_both(site, monkeypatch):
    install(site, "kad-clash", "2.0", {DETECTORS: {"iforest": "kad_clash_mod:Other"}})
    activate(site, monkeypatch)
    with pytest.raises(PluginError, match="declared twice") as info:
        discover(DETECTORS)
    assert "kad-clash 2.0" in str(info.value) and f"kad {kad.__version__}" in str(info.value)


def test_an_unknown_name_lists_the_available_ones():
    with pytest.raises(PluginError) as info:
        get_detector("iforrest")
    assert "Did you mean 'iforest'" in str(info.value)
    assert "knn" in str(info.value) and "mahalanobis" in str(info.value)


def test_detector_options_use_the_spec_spelling():
    det = get_detector("knn:n_neighbors=5,method=kth")
    assert det.n_neighbors == 5 and det.method == "kth"
