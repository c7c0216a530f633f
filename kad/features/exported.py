"""The network of an exported model: OpenVINO IR and the input scaling as plain numbers.

``kad export`` (:func:`kad.screening.export.export_pipeline`) writes a folder that scores
with kad's core and OpenVINO alone, no TensorFlow:

``network.xml``, ``network.bin``
    The OpenVINO IR of the network the pipeline scores with: every tap its detector
    reads (the blocks' pooled vectors, or their maps for a detector of maps), as
    :func:`kad.features.runtime.model_runtime` converts it from the Keras network whose
    weights were checked against the pipeline's fingerprint.
``pipeline.kad``
    The pipeline itself, written by :meth:`kad.screening.pipeline.Pipeline.save`:
    preprocessing settings, threshold, calibration and the detector's state as JSON and
    NumPy arrays (:mod:`kad.utils.artifact`), read by the same reader.
``kad-export.json``
    What the folder is: the export format, the network's outputs and input size, the
    network's input scaling as plain numbers, and the SHA-256 of every other file.

The input scaling is the backbone's ``preprocess_input`` (``keras.applications``' for
the ``keras`` backbone), measured when exporting as the affine map of a pixel's three
colours that it is for every Keras application (``tf``, ``torch`` and ``caffe`` modes and
none: a scale, a shift, and for ``caffe`` an RGB to BGR swap), checked on random pixels,
and stored as a 3 x 3 matrix and an offset (:func:`input_scaling`, :class:`ExportedInput`).

:func:`read_export` checks every file against its checksum before use, naming the file
that is missing or altered; :func:`kad.screening.pipeline.load_pipeline` given a folder
reads the pipeline through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kad.errors import ArtifactError, KadError
from kad.features.backbones import Backbone
from kad.utils.files import file_sha256

__all__ = ["EXPORT_FORMAT", "FILES", "MARKER", "NETWORK_BIN", "NETWORK_XML", "PIPELINE_FILE",
           "ExportedInput", "ExportedNetwork", "input_scaling", "read_export"]

#: The layout of an export folder; a folder of another format is refused.
EXPORT_FORMAT = 1
#: The file that says a folder is a kad export, and lists its files with their checksums.
MARKER = "kad-export.json"
PIPELINE_FILE = "pipeline.kad"
NETWORK_XML, NETWORK_BIN = "network.xml", "network.bin"
FILES = (PIPELINE_FILE, NETWORK_XML, NETWORK_BIN)
#: kad-export.json is a short summary.
_MAX_MARKER_BYTES = 2**20
#: How close the measured affine map must be to the backbone's own scaling.
_SCALING_TOLERANCE = 1e-5
_REEXPORT = "export it again (kad export MODEL --out {folder} --overwrite)"


# ------------------------------------------------------------------------- input scaling


def input_scaling(backbone: Backbone) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` such that ``backbone.preprocess_input(x)`` is
    ``x @ matrix.T + offset`` for every pixel ``x`` (RGB in [0, 255]): measured on black
    and the three primaries, then checked on random images. A scaling that is not such a
    map (one that looks at neighbouring pixels or is not linear) is refused.
    :class:`ExportedInput` applies it: bit for bit as the backbone for the ``tf`` mode of
    every built-in backbone, within two float32 rounding steps for the ``caffe`` and
    ``torch`` modes of other ``keras.applications`` networks."""
    probes = np.zeros((4, 1, 1, 3), dtype=np.float64)  # measured in float64: exact
    probes[1:, 0, 0] = 255.0 * np.eye(3)
    out = np.asarray(backbone.preprocess_input(probes.copy()), dtype=np.float64)[:, 0, 0]
    offset = out[0]
    matrix = ((out[1:] - offset) / 255.0).T
    rng = np.random.default_rng(0)
    check = rng.uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    expected = np.asarray(backbone.preprocess_input(check.copy()), dtype=np.float64)
    got = check.astype(np.float64) @ matrix.T + offset
    scale = max(1.0, float(np.abs(expected).max()))
    if expected.shape != got.shape or np.abs(expected - got).max() > _SCALING_TOLERANCE * scale:
        raise KadError(f"the input scaling of backbone {backbone.spec} is not a per-pixel "
                       "affine map of the colours, so it cannot be exported; score with the "
                       "model file instead")
    return matrix, offset


