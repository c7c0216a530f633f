"""int8 networks: post-training quantization of the OpenVINO model with NNCF.

Opt-in (``precision="int8"``, ``kad fit --precision int8``); float32 stays the default. The
float OpenVINO conversion of the extractor (:mod:`kad.features.runtime`) is quantized by
``nncf.quantize`` with calibration data that are the training normals' network inputs, as
kad's loader prepares them (:class:`~kad.features.extraction.Loader`), at most
:data:`CALIBRATION_LIMIT` of them, evenly spread over the training rows. int8 runs on
OpenVINO only, on the CPU, and needs the ``int8`` extra (``pip install "kad[int8]"``).

Features from the int8 network differ from float32 ones (``benchmarks/int8.py`` measures
by how much, and what it does to AUROC), so a :class:`Quantization` names everything that
changes the int8 network (the calibration images' identity, their number, NNCF's version):
the feature cache, the OpenVINO model cache (:func:`kad.features.runtime.openvino_model_dir`)
and the model file record it. A model fitted on int8 features scores with the same int8
network, which is made at fit time from the training images and kept in the cache (or
carried by ``kad export``); it is never replaced by the float one.

Only pooled features are quantized: the int8 network of a representation is the int8
extractor with only that representation's outputs, so the features a model was fitted on
and those it scores come from one quantized graph.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from kad.errors import KadError, MissingDependencyError
from kad.utils.progress import Progress

__all__ = [
    "CALIBRATION_LIMIT",
    "PRECISIONS",
    "Quantization",
    "calibration_rows",
    "check_precision",
    "nncf_available",
    "nncf_version",
    "quantize",
]

PRECISIONS = ("float32", "int8")
#: At most this many training images calibrate the int8 network.
CALIBRATION_LIMIT = 300
INT8_HINT = 'pip install "kad[int8]"'


def nncf_available() -> bool:
    """Whether NNCF is installed (it is not imported)."""
    return importlib.util.find_spec("nncf") is not None


def nncf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nncf")
    except PackageNotFoundError:
        return "absent"


def check_precision(precision: str, runtime: str = "auto") -> str:
    """``precision`` (one of :data:`PRECISIONS`) checked with ``runtime`` before any work;
    returns the runtime to use: ``runtime`` itself for float32, ``openvino`` for int8.
    Raises :class:`~kad.errors.KadError` for an unknown precision or int8 on Keras, and
    :class:`~kad.errors.MissingDependencyError` for int8 without NNCF or OpenVINO."""
    name = str(precision or "float32").strip().lower()
    if name not in PRECISIONS:
        raise KadError(f"unknown precision {precision!r}; choose one of "
                       f"{', '.join(PRECISIONS)}")
    if name == "float32":
        return runtime
    if str(runtime or "auto").strip().lower() == "keras":
        raise KadError("precision int8 runs on OpenVINO only, not on runtime 'keras'; use "
                       "--runtime openvino (or auto), or drop --precision int8")
    if not nncf_available():
        raise MissingDependencyError(f"precision int8 needs NNCF; {INT8_HINT}")
    if importlib.util.find_spec("openvino") is None:
        raise MissingDependencyError("precision int8 runs on OpenVINO, which is not "
                                     "installed; pip install 'kad[tf,int8]'")
    return "openvino"


def calibration_rows(rows: np.ndarray, limit: int = CALIBRATION_LIMIT) -> np.ndarray:
    """At most ``limit`` of ``rows``, evenly spread over them (the first and last kept), in
    their order: the same rows every time."""
    rows = np.asarray(rows, dtype=int)
    if limit < 1:
        raise KadError(f"the int8 calibration needs at least 1 image, got a limit of {limit}")
    if len(rows) <= limit:
        return rows
    return rows[np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(int))]


@dataclass(frozen=True)
class Quantization:
    """What makes an int8 network: ``key`` identifies the calibration images (the features
    plan they were prepared with, which names the dataset, backbone, weights, size and
    preprocessing, and their ids), ``images`` their number, ``nncf`` NNCF's version.

    At fit time it can also load the images
    (:func:`kad.features.extraction.plan_quantization`); a record read from a model file
    cannot, so it finds its int8 network in the cache or nowhere."""

    key: str
    images: int
    nncf: str
    #: ``load(progress)``: the calibration images as the network takes them, one
    #: ``(1, s, s, 3)`` array at a time; None in a record read from a model file.
    load: Callable[[Progress | None], Iterator[np.ndarray]] | None = field(
        default=None, compare=False, repr=False)
    progress: object = field(default=None, compare=False, repr=False)

    def record(self) -> dict:
        """What a model file and a cache key record."""
        return {"precision": "int8", "calibration": self.key, "images": int(self.images),
                "nncf": self.nncf}

    @classmethod
    def from_record(cls, record: dict) -> Quantization:
        if not isinstance(record, dict) or record.get("precision") != "int8":
            raise KadError(f"not an int8 record: {record!r}")
        return cls(str(record["calibration"]), int(record["images"]), str(record["nncf"]))

    @property
    def can_calibrate(self) -> bool:
        return self.load is not None

    def inputs(self, progress: Progress | None = None) -> Iterator[np.ndarray]:
        if self.load is None:
            raise KadError("this int8 record holds no calibration images")
        return self.load(progress)


class _Calibration:
    """An iterable NNCF may read more than once, each time loading afresh (bounded
    memory: a few batches at a time, never every image)."""

    def __init__(self, quantization: Quantization, progress: Progress | None):
        self.quantization, self.progress = quantization, progress

    def __iter__(self):
        return self.quantization.inputs(self.progress)


def quantize(model, quantization: Quantization):
    """The OpenVINO ``model`` (float32) quantized to int8 by ``nncf.quantize`` on the
    calibration images of ``quantization``. NNCF's own progress bars are kept off the
    console: the calibration is reported as the task ``int8 calibration``."""
    if not nncf_available():
        raise MissingDependencyError(f"precision int8 needs NNCF; {INT8_HINT}")
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)
    data = nncf.Dataset(_Calibration(quantization, quantization.progress))
    with contextlib.redirect_stdout(io.StringIO()):
        # NNCF's full bias correction: its fast one left the first block of MobileNetV2
        # (a block whose output is also one of the extractor's) off by as much as the
        # features themselves, measured on fundus photographs at 224 and 448 px.
        return nncf.quantize(model, data, subset_size=int(quantization.images),
                             fast_bias_correction=False)
