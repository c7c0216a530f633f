"""kad: unsupervised anomaly detection on images with features from every block of a
pretrained network.

Importing :mod:`kad` is light: TensorFlow and Keras are imported only when a network is
built. The anomaly-score convention of the whole library is stated once, in
:mod:`kad.detectors.base`: **higher scores mean more anomalous**.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names, resolved on first access so that ``import kad`` stays cheap.
_LAZY = {
    "BaseDetector": "kad.detectors.base",
    "NotFittedError": "kad.detectors.base",
    "KadError": "kad.errors",
    "load_detector": "kad.detectors.base",
    "get_detector": "kad.registry",
    "list_detectors": "kad.registry",
    "get_backbone": "kad.features.backbones",
    "parse_spec": "kad.utils.specs",
    "load_dataset": "kad.data.datasets",
    "extract_features": "kad.features.extract",
    "FeatureSet": "kad.features.cache",
    "get_preprocessing": "kad.data.preprocessing",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kad' has no attribute {name!r}")
    return getattr(import_module(module), name)
