"""A fitted pipeline saved to one file scores exactly as in memory, in a new process too;
corrupt files and other weights are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import FAST, MNV2
from kad.data.datasets import FileSource, load_dataset
from kad.errors import ArtifactError, WeightsError
from kad.screening.fitting import fit_pipeline
from kad.screening.pipeline import load_pipeline
from kad.screening.thresholds import threshold_at_sensitivity
from kad.utils.artifact import read_manifest
from synthetic import screening_folder

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = screening_folder(tmp_path_factory.mktemp("data"), n_normal=30, n_abnormal=10)
    dataset = load_dataset("folder", root, kind="natural")
    normal = np.flatnonzero(~dataset.anomaly)
    pipeline = fit_pipeline(dataset, train_rows=normal[:20], **FAST)
    files = [root / i for i in dataset.ids]
    return pipeline, files, dataset


def test_saved_pipeline_describes_itself(fitted, tmp_path):
    pipeline, _, dataset = fitted
    path = pipeline.save(tmp_path / "model.kad")
    info = read_manifest(path)["info"]
    assert info["backbone"] == MNV2 and info["image_size"] == 32
    assert info["training"]["fingerprint"] == dataset.fingerprint
    assert info["threshold"]["method"] == "contamination"
    assert info["versions"]["kad"] and len(info["blocks"]) == 18


def test_a_new_process_scores_exactly_as_the_fitted_pipeline(fitted, tmp_path):
    pipeline, files, _ = fitted
    in_memory = pipeline.score(FileSource(files)).scores
    path = pipeline.save(tmp_path / "model.kad")
    script = (
        "import json, sys; from kad.screening.pipeline import load_pipeline; "
        "from kad.data.datasets import FileSource; from pathlib import Path; "
        "p = load_pipeline(sys.argv[1]); "
        "s = p.score(FileSource([Path(f) for f in sys.argv[2:]])).scores; "
        "print(json.dumps([float(x).hex() for x in s]))"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path), *map(str, files)],
                          capture_output=True, text=True, check=True)
    other = np.array([float.fromhex(x) for x in json.loads(done.stdout.strip().splitlines()[-1])])
    np.testing.assert_array_equal(other, in_memory)
    # and the same images score the same on their own as inside a larger batch
    alone = pipeline.score(FileSource(files[3:4])).scores
    assert alone[0] == in_memory[3]


def test_scoring_runs_on_the_runtime_of_the_training_features(tmp_path):
    """A distance-based detector sees float-noise differences between runtimes: scoring
    the training images gives exactly what the detector gives on the cached features."""
    from kad.features.extract import extract_features
    from kad.features.runtime import resolve_runtime

    root = screening_folder(tmp_path / "data", n_normal=12, n_abnormal=4)
    dataset = load_dataset("folder", root, kind="natural")
    pipeline = fit_pipeline(dataset, detector="knn", **FAST)
    assert pipeline.runtime == resolve_runtime("auto").name
    assert pipeline.describe()["runtime"] == pipeline.runtime
    features = extract_features(dataset, **FAST)  # the cached entry
    expected = pipeline.detector.anomaly_score(features.matrix(pipeline.blocks))
    got = pipeline.score(FileSource([root / i for i in dataset.ids])).scores
    np.testing.assert_array_equal(got, expected)


def test_scores_separate_the_speckled_images(fitted):
    from sklearn.metrics import roc_auc_score

    pipeline, files, dataset = fitted
    scores = pipeline.score(FileSource(files)).scores
    held_out = np.r_[np.flatnonzero(~dataset.anomaly)[20:], np.flatnonzero(dataset.anomaly)]
    assert roc_auc_score(dataset.anomaly[held_out], scores[held_out]) > 0.9


def test_unreadable_images_are_listed_and_the_rest_scored(fitted, tmp_path):
    pipeline, files, _ = fitted
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = pipeline.score(FileSource([files[0], bad, files[1]]), ids=["a", "b", "c"])
    assert list(result.failed) == ["b"] and np.isnan(result.scores[1])
    assert np.isfinite(result.scores[[0, 2]]).all()


def test_a_corrupt_file_is_refused(fitted, tmp_path):
    pipeline, _, _ = fitted
    path = pipeline.save(tmp_path / "model.kad")
    with zipfile.ZipFile(path) as zf:
        members = {name: bytearray(zf.read(name)) for name in zf.namelist()}
    member = [n for n in members if n.startswith(("sklearn/", "arrays/"))][0]
    members[member][len(members[member]) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt.kad"
    with zipfile.ZipFile(corrupt, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, bytes(data))
    with pytest.raises(ArtifactError, match=f"corrupt: its member {member} does not match"):
        load_pipeline(corrupt)
    (tmp_path / "junk.kad").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="not a kad model file or is corrupt"):
        load_pipeline(tmp_path / "junk.kad")


def test_other_weights_are_refused(fitted, tmp_path):
    from kad.features.backbones import get_backbone

    pipeline, files, _ = fitted
    base = get_backbone(MNV2).build_base(32, "none")
    base.set_weights([w * 1.01 for w in base.get_weights()])
    other = tmp_path / "other.weights.h5"
    base.save_weights(other)
    with pytest.raises(WeightsError, match="not those this pipeline was fitted with"):
        load_pipeline(pipeline.save(tmp_path / "m.kad")).score(FileSource(files[:1]),
                                                                 weights=str(other))


def test_a_weights_file_is_recorded_by_absolute_path_and_can_be_overridden(tmp_path,
                                                                            monkeypatch):
    from kad.features.backbones import get_backbone

    folder = tmp_path / "weights"
    folder.mkdir()
    get_backbone(MNV2).build_base(32, "none").save_weights(
        folder / "mobilenet.weights.h5")
    root = screening_folder(tmp_path / "data", n_normal=12, n_abnormal=2)
    dataset = load_dataset("folder", root, kind="natural")
    files = [root / i for i in dataset.ids[:4]]
    monkeypatch.chdir(folder)
    pipeline = fit_pipeline(dataset, train_rows=np.flatnonzero(~dataset.anomaly),
                            **{**FAST, "weights": "mobilenet.weights.h5"})
    assert pipeline.weights == str((folder / "mobilenet.weights.h5").resolve())
    model = pipeline.save(tmp_path / "model.kad")
    in_memory = pipeline.score(FileSource(files)).scores
    monkeypatch.chdir(tmp_path)
    moved = (folder / "mobilenet.weights.h5").rename(tmp_path / "elsewhere.weights.h5")
    with pytest.raises(WeightsError, match=r"weights file .*mobilenet.weights.h5, whose path came "
                                           r"from the model file .*model.kad, cannot be found nor "
                                           r"beside it .*; "
                                           r"pass --weights PATH"):
        load_pipeline(model).score(FileSource(files))
    again = load_pipeline(model).score(FileSource(files), weights=str(moved)).scores
    np.testing.assert_array_equal(again, in_memory)
    # a model shipped with its weights file beside it finds it there, checked by fingerprint
    moved.rename(tmp_path / "mobilenet.weights.h5")
    shipped = load_pipeline(model).score(FileSource(files)).scores
    np.testing.assert_array_equal(shipped, in_memory)


def test_threshold_at_a_sensitivity():
    normal = np.arange(100, dtype=float)          # 0 … 99
    anomalous = np.arange(50, 150, 5, dtype=float)  # 20 values, 50 … 145
    t = threshold_at_sensitivity(normal, anomalous, 0.9)
    assert t.details["sensitivity"] >= 0.9
    assert (anomalous > t.value).mean() == t.details["sensitivity"] == 0.9
    assert t.details["specificity"] == (normal <= t.value).mean() == 0.6
    low, high = t.details["specificity_ci95"]
    assert low < 0.6 < high
    with pytest.raises(ValueError, match="sensitivity"):
        threshold_at_sensitivity(normal, anomalous, 1.5)
