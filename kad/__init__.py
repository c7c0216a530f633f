"""kad: unsupervised anomaly detection on images with features from every block of a
pretrained network.

Importing :mod:`kad` is light: TensorFlow and Keras are imported only when a network is
built. The anomaly-score convention of the whole library is stated once, in
:mod:`kad.detectors.base`: **higher scores mean more anomalous**.

The package is laid out by floor, each importing only from the floors below it:

==================  =====================================================================
``kad.utils``       plugin specs, optional dependencies, metrics, the model-file format,
                    progress reporting
``kad.data``        decoding images, datasets, preprocessing, evaluation protocols
``kad.features``    backbones, runtimes, extraction and its cache, shards, Ray, and the
                    representation a detector receives
``kad.detectors``   the detector contract and the base class of deep detectors
``kad.screening``   fitting, the fitted pipeline, thresholds, calibration, selection,
                    heatmaps, the report and the screening workflow
``kad.serve``       one fitted model as an HTTP service (``kad serve``; the ``serve`` extra)
``kad.cli``         the command line: parses, calls one function above, renders
==================  =====================================================================

The names below are the public API, resolved on first use.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names, resolved on first access so that ``import kad`` stays cheap.
_LAZY = {
    # errors
    "KadError": "kad.errors",
    # plugins
    "get_detector": "kad.registry",
    "list_detectors": "kad.registry",
    "parse_spec": "kad.utils.specs",
    # progress
    "Progress": "kad.utils.progress",
    # data
    "load_dataset": "kad.data.datasets",
    "FileSource": "kad.data.datasets",
    "ArraySource": "kad.data.datasets",
    "get_preprocessing": "kad.data.preprocessing",
    # features
    "get_backbone": "kad.features.backbones",
    "extract_features": "kad.features.extract",
    "FeatureSet": "kad.features.cache",
    "Representation": "kad.features.representation",
    "PooledVectors": "kad.features.representation",
    "BlockMaps": "kad.features.representation",
    # detectors
    "BaseDetector": "kad.detectors.base",
    "NotFittedError": "kad.detectors.base",
    "DamagedStateError": "kad.detectors.base",
    "load_detector": "kad.detectors.base",
    # screening
    "fit_pipeline": "kad.screening.fitting",
    "Pipeline": "kad.screening.pipeline",
    "load_pipeline": "kad.screening.pipeline",
    "Threshold": "kad.screening.thresholds",
    "ThresholdRule": "kad.screening.thresholds",
    "fit_model": "kad.screening.workflow",
    "screen": "kad.screening.workflow",
    "score_images": "kad.screening.workflow",
    "ScoredImages": "kad.screening.workflow",
    "set_threshold": "kad.screening.workflow",
    "explain": "kad.screening.heatmaps",
    "explain_file": "kad.screening.heatmaps",
    "export_pipeline": "kad.screening.export",
    "ExportRun": "kad.screening.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kad' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
