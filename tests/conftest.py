"""Shared fixtures: where ../shared is, and markers that skip cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kad.utils.progress import Recorder

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

SHARED = Path(os.environ.get("KAD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MOBILENET_WEIGHTS = (
    SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
)
KAGGLE_DR = SHARED / "data" / "kaggle-dr-256"
CIFAR10_TAR = SHARED / "data" / "cifar10-jpeg.tar"


def _has_keras() -> bool:
    from kad.utils.deps import has_keras

    return has_keras()


def pytest_collection_modifyitems(config, items):
    skip_tf = pytest.mark.skip(reason="TensorFlow/Keras not installed (pip install 'kad[tf]')")
    keras_ok = None
    for item in items:
        if "tf" in item.keywords:
            if keras_ok is None:
                keras_ok = _has_keras()
            if not keras_ok:
                item.add_marker(skip_tf)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its feature cache under its own temporary folder."""
    monkeypatch.setenv("KAD_CACHE_DIR", str(tmp_path_factory.mktemp("kad-cache")))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


class StopAt(Recorder):
    """Records progress and interrupts the work once ``at`` steps are done."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_task_update(self, name, done, total):
        super().on_task_update(name, done, total)
        if done >= self.at:
            raise KeyboardInterrupt
