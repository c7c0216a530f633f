"""int8 networks (``kad fit --precision int8``, :mod:`kad.features.int8`): close to float32,
recorded in the model file, scored on the same int8 network after saving and exporting,
keyed by their calibration images, refused before any work where they cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import kad
import kad.features.int8 as int8
import kad.features.runtime as runtime
from conftest import FAST
from kad.cli import app
from kad.data.datasets import FileSource, load_dataset
from kad.errors import KadError, MissingDependencyError
from kad.features.extract import extract_features, plan_extraction
from kad.features.extraction import plan_quantization
from kad.features.runtime import openvino_model_dir
from kad.screening.export import export_pipeline
from kad.screening.fitting import fit_pipeline
from kad.screening.heatmaps import explain
from synthetic import screening_folder

pytestmark = pytest.mark.tf

#: Largest relative error (Frobenius, per block) of int8 features against float32 ones on
#: the synthetic images with the fast network, on the blocks whose float32 features are
#: not vanishingly small (random weights shrink the deeper blocks' features below 1e-6,
#: where 8 bits keep nothing): measured 0.11-0.13; a broken quantization (ranges from the
#: wrong images, a lost input scaling, the float network) is off by far more or by 0.
#: ``benchmarks/int8.py`` measures real weights on real images.
TOLERANCE = 0.25


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """An int8 pipeline fitted on synthetic normals, its dataset, files, cache and scores."""
    pytest.importorskip("nncf")
    root = tmp_path_factory.mktemp("int8")
    data = screening_folder(root / "data", n_normal=14, n_abnormal=4)
    dataset = load_dataset("folder", data, kind="natural")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAD_CACHE_DIR", str(root / "cache"))
        pipeline = fit_pipeline(dataset, detector="knn", precision="int8", **FAST)
        files = [data / i for i in dataset.ids]
        scores = pipeline.score(FileSource(files)).scores
    return pipeline, dataset, files, root, scores


def test_int8_features_are_close_to_float32_and_come_from_a_quantized_graph(
        fitted, monkeypatch):
    pipeline, dataset, _, root, _ = fitted
    monkeypatch.setenv("KAD_CACHE_DIR", str(root / "cache"))
    small = {k: v for k, v in FAST.items() if k != "batch_size"}
    quantized = extract_features(dataset, runtime="openvino", batch_size=8, quantization=int8
                                 .Quantization.from_record(pipeline.quantization), **small)
    float32 = extract_features(dataset, runtime="openvino", batch_size=8, **small)
    assert quantized.path != float32.path  # features of the two networks never mix
    blocks = [b for b in float32.blocks if np.abs(float32.matrix(b)).max() > 1e-3]
    assert len(blocks) >= 3
    errors = [np.linalg.norm(quantized.matrix(b) - float32.matrix(b))
              / np.linalg.norm(float32.matrix(b)) for b in blocks]
    assert 0 < min(errors) and max(errors) < TOLERANCE
    runner = pipeline.runner()
    assert runner.precision == "int8"
    types = {op.get_rt_info()["runtimePrecision"].astype(str) for op in
             runner.compiled.get_runtime_model().get_ops()
             if "runtimePrecision" in op.get_rt_info()}
    assert types & {"u8", "i8"}  # layers of the compiled network really run in 8 bits
    # The representation's network is the int8 extractor with its outputs: the features
    # the model was fitted on are those it scores with.
    got = np.concatenate(runner.predict(_inputs(pipeline, dataset, np.arange(8))), axis=1)
    np.testing.assert_allclose(got, quantized.matrix(pipeline.blocks)[:8], rtol=1e-5,
                               atol=1e-6)


def _inputs(pipeline, dataset, rows):
    from kad.features.extraction import _load_batch

    plan = plan_extraction(dataset, pipeline.backbone, "none", pipeline.image_size,
                           pipeline.preprocessing, runtime="openvino")
    return _load_batch(dataset.source, dataset.ids, plan, int(rows[0]), int(rows[-1]) + 1)[1]


def test_the_model_file_records_int8_and_scores_as_in_memory(fitted, monkeypatch):
    pipeline, _, files, root, scores = fitted
    monkeypatch.setenv("KAD_CACHE_DIR", str(root / "cache"))
    record = pipeline.quantization
    assert record["precision"] == "int8" and record["images"] == 14  # every normal
    assert pipeline.describe()["precision"] == "int8"
    loaded = kad.load_pipeline(pipeline.save(root / "int8.kad"))
    assert loaded.quantization == record
    np.testing.assert_array_equal(loaded.score(FileSource(files)).scores, scores)
    with pytest.raises(KadError, match="int8 features.*not on runtime 'keras'"):
        loaded.score(FileSource(files[:1]), runtime="keras")
    found = explain(loaded, FileSource(files[:1]), grid=2)[0]
    assert found.method == "occlusion"  # auto: the int8 network gives no block maps
    assert found.score == pytest.approx(scores[0], rel=1e-5)
    with pytest.raises(KadError, match="int8 network.*--heatmap-method occlusion"):
        explain(loaded, FileSource(files[:1]), method="gradient")
    # Elsewhere (another cache), the int8 network is refused, never replaced by another.
    monkeypatch.setenv("KAD_CACHE_DIR", str(root / "elsewhere"))
    monkeypatch.setattr(runtime, "_CONVERTED", {})  # a new process: nothing to copy from
    with pytest.raises(KadError, match="not in the cache.*kad export"):
        kad.load_pipeline(root / "int8.kad").score(FileSource(files[:1]))


def test_an_export_carries_the_int8_network(fitted, monkeypatch):
    pipeline, _, files, root, scores = fitted
    monkeypatch.setenv("KAD_CACHE_DIR", str(root / "cache"))
    run = export_pipeline(pipeline, root / "exported")
    marker = json.loads((run.path / "kad-export.json").read_text())
    assert marker["precision"] == "int8"
    monkeypatch.setenv("KAD_CACHE_DIR", str(root / "empty"))  # the export needs no cache
    loaded = kad.load_pipeline(run.path)
    np.testing.assert_allclose(loaded.score(FileSource(files)).scores, scores, rtol=1e-5)


def test_the_int8_key_changes_with_the_calibration_images(fitted):
    _, dataset, _, _, _ = fitted
    plan = plan_extraction(dataset, runtime="openvino", **{k: v for k, v in FAST.items()
                                                           if k != "batch_size"})
    assert "int8" not in plan.inputs  # float32 keys are what they were
    keys = {plan_quantization(dataset, rows, plan).key
            for rows in (np.arange(10), np.arange(1, 11), np.arange(10)[::2])}
    assert len(keys) == 3
    same = plan_quantization(dataset, np.arange(10), plan)
    assert same.key in keys  # the same images, the same key
    other = plan_quantization(dataset, np.arange(1, 11), plan)
    dirs = {openvino_model_dir(plan.backbone, 32, "none", quantization=q) for q in (same, other)}
    assert len(dirs | {openvino_model_dir(plan.backbone, 32, "none")}) == 3
    assert int8.calibration_rows(np.arange(1000), 300).tolist() == sorted(
        set(int8.calibration_rows(np.arange(1000), 300).tolist()))
    assert len(int8.calibration_rows(np.arange(1000), 300)) == 300


def test_int8_is_refused_before_any_work_where_it_cannot_run(tmp_path, monkeypatch):
    data = screening_folder(tmp_path / "data", n_normal=4, n_abnormal=0)
    dataset = load_dataset("folder", data, kind="natural")
    cache = tmp_path / "cache"
    monkeypatch.setenv("KAD_CACHE_DIR", str(cache))
    with pytest.raises(KadError, match="not on runtime 'keras'"):
        fit_pipeline(dataset, precision="int8", runtime="keras", **FAST)
    with pytest.raises(KadError, match="reads block maps"):
        fit_pipeline(dataset, detector="patchknn", precision="int8", **FAST)
    with pytest.raises(KadError, match="unknown precision 'int4'"):
        fit_pipeline(dataset, precision="int4", **FAST)
    monkeypatch.setattr(int8, "nncf_available", lambda: False)
    with pytest.raises(MissingDependencyError, match=r'pip install "kad\[int8\]"'):
        fit_pipeline(dataset, precision="int8", **FAST)
    out = CliRunner().invoke(app, ["fit", "--data-dir", str(data), "--out",
                                   str(tmp_path / "m.kad"), "--precision", "int8"])
    assert out.exit_code == 1 and 'pip install "kad[int8]"' in out.output
    assert not cache.exists() and not (tmp_path / "m.kad").exists()