class ExportedInput(Backbone):
    """The input scaling of an exported model: ``x @ matrix.T + offset`` on pixels in
    [0, 255] (see :func:`input_scaling`); the backbone's ``preprocess`` without it."""

    name = "exported"

    def __init__(self, matrix, offset, spec: str):
        super().__init__()
        matrix = np.asarray(matrix, dtype=np.float64)
        self.matrix = matrix.astype(np.float32)
        self.offset = np.asarray(offset, dtype=np.float32)
        self._spec = spec
        # Each colour taken from one colour and divided, as preprocess_input computes it
        # (x / 127.5 - 1), gives the backbone's numbers bit for bit.
        nonzero = matrix != 0
        self._source = None
        if (nonzero.sum(axis=1) == 1).all():
            self._source = np.argmax(nonzero, axis=1)
            self._divisor = (1.0 / matrix[np.arange(3), self._source]).astype(np.float32)
        # The same scale and offset on every colour: the loader's in-place scaling of
        # [0, 1] images (Backbone.input_scaling), as the model file scores with it.
        diagonal = np.diag(matrix)
        if (np.allclose(matrix, np.diag(diagonal), rtol=0, atol=0)
                and np.all(diagonal == diagonal[0]) and np.all(self.offset == self.offset[0])):
            self.input_scaling = (float(255.0 * diagonal[0]), float(self.offset[0]))

    def __repr__(self) -> str:
        return f"<input scaling of {self._spec}>"

    def preprocess_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self._source is not None:
            return x[..., self._source] / self._divisor + self.offset
        return x @ self.matrix.T + self.offset


# ------------------------------------------------------------------------- reading


@dataclass
class ExportedNetwork:
    """The network of an export folder: where it is, its outputs (named as
    :func:`kad.features.backbones.extractor_outputs` names them), its input size and its
    input scaling. :meth:`runtime` compiles it on OpenVINO."""

    folder: Path
    outputs: list[str]
    input_size: int
    scaling: ExportedInput
    marker: dict = field(default_factory=dict)

    @property
    def pipeline_file(self) -> Path:
        return self.folder / PIPELINE_FILE

    def runtime(self, batch_size: int, pixels: bool = False, int8: bool = False):
        """The network compiled for the CPU (:func:`kad.features.runtime.read_runtime`),
        taking 8-bit images too where its scaling is a scale and an offset, as the model
        file's float32 network does (``pixels``: that kind compiled first); an ``int8``
        network takes its float32 input only, as the model file's does."""
        from kad.features.runtime import read_runtime

        return read_runtime(self.folder / NETWORK_XML, self.outputs, self.input_size,
                            batch_size, None if int8 else self.scaling.input_scaling, pixels)


def _read_marker(folder: Path) -> dict:
    marker = folder / MARKER
    if not marker.is_file():
        raise ArtifactError(f"{folder} is a folder but not an exported kad model (it has no "
                            f"{MARKER}); export one with kad export MODEL --out {folder}, or "
                            "pass a model file")
    try:
        if marker.stat().st_size > _MAX_MARKER_BYTES:
            raise ValueError(f"larger than {_MAX_MARKER_BYTES} bytes")
        found = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(found, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{marker} is damaged ({type(exc).__name__}: {exc}); "
                            f"{_REEXPORT.format(folder=folder)}") from exc
    return found


def read_export(folder: str | Path) -> ExportedNetwork:
    """The network of the export folder ``folder``, after checking every file of it
    against the checksum in ``kad-export.json``; a missing, altered or unlisted part is
    refused in one line naming the file. The pipeline file is read by the caller
    (:func:`kad.screening.pipeline.load_pipeline`)."""
    folder = Path(folder)
    marker = _read_marker(folder)
    fix = _REEXPORT.format(folder=folder)
    if marker.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"{folder / MARKER} is of export format {marker.get('format')!r}; "
                            f"this kad reads format {EXPORT_FORMAT}: {fix} with this version")
    files = marker.get("files")
    if not isinstance(files, dict) or set(files) != set(FILES) or not all(
            isinstance(v, str) for v in files.values()):
        raise ArtifactError(f"{folder / MARKER} is damaged: it does not list the files "
                            f"{', '.join(FILES)} with their checksums; {fix}")
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"the exported model {folder} is damaged: {path} is missing; "
                                f"{fix}")
        if file_sha256(path) != files[name]:
            raise ArtifactError(f"the exported model {folder} is damaged: {path} does not "
                                f"match its checksum in {MARKER}; {fix}")
    try:
        network = marker["network"]
        outputs = [str(o) for o in network["outputs"]]
        size = int(network["input_size"])
        matrix = np.asarray(network["input_scaling"]["matrix"], dtype=np.float64)
        offset = np.asarray(network["input_scaling"]["offset"], dtype=np.float64)
        if matrix.shape != (3, 3) or offset.shape != (3,) or not (
                np.isfinite(matrix).all() and np.isfinite(offset).all()):
            raise ValueError("the input scaling is not a finite 3 x 3 matrix and 3 offsets")
        spec = str(network.get("backbone", "the backbone"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder / MARKER} is damaged ({type(exc).__name__}: {exc}); "
                            f"{fix}") from exc
    return ExportedNetwork(folder, outputs, size, ExportedInput(matrix, offset, spec), marker)
