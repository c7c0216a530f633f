"""Model files survive upgrades: a file loads in any kad that reads its format and its
detector's state version, whatever kad version wrote it, and is refused in one line naming
the versions otherwise. ``tests/fixtures/`` keeps files written by earlier releases; each
must keep loading and scoring to the numbers stored beside it."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_artifact import _rewrite, _tree

import kad
from kad.detectors.base import load_detector
from kad.errors import ArtifactError
from kad.registry import discover, get_detector
from kad.utils.artifact import FORMAT
from synthetic import pattern_images

FIXTURES = Path(__file__).parent / "fixtures"
X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)


def _next_release(monkeypatch, version: str = "0.2.0") -> None:
    """kad as the next release would be: another package version, read both where kad
    records it and from the installed metadata of its plugins."""
    monkeypatch.setattr(kad, "__version__", version)
    monkeypatch.setattr("kad.utils.artifact.__version__", version)

    def bumped(group):
        return {name: dataclasses.replace(info, version=version) if info.builtin else info
                for name, info in discover(group).items()}

    monkeypatch.setattr("kad.registry.discover", bumped)


def _with_manifest(src: Path, dst: Path, **changes) -> Path:
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members["manifest.json"])
    manifest.update(changes)
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def test_a_file_of_another_kad_version_loads_and_scores_the_same(tmp_path, monkeypatch):
    det = get_detector("knn").fit(X)
    path = det.save(tmp_path / "d.kad")
    _next_release(monkeypatch)
    again = load_detector(path)
    np.testing.assert_array_equal(again.anomaly_score(X), det.anomaly_score(X))
    # and the other way round: an older kad reads what the newer one writes
    newer = again.save(tmp_path / "newer.kad")
    monkeypatch.undo()
    np.testing.assert_array_equal(load_detector(newer).anomaly_score(X), det.anomaly_score(X))


def test_another_format_is_refused_naming_the_versions_and_what_to_do(tmp_path):
    path = get_detector("knn").fit(X).save(tmp_path / "d.kad")
    other = _with_manifest(path, tmp_path / "f.kad", format=FORMAT + 1,
                           versions={"kad": "0.7.1"})
    message = (f"{other} is a kad model file of format {FORMAT + 1}, written by kad 0.7.1; "
               f"this kad {kad.__version__} reads format {FORMAT}: refit the model with "
               "`kad fit`, or load it with kad 0.7.1")
    with pytest.raises(ArtifactError) as caught:
        load_detector(other)
    assert str(caught.value) == message


def test_another_state_version_is_refused_unless_the_detector_upgrades_it(tmp_path,
                                                                         monkeypatch):
    det = get_detector("knn").fit(X)
    path = det.save(tmp_path / "d.kad")
    assert _tree(path)["detector"]["state_version"] == 1
    cls = type(det)
    monkeypatch.setattr(cls, "state_version", 2)
    with pytest.raises(ArtifactError) as caught:
        load_detector(path)
    assert str(caught.value) == (
        f"{path}: the detector 'knn' holds its learned state in version 1 (written by kad "
        f"{kad.__version__}), and this kad {kad.__version__} reads version 2 of it: refit the "
        f"model with `kad fit`, or load it with kad {kad.__version__}")
    seen = []

    def upgrade(klass, state, version):
        seen.append(version)
        return state

    monkeypatch.setattr(cls, "upgrade_fitted_state", classmethod(upgrade))
    np.testing.assert_array_equal(load_detector(path).anomaly_score(X), det.anomaly_score(X))
    assert seen == [1]
    # a file of a newer state version than this kad's is never "upgraded"
    monkeypatch.setattr(cls, "state_version", 1)
    tree = _tree(path)
    tree["detector"]["state_version"] = 3
    with pytest.raises(ArtifactError, match="state in version 3 .* reads version 1 of it"):
        load_detector(_rewrite(path, tmp_path / "newer.kad", tree=tree))
    assert seen == [1]


@pytest.mark.parametrize("value", [0, -1, "1", 1.0, True, None, [1]])
def test_a_malformed_state_version_is_refused(tmp_path, value):
    path = get_detector("knn").fit(X).save(tmp_path / "d.kad")
    tree = _tree(path)
    tree["detector"]["state_version"] = value
    with pytest.raises(ArtifactError, match="state_version is .*, not a positive integer"):
        load_detector(_rewrite(path, tmp_path / "bad.kad", tree=tree))


def test_a_record_without_a_state_version_is_version_1(tmp_path):
    det = get_detector("knn").fit(X)
    path = det.save(tmp_path / "d.kad")
    tree = _tree(path)
    del tree["detector"]["state_version"]
    old = load_detector(_rewrite(path, tmp_path / "old.kad", tree=tree))
    np.testing.assert_array_equal(old.anomaly_score(X), det.anomaly_score(X))


@pytest.mark.tf
@pytest.mark.parametrize("fixture", sorted(FIXTURES.glob("model-*.kad")), ids=lambda p: p.stem)
def test_a_model_file_of_an_earlier_release_scores_the_same(fixture, tmp_path, monkeypatch):
    expected = json.loads(fixture.with_suffix(".json").read_text())
    _next_release(monkeypatch, "99.0.0")
    pipeline = kad.load_pipeline(fixture)
    assert pipeline.versions["kad"] == expected["kad"]
    files = pattern_images(tmp_path / "patterns")
    assert [f.name for f in files] == expected["ids"]
    scores = pipeline.score(kad.FileSource(files)).scores
    # The file's numbers are exact; the network's float32 arithmetic may move in the last
    # digits with another TensorFlow or oneDNN release.
    np.testing.assert_allclose(scores, expected["scores"], rtol=1e-4)
    assert pipeline.threshold.value == expected["threshold"]
    np.testing.assert_array_equal(pipeline.p_values(np.asarray(expected["scores"])),
                                  expected["p_values"])


@pytest.mark.tf
def test_a_model_file_of_an_earlier_release_draws_heatmaps_on_the_report_s_own_scale(
        tmp_path):
    """Files written before fitting kept the calibration normals' heatmaps: their reports
    scale on their own maps, and the legend says why."""
    from kad.screening.workflow import screen

    files = pattern_images(tmp_path / "patterns")
    run = screen(FIXTURES / "model-0.1.0.kad", files, tmp_path / "out", heatmaps=True)
    page = run.report.read_text()
    assert page.count('"pics":"tmhp"') == len(files)  # every heatmap drawn
    assert "not anchored on the calibration normals" in page
    assert "holds no heatmaps of its calibration normals" in page
    assert "above what healthy" not in page and "within what healthy" not in page


def test_a_model_file_scores_with_the_preprocessing_revision_it_was_fitted_with(recwarn):
    """A file without the revision was written before kad recorded it: natural images were
    then resized in float32, and it is scored that way; a recipe whose earlier revision
    kad no longer computes scores with today's and a warning says so; a recorded revision
    that kad computes is used as it is, silently."""
    from kad.data.preprocessing import get_preprocessing
    from kad.screening.pipeline import PreprocessingRevisionWarning, _preprocessing_as_fitted

    old = {"kad": "0.1.0"}
    assert _preprocessing_as_fitted("natural", old, "m.kad") == "natural:resize=float"
    assert old["preprocessing_revision"] == "2"  # saved again, it stays float32
    assert _preprocessing_as_fitted("natural:resize=float", old, "m.kad") == \
        "natural:resize=float"
    now = {"preprocessing_revision": str(get_preprocessing("natural").revision)}
    assert _preprocessing_as_fitted("natural", now, "m.kad") == "natural"
    fundus = str(get_preprocessing("fundus").revision)
    assert _preprocessing_as_fitted("fundus", {"preprocessing_revision": fundus}, "m") == \
        "fundus"
    assert not recwarn.list
    with pytest.warns(PreprocessingRevisionWarning, match=r"m\.kad .*revision 3 of the "
                      r"fundus preprocessing .*refit with kad fit"):
        assert _preprocessing_as_fitted("fundus:size=448", {"preprocessing_revision": "3"},
                                        "m.kad") == "fundus:size=448"
    with pytest.warns(PreprocessingRevisionWarning, match=r"an earlier revision \(kad 0\.1"):
        _preprocessing_as_fitted("fundus", {"kad": "0.1.0"}, "m.kad")


def test_natural_resizes_as_8_bits_or_as_float32_as_asked():
    from kad.data.preprocessing import get_preprocessing
    from kad.features.extraction import preprocess_image

    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    eight, floats = (preprocess_image(rgb, get_preprocessing(s), 32)
                     for s in ("natural", "natural:resize=float"))
    np.testing.assert_array_equal(eight * 255, np.round(eight * 255))  # grey levels
    assert not np.array_equal(floats * 255, np.round(floats * 255))
    assert np.abs(eight - floats).max() <= 1 / 255  # within a grey level


def test_fixtures_are_kept_small():
    """Each is a file users may hold, kept for good: a few hundred KB at most."""
    fixtures = sorted(FIXTURES.glob("model-*.kad"))
    assert fixtures, f"no model file in {FIXTURES}: run tests/fixtures/make_fixtures.py"
    assert all(f.stat().st_size < 400_000 and f.with_suffix(".json").is_file()
               for f in fixtures)
