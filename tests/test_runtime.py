"""The extraction runtimes: choosing one, OpenVINO's agreement with Keras, its model cache."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import kad.features.runtime as runtime
from conftest import KAGGLE_DR, MNV2, MOBILENET_WEIGHTS, need
from kad.errors import KadError, MissingDependencyError
from kad.features.backbones import Backbone, get_backbone

# ------------------------------------------------------------------ choosing a runtime


def test_auto_is_openvino_on_a_cpu_with_openvino(monkeypatch):
    monkeypatch.setattr(runtime, "gpu_visible", lambda: False)
    monkeypatch.setattr(runtime, "openvino_available", lambda: True)
    assert runtime.resolve_runtime("auto").name == "openvino"
    assert runtime.resolve_runtime("keras").name == "keras"


def test_auto_is_keras_where_a_gpu_is_visible_or_openvino_absent(monkeypatch):
    monkeypatch.setattr(runtime, "openvino_available", lambda: True)
    monkeypatch.setattr(runtime, "gpu_visible", lambda: True)
    assert runtime.resolve_runtime("auto").name == "keras"
    monkeypatch.setattr(runtime, "gpu_visible", lambda: False)
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    choice = runtime.resolve_runtime("auto")
    assert choice.name == "keras" and "not installed" in choice.reason


def test_openvino_requested_but_absent_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="--runtime keras"):
        runtime.resolve_runtime("openvino")


def test_unknown_runtime_names_the_choices():
    with pytest.raises(KadError, match="'tflite'.*auto, keras, openvino"):
        runtime.resolve_runtime("tflite")


def test_hidden_gpus_are_not_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not runtime.gpu_visible()


# ------------------------------------------------------------------------- OpenVINO

openvino_needed = pytest.mark.skipif(not runtime.openvino_available(),
                                     reason="OpenVINO is not installed")


def _fundus_batch(size: int, n: int = 8) -> np.ndarray:
    """``n`` real fundus photographs as the network sees them."""
    from kad.data.datasets import load_dataset
    from kad.data.preprocessing import Fundus
    from kad.features.extract import load_preprocessed

    dr = load_dataset("dr", need(KAGGLE_DR))
    rows = np.r_[np.flatnonzero(~dr.anomaly)[: n // 2], np.flatnonzero(dr.anomaly)[: n - n // 2]]
    x = np.stack([load_preprocessed(dr.source, int(i), Fundus(), size) for i in rows])
    return get_backbone(MNV2).preprocess(x)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.mark.tf
@pytest.mark.shared
@openvino_needed
def test_openvino_features_agree_with_keras_float32_on_real_images(model_cache):
    need(MOBILENET_WEIGHTS)
    x = _fundus_batch(96)
    keras_rt = runtime.build_runtime(MNV2, 96, MOBILENET_WEIGHTS, "keras", 8)
    ov_rt = runtime.build_runtime(MNV2, 96, MOBILENET_WEIGHTS, "openvino", 8, model_cache)
    assert ov_rt.names == keras_rt.names and ov_rt.dims == keras_rt.dims
    expected, got = keras_rt.predict(x), ov_rt.predict(x)
    for name, a, b in zip(keras_rt.names, expected, got, strict=True):
        assert b.dtype == np.float32 and b.shape == a.shape
        scale = np.abs(a).max()
        assert scale > 0
        error = np.abs(a - b).max() / scale
        assert error < 1e-4, f"block {name}: OpenVINO differs by {error:.1e} of its scale"


@pytest.mark.tf
@openvino_needed
def test_openvino_scales_8_bit_images_inside_the_network_as_the_loader_does(model_cache):
    from kad.features.extraction import network_input

    engine = runtime.build_runtime(MNV2, 32, "none", "openvino", 8, model_cache)
    assert engine.takes_pixels
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    expected = engine.predict(network_input(get_backbone(MNV2), x))  # scaled in Python
    got = engine.predict(x)
    for name, a, b in zip(engine.names, expected, got, strict=True):
        error = np.abs(a - b).max() / np.abs(a).max()
        assert error < 1e-5, f"block {name}: differs by {error:.1e} of its scale"
    # Without the backbone's scaling, 8-bit images are refused, not taken as its input.
    bare = runtime.read_runtime(engine.model_dir / "model.xml", engine.names, 32, 8)
    assert not bare.takes_pixels
    with pytest.raises(KadError, match="8-bit images"):
        bare.predict(x)


@pytest.mark.tf
@openvino_needed
def test_an_image_gets_the_same_features_whatever_its_batch(model_cache):
    engine = runtime.build_runtime(MNV2, 32, "none", "openvino", 8, model_cache)
    assert engine.requests * engine.slice_size >= 8
    x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    full = engine.predict(x)
    alone = engine.predict(x[5:6])
    for a, b in zip(full, alone, strict=True):
        assert b.shape[0] == 1
        np.testing.assert_array_equal(a[5:6], b)


@pytest.mark.tf
@openvino_needed
def test_the_converted_model_is_cached_and_reused(tmp_path, monkeypatch):
    first = runtime.build_runtime(MNV2, 32, "none", "openvino", 4, tmp_path)
    folder = runtime.openvino_model_dir(get_backbone(MNV2), 32, "none", tmp_path)
    assert first.model_dir == folder and (folder / "model.bin").is_file()
    runtime._CONVERTED.clear()  # as in a new process

    def no_build(*args, **kwargs):
        raise AssertionError("the Keras model was built although its conversion was cached")

    monkeypatch.setattr(Backbone, "build_extractor", no_build)
    again = runtime.build_runtime(MNV2, 32, "none", "openvino", 4, tmp_path)
    x = np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    for a, b in zip(first.predict(x), again.predict(x), strict=True):
        np.testing.assert_array_equal(a, b)
    assert runtime.openvino_model_dir(get_backbone(MNV2), 48, "none", tmp_path) != folder


@pytest.mark.tf
@openvino_needed
def test_a_damaged_cached_model_is_detected_and_converted_again(tmp_path, caplog):
    engine = runtime.build_runtime(MNV2, 32, "none", "openvino", 4, tmp_path)
    x = np.random.default_rng(2).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    expected = engine.predict(x)
    weights = engine.model_dir / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    runtime._CONVERTED.clear()
    with caplog.at_level(logging.WARNING, logger="kad.features.runtime"):
        rebuilt = runtime.build_runtime(MNV2, 32, "none", "openvino", 4, tmp_path)
    assert "damaged" in caplog.text and "model.bin" in caplog.text
    for a, b in zip(expected, rebuilt.predict(x), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.tf
def test_the_cache_key_records_the_runtime(tmp_path, monkeypatch):
    from kad.data.datasets import load_dataset
    from kad.features.extract import plan_extraction

    monkeypatch.setattr(runtime, "openvino_available", lambda: True)
    digits = load_dataset("digits")
    keras_plan = plan_extraction(digits, MNV2, "none", 32, runtime="keras")
    ov_plan = plan_extraction(digits, MNV2, "none", 32, runtime="openvino")
    assert (keras_plan.runtime, ov_plan.runtime) == ("keras", "openvino")
    assert keras_plan.key != ov_plan.key and keras_plan.path != ov_plan.path
    assert ov_plan.inputs["runtime"] == "openvino"


@pytest.mark.tf
def test_a_keras_model_with_one_output_gives_one_array_per_batch():
    from kad.features.backbones import map_extractor

    model, names = get_backbone(MNV2).build_extractor(32, "none")
    engine = runtime.as_runtime(map_extractor(model, ["block_5_add"]))
    outputs = engine.predict(np.zeros((3, 32, 32, 3), np.float32))
    assert [o.shape for o in outputs] == [(3, 4, 4, 16)]


@pytest.mark.tf
@openvino_needed
def test_models_of_maps_run_on_openvino_as_on_keras_each_converted_once(tmp_path, monkeypatch):
    from kad.features.backbones import extractor_outputs, map_extractor, spatial_extractor

    bb = get_backbone(MNV2)
    model, names = bb.build_extractor(32, "none")
    blocks = ["block_2_add", "block_5_add"]
    models = {"maps": map_extractor(model, blocks), "spatial": spatial_extractor(model, blocks)}
    assert extractor_outputs(models["maps"], model) == ["map:block_2_add", "map:block_5_add"]
    assert extractor_outputs(models["spatial"]) == [
        "pooled:block_2_add", "map:block_2_add", "pooled:block_5_add", "map:block_5_add"]
    x = np.random.default_rng(3).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    folders = {runtime.openvino_model_dir(bb, 32, "none", tmp_path)}  # the pooled model's
    converted = {}
    for kind, made in models.items():
        keras_run = runtime.model_runtime(made, MNV2, 32, "none", "keras", 4, tmp_path,
                                          extractor=model)
        ov_run = runtime.model_runtime(made, MNV2, 32, "none", "openvino", 4, tmp_path,
                                       extractor=model)
        assert (keras_run.name, ov_run.name) == ("keras", "openvino")
        assert ov_run.names == keras_run.names and ov_run.model_dir not in folders
        folders.add(ov_run.model_dir)
        converted[kind] = ov_run.predict(x)
        for a, b in zip(keras_run.predict(x), converted[kind], strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())
    runtime._CONVERTED.clear()  # as in a new process: the conversions are read back

    def no_conversion(*args, **kwargs):
        raise AssertionError("a model was converted again although its conversion was cached")

    monkeypatch.setattr(runtime, "_convert", no_conversion)
    for kind, made in models.items():
        again = runtime.model_runtime(made, MNV2, 32, "none", "openvino", 4, tmp_path,
                                      extractor=model)
        for a, b in zip(converted[kind], again.predict(x), strict=True):
            np.testing.assert_array_equal(a, b)
