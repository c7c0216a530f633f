"""Network batches bounded by memory: the rule, its budget, and features that do not
depend on the batch it picks."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from conftest import MNV2
from kad.errors import KadError
from kad.features.backbones import get_backbone
from kad.features.batching import (
    BUDGET_VARIABLE,
    EVEN_SPLIT,
    batch_memory,
    image_bytes,
    network_batch,
)
from kad.utils.settings import BATCH_MEMORY


def test_a_large_input_gets_a_small_batch_and_a_small_one_keeps_the_asked_batch(caplog):
    bb = get_backbone(MNV2)
    budget = 1 << 30
    large = network_batch(bb, 896, 64, budget)
    assert 1 <= large <= 8
    assert large * image_bytes(bb, 896) <= budget < (large + 1) * image_bytes(bb, 896)
    assert network_batch(bb, 224, 64, budget) == 64
    assert network_batch(bb, 32, 8, budget) == 8
    assert network_batch(bb, 4096, 64, budget) == 1  # one image even above the budget
    # a wider network at the same size gets fewer images
    assert network_batch(get_backbone("mobilenet_v2"), 896, 64, budget) < large
    # the lowered batch is said once, with what was asked, used, the size and the budget
    with caplog.at_level(logging.WARNING, logger="kad.features.batching"):
        network_batch(bb, 640, 48, budget)
        network_batch(bb, 640, 48, budget)
    lines = [r.getMessage() for r in caplog.records
             if r.name == "kad.features.batching" and "640 px" in r.getMessage()]
    assert len(lines) == 1
    used = network_batch(bb, 640, 48, budget)
    assert f"batch size 48 lowered to {used} " in lines[0]
    assert "1.0 GiB" in lines[0] and BUDGET_VARIABLE in lines[0]


def test_a_lowered_batch_splits_evenly_into_inference_requests():
    # 17 images (MobileNetV2-0.35 at 448 px in 1 GiB) ran on OpenVINO's two requests as
    # slices of 9, one image of them padding; a lowered batch of 8 or more is a multiple
    # of 4, and a smaller one is kept as the budget gives it
    bb = get_backbone(MNV2)
    each = image_bytes(bb, 448)
    for fits, used in ((17, 16), (31, 28), (9, 8), (8, 8), (7, 7), (5, 5)):
        batch = network_batch(bb, 448, 64, fits * each + each // 2)
        assert batch == used
        assert batch % EVEN_SPLIT == 0 or batch < 2 * EVEN_SPLIT
    assert network_batch(bb, 448, 17, 64 * each) == 17  # an asked batch is not rounded


def test_the_budget_comes_from_the_environment_or_the_default(monkeypatch):
    monkeypatch.delenv(BUDGET_VARIABLE, raising=False)
    assert batch_memory() == BATCH_MEMORY
    for text, value in (("2G", 2 << 30), ("512MiB", 512 << 20), ("1.5g", 3 << 29),
                        ("1_000_000", 1_000_000)):
        monkeypatch.setenv(BUDGET_VARIABLE, text)
        assert batch_memory() == value
    for bad in ("lots", "-1G", "0"):
        monkeypatch.setenv(BUDGET_VARIABLE, bad)
        with pytest.raises(KadError, match=BUDGET_VARIABLE):
            batch_memory()


@pytest.mark.tf
@pytest.mark.parametrize("alpha", [0.35, 1.0])
def test_the_stated_activation_size_is_the_networks_largest_layer(alpha):
    bb = get_backbone(f"mobilenet_v2:alpha={alpha}")
    model = bb.build_base(160, "none")
    largest = max(int(np.prod(layer.output.shape[1:])) for layer in model.layers)
    assert largest / 160 ** 2 == pytest.approx(bb.peak_elements_per_pixel, rel=0.05)


@pytest.mark.tf
def test_a_lowered_batch_gives_the_same_features_in_the_same_entry(tmp_path, monkeypatch):
    from kad.data.datasets import load_dataset
    from kad.features import runtime
    from kad.features.extract import extract_features

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "normal").mkdir(parents=True)
    for i in range(7):
        cv2.imwrite(str(tmp_path / "data" / "normal" / f"{i}.png"),
                    rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    folder = load_dataset("folder", tmp_path / "data", kind="natural")
    sizes: list[int] = []
    monkeypatch.setattr(runtime.KerasRuntime, "predict", lambda self, batch, _p=(
        runtime.KerasRuntime.predict): (sizes.append(len(batch)), _p(self, batch))[1])
    whole = extract_features(folder, MNV2, "none", 32, batch_size=64,
                             cache_dir=tmp_path / "a", runtime="keras")
    assert sizes == [64]  # one batch, padded
    monkeypatch.setenv(BUDGET_VARIABLE, str(3 * image_bytes(get_backbone(MNV2), 32)))
    sizes.clear()
    bounded = extract_features(folder, MNV2, "none", 32, batch_size=64,
                               cache_dir=tmp_path / "b", runtime="keras")
    assert sizes == [3, 3, 3]
    assert bounded.path.name == whole.path.name  # the cache key holds no batch size
    for block in whole.blocks:
        np.testing.assert_allclose(bounded.block(block), whole.block(block),
                                   rtol=1e-4, atol=1e-5)
