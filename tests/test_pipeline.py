"""A fitted pipeline saved to one file scores exactly as in memory, in a new process too;
other versions, corrupt files and other weights are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from kad.artifact import read_manifest
from kad.datasets import FileSource, load_dataset
from kad.errors import ArtifactError, WeightsError
from kad.pipeline import fit_pipeline, load_pipeline, threshold_at_sensitivity
from synthetic import screening_folder

pytestmark = pytest.mark.tf
FAST = {"backbone": "mobilenet_v2:alpha=0.35", "weights": "none", "image_size": 32,
        "preprocessing": "natural"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = screening_folder(tmp_path_factory.mktemp("data"), n_normal=30, n_abnormal=10)
    dataset = load_dataset("folder", root, kind="natural")
    normal = np.flatnonzero(~dataset.anomaly)
    pipeline = fit_pipeline(dataset, train_rows=normal[:20], batch_size=8, **FAST)
    files = [root / i for i in dataset.ids]
    return pipeline, files, dataset


def test_saved_pipeline_describes_itself(fitted, tmp_path):
    pipeline, _, dataset = fitted
    path = pipeline.save(tmp_path / "model.kad")
    info = read_manifest(path)["info"]
    assert info["backbone"] == "mobilenet_v2:alpha=0.35" and info["image_size"] == 32
    assert info["training"]["fingerprint"] == dataset.fingerprint
    assert info["threshold"]["method"] == "contamination"
    assert info["versions"]["kad"] and len(info["blocks"]) == 18


def test_a_new_process_scores_exactly_as_the_fitted_pipeline(fitted, tmp_path):
    pipeline, files, _ = fitted
    in_memory = pipeline.score(FileSource(files)).scores
    path = pipeline.save(tmp_path / "model.kad")
    script = (
        "import json, sys; from kad.pipeline import load_pipeline; "
        "from kad.datasets import FileSource; from pathlib import Path; "
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


def test_another_version_or_a_corrupt_file_is_refused(fitted, tmp_path, monkeypatch):
    pipeline, _, _ = fitted
    path = pipeline.save(tmp_path / "model.kad")
    monkeypatch.setattr("kad.artifact.__version__", "9.9.9")
    with pytest.raises(ArtifactError, match="saved by kad 0.1.0 and this is kad 9.9.9"):
        load_pipeline(path)
    monkeypatch.undo()
    with zipfile.ZipFile(path) as zf:
        manifest, payload = zf.read("manifest.json"), bytearray(zf.read("payload.pkl"))
    payload[len(payload) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt.kad"
    with zipfile.ZipFile(corrupt, "w") as zf:
        zf.writestr("manifest.json", manifest)
        zf.writestr("payload.pkl", bytes(payload))
    with pytest.raises(ArtifactError, match="corrupt"):
        load_pipeline(corrupt)
    (tmp_path / "junk.kad").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="not a kad model file or is corrupt"):
        load_pipeline(tmp_path / "junk.kad")


def test_other_weights_are_refused(fitted, tmp_path):
    from kad.backbones import get_backbone

    pipeline, files, _ = fitted
    base = get_backbone("mobilenet_v2:alpha=0.35").build_base(32, "none")
    base.set_weights([w * 1.01 for w in base.get_weights()])
    other = tmp_path / "other.weights.h5"
    base.save_weights(other)
    with pytest.raises(WeightsError, match="not those this pipeline was fitted with"):
        load_pipeline(pipeline.save(tmp_path / "m.kad")).score(FileSource(files[:1]),
                                                                 weights=str(other))


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


def test_with_labels_fit_picks_size_block_and_detector_and_scores_with_them(tmp_path):
    from kad.errors import KadError

    root = screening_folder(tmp_path / "data", n_normal=24, n_abnormal=8)
    dataset = load_dataset("folder", root, kind="natural")
    normal, abnormal = np.flatnonzero(~dataset.anomaly), np.flatnonzero(dataset.anomaly)
    options = {**FAST, "image_size": [32, 48], "detector": ["knn", "iforest:n_estimators=10"]}
    rows = np.r_[normal[16:], abnormal]
    labels = np.r_[np.zeros(8, int), np.ones(8, int)]
    pipeline = fit_pipeline(dataset, train_rows=normal[:16], labelled_rows=rows, labels=labels,
                            representation="picked", batch_size=8, **options)
    chosen = pipeline.training["selection"]
    assert len(chosen["candidates"]) == 2 * 2 * 19  # per size: 18 blocks + concat
    best = max(c["validation_auroc"] for c in chosen["candidates"])
    assert chosen["picked_validation_auroc"] == best
    picked = chosen["picked_candidate"]
    assert pipeline.image_size == picked["sizes"][0]
    assert type(pipeline.detector).__name__ == (
        "KNNDetector" if picked["detector"] == "knn" else "IsolationForestDetector")
    assert pipeline.blocks == (pipeline.all_blocks if picked["block"] == "concat"
                               else [picked["block"]])
    scores = pipeline.score(FileSource([root / dataset.ids[i] for i in rows])).scores
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(labels, scores) == pytest.approx(best)
    with pytest.raises(KadError, match="2 image sizes and 2 detectors given but nothing to "
                                       "choose with"):
        fit_pipeline(dataset, train_rows=normal[:16], batch_size=8, **options)
