"""Every block of every built-in backbone, pinned by name and size; weights handling."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MOBILENET_WEIGHTS, need
from kad.errors import KadError, SpecError, WeightsError
from kad.features.backbones import get_backbone, resolve_weights, weights_identity

pytestmark = pytest.mark.tf

IRV2 = (
    [("mixed_5b", 320)] + [(f"block35_{i}_ac", 320) for i in range(1, 11)]
    + [("mixed_6a", 1088)] + [(f"block17_{i}_ac", 1088) for i in range(1, 21)]
    + [("mixed_7a", 2080)] + [(f"block8_{i}_ac", 2080) for i in range(1, 10)]
    + [("block8_10", 2080), ("conv_7b_ac", 1536)]
)
IV3 = [("mixed0", 256), ("mixed1", 288), ("mixed2", 288), ("mixed3", 768), ("mixed4", 768),
       ("mixed5", 768), ("mixed6", 768), ("mixed7", 768), ("mixed8", 1280), ("mixed9", 2048),
       ("mixed10", 2048)]
MNV2_BLOCKS = (["expanded_conv_project_BN", "block_1_project_BN", "block_2_add",
                "block_3_project_BN", "block_4_add", "block_5_add", "block_6_project_BN",
                "block_7_add", "block_8_add", "block_9_add", "block_10_project_BN",
                "block_11_add", "block_12_add", "block_13_project_BN", "block_14_add",
                "block_15_add", "block_16_project_BN", "out_relu"])
MNV2_035 = list(zip(MNV2_BLOCKS, [8, 8, 8, 16, 16, 16, 24, 24, 24, 24, 32, 32, 32, 56, 56, 56,
                                  112, 1280], strict=True))
MNV2_1 = list(zip(MNV2_BLOCKS, [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160,
                                160, 320, 1280], strict=True))


@pytest.mark.parametrize("spec, size, expected", [
    ("inception_resnet_v2", 75, IRV2),
    ("inception_v3", 75, IV3),
    ("mobilenet_v2:alpha=0.35", 32, MNV2_035),
    ("mobilenet_v2", 32, MNV2_1),
], ids=["inception_resnet_v2", "inception_v3", "mobilenet_v2-0.35", "mobilenet_v2"])
def test_every_block_is_exposed_in_network_order(spec, size, expected):
    model, names = get_backbone(spec).build_extractor(size, "none")
    assert list(zip(names, [int(o.shape[-1]) for o in model.outputs], strict=True)) == expected
    outputs = model.predict_on_batch(np.zeros((2, size, size, 3), np.float32))
    assert [o.shape for o in outputs] == [(2, dim) for _, dim in expected]


def test_any_keras_application_through_the_same_door():
    model, names = get_backbone("keras:model=ResNet50").build_extractor(32, "none")
    assert names[0] == "conv2_block1_add" and len(names) == len(model.outputs) == 17


def test_native_and_minimum_sizes():
    assert get_backbone("inception_resnet_v2").input_size(None) == 299
    assert get_backbone("mobilenet_v2").input_size(None) == 224
    with pytest.raises(KadError, match="minimum is 75"):
        get_backbone("inception_v3").input_size(64)


def test_backbone_options_are_validated():
    with pytest.raises(KadError, match="backbone 'mobilenet_v2' has no option 'width'.*"
                                       "its options: alpha"):
        get_backbone("mobilenet_v2:width=2")
    with pytest.raises(KadError, match="alpha must be one of"):
        get_backbone("mobilenet_v2:alpha=0.4")
    with pytest.raises(SpecError):
        get_backbone("mobilenet_v2:alpha")
    assert str(get_backbone("mobilenet_v2:alpha=0.35").spec) == "mobilenet_v2:alpha=0.35"
    assert str(get_backbone("mobilenet_v2:alpha=1.0").spec) == "mobilenet_v2"


def test_random_weights_are_the_same_every_build():
    a, _ = get_backbone("mobilenet_v2:alpha=0.35").build_extractor(32, "none")
    b, _ = get_backbone("mobilenet_v2:alpha=0.35").build_extractor(32, "none")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(a.predict_on_batch(x)[-1], b.predict_on_batch(x)[-1])


def test_missing_imagenet_weights_give_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid: no network")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.inception_v3.file_utils.get_file", offline)
    with pytest.raises(WeightsError) as info:
        get_backbone("inception_v3").build_base(None, "imagenet")
    message = str(info.value)
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras" / "models") in message and "--weights PATH" in message


def test_weights_arguments():
    assert resolve_weights("imagenet") == ("imagenet", None)
    assert resolve_weights("none") == ("none", None) == resolve_weights(None)
    with pytest.raises(WeightsError, match="neither 'imagenet', 'none' nor an existing file"):
        resolve_weights("/no/such/file.h5")


@pytest.mark.shared
def test_local_imagenet_weights_load_and_a_misfit_names_both():
    path = need(MOBILENET_WEIGHTS)
    model, _ = get_backbone("mobilenet_v2:alpha=0.35").build_extractor(96, path)
    random, _ = get_backbone("mobilenet_v2:alpha=0.35").build_extractor(96, "none")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    assert not np.allclose(model.predict_on_batch(x)[-1], random.predict_on_batch(x)[-1])
    assert weights_identity(path).startswith("sha256:")
    with pytest.raises(WeightsError) as info:
        get_backbone("mobilenet_v2").build_extractor(96, path)
    assert str(path.name) in str(info.value) and "mobilenet_v2" in str(info.value)


@pytest.mark.parametrize("spec", ["inception_resnet_v2", "inception_v3", "mobilenet_v2"])
def test_in_place_input_scaling_is_the_networks_own(spec):
    # The loader scales each image into the batch in place; the network must get what
    # its own preprocess_input gives on [0, 255] pixels, within float32 rounding.
    backbone = get_backbone(spec)
    x01 = np.random.default_rng(0).random((2, 9, 7, 3), dtype=np.float32)
    expected = backbone.preprocess_input(x01 * np.float32(255.0))
    out = np.full_like(x01, np.nan)
    assert backbone.preprocess_into(x01, out) is out
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(backbone.preprocess(x01), expected, rtol=0, atol=1e-6)
    same = x01.copy()
    backbone.preprocess_into(same, same)
    np.testing.assert_allclose(same, expected, rtol=0, atol=1e-6)
