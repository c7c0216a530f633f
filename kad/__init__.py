"""kad: unsupervised anomaly detection on images with features from every block of a
pretrained network.

Importing :mod:`kad` is light: TensorFlow and Keras are imported only when a network is
built. The anomaly-score convention of the whole library is stated once, in
:mod:`kad.detector`: **higher scores mean more anomalous**.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names, resolved on first access so that ``import kad`` stays cheap.
_LAZY = {
    "BaseDetector": "kad.detector",
    "NotFittedError": "kad.detector",
    "KadError": "kad.errors",
    "load_detector": "kad.detector",
    "get_detector": "kad.registry",
    "list_detectors": "kad.registry",
    "get_backbone": "kad.backbones",
    "parse_spec": "kad.specs",
    "load_dataset": "kad.datasets",
    "extract_features": "kad.features",
    "FeatureSet": "kad.cache",
    "get_preprocessing": "kad.preprocessing",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kad' has no attribute {name!r}")
    return getattr(import_module(module), name)
