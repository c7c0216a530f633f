"""Shared fixtures and settings: where ../shared is, markers that skip cleanly without it,
the fast network every test that builds one uses, and detectors at their quick settings."""

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

#: The fast network: MobileNetV2 at width 0.35 with random weights (no download), 32 px
#: inputs, natural preprocessing, small batches. Keyword arguments of fit_pipeline,
#: fit_model and extract_features.
MNV2 = "mobilenet_v2:alpha=0.35"
FAST = {"backbone": MNV2, "weights": "none", "image_size": 32, "preprocessing": "natural",
        "batch_size": 8}
#: The same as options of the ``kad`` command line.
FAST_CLI = [f"--{key.replace('_', '-')}={value}" for key, value in FAST.items()]


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


def quick_detector(name: str):
    """The registered detector ``name`` at its ``quick_params``; skipped when it needs
    TensorFlow and that is not installed."""
    from kad.errors import PluginError
    from kad.registry import DETECTORS, load
    from kad.utils.deps import has_keras

    try:
        cls = load(DETECTORS, name)
    except PluginError as exc:
        if isinstance(exc.__cause__, ImportError) and not has_keras():
            pytest.skip(f"{name} needs TensorFlow/Keras, which is not installed")
        raise
    return cls(**cls.quick_params)


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
