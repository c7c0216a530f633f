"""The paper's claim on real data: an Isolation Forest on ImageNet features beats chance and
beats the same forest on raw pixels (CIFAR-10, airplane as the normal class)."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from conftest import CIFAR10_TAR, MOBILENET_WEIGHTS, need
from kad.data.datasets import load_dataset
from kad.features.extract import extract_features
from kad.features.pixels import load_pixels
from kad.registry import get_detector
from kad.utils.metrics import evaluate

pytestmark = [pytest.mark.tf, pytest.mark.shared]
TRAIN_NORMAL, TEST_PER_CLASS = 600, 60


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """600 airplane training images and 60 test images of each class, from the JPEG copy."""
    need(MOBILENET_WEIGHTS)
    root = tmp_path_factory.mktemp("cifar")
    counts: dict[tuple[str, str], int] = {}
    members = []
    with tarfile.open(need(CIFAR10_TAR)) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4:
                continue
            split, cls = parts[1], parts[2]
            cap = (TRAIN_NORMAL if cls == "airplane" else 0) if split == "train" else (
                TEST_PER_CLASS)
            if counts.get((split, cls), 0) < cap:
                counts[(split, cls)] = counts.get((split, cls), 0) + 1
                members.append(member)
        tar.extractall(root, members=members, filter="data")
    return load_dataset("cifar10", root / "cifar10-jpeg")


def test_imagenet_features_beat_raw_pixels_on_cifar10_airplane(cifar, record_property):
    train = np.flatnonzero((cifar.split == "train") & (cifar.target == "airplane"))
    test = np.flatnonzero(cifar.split == "test")
    y = (cifar.target[test] != "airplane").astype(int)
    features = extract_features(cifar, "mobilenet_v2:alpha=0.35", MOBILENET_WEIGHTS, 96)
    x = features.matrix("concat")
    pixels, _ = load_pixels(cifar, 32, "natural")
    auroc = {}
    for name, data in (("features", x), ("pixels", pixels)):
        forest = get_detector("iforest:random_state=0").fit(data[train])
        auroc[name] = evaluate(y, forest.anomaly_score(data[test]))["auroc"]
        record_property(f"auroc_{name}", auroc[name])
    print(f"\nIF AUROC on CIFAR-10 airplane: ImageNet features {auroc['features']:.3f}, "
          f"raw pixels {auroc['pixels']:.3f}")
    assert auroc["features"] > 0.6
    assert auroc["features"] > auroc["pixels"] + 0.03
