"""A fitted pipeline exported to a folder that scores with kad's core and OpenVINO alone.

A model file (:meth:`kad.screening.pipeline.Pipeline.save`) rebuilds its network in Keras,
so scoring it needs TensorFlow. :func:`export_pipeline` (``kad export MODEL --out DIR``)
writes the same pipeline as a folder that needs neither:

``network.xml``, ``network.bin``
    The OpenVINO IR of the network the pipeline scores with: every tap its detector
    reads (the blocks' pooled vectors, or their maps for a detector of maps), as
    :func:`kad.features.runtime.model_runtime` converts it from the Keras network whose
    weights were checked against the pipeline's fingerprint.
``pipeline.kad``
    The pipeline itself, written by :meth:`~kad.screening.pipeline.Pipeline.save`:
    preprocessing settings, threshold, calibration and the detector's state as JSON and
    NumPy arrays (:mod:`kad.utils.artifact`), read by the same reader.
``kad-export.json``
    What the folder is: the export format, the network's outputs and input size, the
    network's input scaling as plain numbers, and the SHA-256 of every other file.

The input scaling is the backbone's ``preprocess_input`` (``keras.applications``' for
the ``keras`` backbone), measured when exporting as the affine map of a pixel's three
colours that it is for every Keras application (``tf``, ``torch`` and ``caffe`` modes and
none: a scale, a shift, and for ``caffe`` an RGB to BGR swap), checked on random pixels, and
stored as a 3 x 3 matrix and an offset: scoring reproduces it with NumPy.

:func:`load_export` (and :func:`kad.screening.pipeline.load_pipeline` given a folder)
checks every file against its checksum before use, naming the file that is missing or
altered. The folder is written beside ``DIR`` under a temporary name and renamed when
complete; an existing ``DIR`` is replaced only with ``overwrite`` and only when it holds
nothing but a kad export, so a file kad did not write is never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kad import __version__
from kad.errors import ArtifactError, KadError
from kad.features.backbones import Backbone
from kad.screening.pipeline import Pipeline, load_pipeline

__all__ = ["EXPORT_FORMAT", "MARKER", "ExportRun", "ExportedInput", "ExportedPipeline",
           "export_pipeline", "input_scaling", "load_export"]

#: The layout of an export folder; a folder of another format is refused.
EXPORT_FORMAT = 1
#: The file that says a folder is a kad export, and lists its files with their checksums.
MARKER = "kad-export.json"
PIPELINE_FILE = "pipeline.kad"
NETWORK_XML, NETWORK_BIN = "network.xml", "network.bin"
_FILES = (PIPELINE_FILE, NETWORK_XML, NETWORK_BIN)
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
        # (x / 127.5 - 1, x[..., ::-1] - mean), gives the backbone's numbers bit for bit.
        nonzero = matrix != 0
        self._source = None
        if (nonzero.sum(axis=1) == 1).all():
            self._source = np.argmax(nonzero, axis=1)
            self._divisor = (1.0 / matrix[np.arange(3), self._source]).astype(np.float32)

    def __repr__(self) -> str:
        return f"<input scaling of {self._spec}>"

    def preprocess_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self._source is not None:
            return x[..., self._source] / self._divisor + self.offset
        return x @ self.matrix.T + self.offset


# ------------------------------------------------------------------------- the exported model


class ExportedPipeline(Pipeline):
    """A pipeline read from an export folder (:func:`load_export`): it scores, thresholds
    and draws occlusion and detector heatmaps on the exported OpenVINO network, and builds
    no Keras network."""

    has_network = False
    folder: Path
    outputs: list[str]
    scaling: ExportedInput

    @classmethod
    def of(cls, pipeline: Pipeline, folder: Path, outputs: list[str],
           scaling: ExportedInput) -> ExportedPipeline:
        exported = cls.__new__(cls)
        exported.__dict__.update(pipeline.__dict__)
        exported.folder, exported.outputs, exported.scaling = folder, list(outputs), scaling
        exported.source = folder
        return exported

    def input_scaling(self):
        return self.scaling

    def network(self, weights: str | None = None):  # noqa: ARG002 - the method's signature
        raise KadError(f"{self.folder} is an exported model: it holds its network as OpenVINO "
                       "IR, not as a Keras network; use the model file it was exported from "
                       "(and TensorFlow) for this")

    def runner(self, weights: str | None = None, runtime: str | None = None):
        from kad.features.runtime import read_runtime

        if weights is not None:
            raise KadError(f"{self.folder} is an exported model: it holds its network and its "
                           "weights, so --weights does not apply; drop it")
        if runtime not in (None, "auto", "openvino"):
            raise KadError(f"{self.folder} is an exported model: it runs on OpenVINO only, "
                           f"not on runtime {runtime!r}; drop --runtime or use openvino")
        if "openvino" not in self._runners:
            self._runners["openvino"] = read_runtime(self.folder / NETWORK_XML, self.outputs,
                                                     self.image_size, self.batch_size)
        return self._runners["openvino"]

    def describe(self) -> dict:
        return {**super().describe(), "exported": str(self.folder)}

    def save(self, path: str | Path) -> Path:
        raise KadError(f"{self.folder} is an exported model and is not written back: change "
                       f"the model file it was exported from (kad threshold MODEL ...) and "
                       f"export it again, not {path}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def load_export(folder: str | Path) -> ExportedPipeline:
    """The pipeline exported to ``folder`` by :func:`export_pipeline`, ready to score with
    OpenVINO alone. Every file is checked against the checksum in ``kad-export.json``
    first; a missing, altered or unlisted part is refused in one line naming the file."""
    folder = Path(folder)
    marker = _read_marker(folder)
    fix = _REEXPORT.format(folder=folder)
    if marker.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"{folder / MARKER} is of export format {marker.get('format')!r}; "
                            f"this kad reads format {EXPORT_FORMAT}: {fix} with this version")
    files = marker.get("files")
    if not isinstance(files, dict) or set(files) != set(_FILES) or not all(
            isinstance(v, str) for v in files.values()):
        raise ArtifactError(f"{folder / MARKER} is damaged: it does not list the files "
                            f"{', '.join(_FILES)} with their checksums; {fix}")
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"the exported model {folder} is damaged: {path} is missing; "
                                f"{fix}")
        if _sha256(path) != files[name]:
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
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder / MARKER} is damaged ({type(exc).__name__}: {exc}); "
                            f"{fix}") from exc
    pipeline = load_pipeline(folder / PIPELINE_FILE)
    if size != pipeline.image_size:
        raise ArtifactError(f"{folder / MARKER} says the network takes {size} px but the "
                            f"pipeline scores at {pipeline.image_size} px; {fix}")
    return ExportedPipeline.of(pipeline, folder, outputs,
                               ExportedInput(matrix, offset, pipeline.backbone))


# ------------------------------------------------------------------------- writing


@dataclass
class ExportRun:
    """What :func:`export_pipeline` wrote: the folder, whether it replaced an earlier
    export, the network's outputs, and notes for the reader (how the export's scores
    relate to the model file's, what scoring it needs)."""

    path: Path
    outputs: list[str]
    replaced: bool = False
    notes: list[str] = field(default_factory=list)


def _check_target(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` holds an earlier export to replace; refuses a file, a non-empty
    folder without ``overwrite``, and, even with it, a folder holding anything kad's export
    did not write."""
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir() or out.is_symlink():
        raise KadError(f"--out {out} exists and is not a folder; choose another --out")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return False
    if not overwrite:
        raise KadError(f"--out {out} exists and is not empty; pass --overwrite to replace an "
                       "earlier export there, or choose another --out")
    ours = set(_FILES) | {MARKER}
    foreign = [name for name in present if name not in ours]
    if MARKER not in present or foreign:
        shown = (", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                 if foreign else f"and no {MARKER}")
        raise KadError(f"--out {out} holds files kad's export did not write ({shown}); kad "
                       "replaces only an earlier export: choose another --out")
    return True


def export_pipeline(model: str | Path | Pipeline, out_dir: str | Path, *,
                    overwrite: bool = False, weights: str | None = None,
                    log_line=None) -> ExportRun:
    """Export the pipeline ``model`` (a model file, or a :class:`Pipeline`) to the folder
    ``out_dir`` (see the module docstring). The network is built in Keras, its weights
    checked against the pipeline's fingerprint (``weights`` replaces the recorded weights
    file, as ``kad score --weights`` does), and converted to OpenVINO (or the cached
    conversion reused). The folder is written beside ``out_dir`` and renamed when
    complete; an existing non-empty ``out_dir`` is refused unless ``overwrite``, and then
    replaced only when it holds nothing but an earlier export. ``log_line`` gets a line
    when the network is converted."""
    from kad.features.backbones import get_backbone
    from kad.features.runtime import converted_files, model_runtime
    from kad.utils.files import file_lock_path, output_lock, write_error, write_text

    pipeline = model if isinstance(model, Pipeline) else load_pipeline(model)
    if not pipeline.has_network:
        raise KadError(f"{pipeline.source} is already an exported model; export the model "
                       "file it came from")
    out = Path(out_dir)
    _check_target(out, overwrite)  # before any work
    matrix, offset = input_scaling(get_backbone(pipeline.backbone))
    network = pipeline.network(weights)
    runtime = model_runtime(pipeline.representation.network(network, pipeline.all_blocks),
                            pipeline.backbone, pipeline.image_size, pipeline.weights_used,
                            "openvino", pipeline.batch_size, log_line=log_line,
                            extractor=network)
    converted = converted_files(runtime)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc) from None
    with output_lock(file_lock_path(out), out):
        replaced = _check_target(out, overwrite)
        part = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.kad-export")
        try:
            part.mkdir()
            for name, (source, digest) in ((NETWORK_XML, converted["xml"]),
                                           (NETWORK_BIN, converted["bin"])):
                shutil.copyfile(source, part / name)
                if _sha256(part / name) != digest:
                    raise KadError(f"{part / name} does not match the conversion it was "
                                   "copied from; export again")
            pipeline.save(part / PIPELINE_FILE)
            marker = {
                "format": EXPORT_FORMAT, "kad": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "network": {
                    "outputs": list(runtime.names), "input_size": int(pipeline.image_size),
                    "backbone": str(pipeline.backbone),
                    "weights_fingerprint": pipeline.weights_fingerprint,
                    "input_scaling": {"matrix": matrix.tolist(), "offset": offset.tolist(),
                                      "applies_to": "RGB pixels in [0, 255]"},
                },
                "fitted_runtime": pipeline.runtime,
                "files": {name: _sha256(part / name) for name in _FILES},
            }
            write_text(part / MARKER, json.dumps(marker, indent=1))
            _publish(part, out, replaced)
        except OSError as exc:
            shutil.rmtree(part, ignore_errors=True)
            raise write_error(out, exc) from None
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
    notes = []
    if pipeline.runtime != "openvino":
        notes.append(f"the model was fitted on runtime {pipeline.runtime} and the export runs "
                     "on OpenVINO: its features agree with Keras' within about 1e-4 of each "
                     "block's scale, not bit for bit")
    if any(name.startswith("keras/") for name in _members(out / PIPELINE_FILE)):
        notes.append(f"the detector {type(pipeline.detector).__name__} holds a Keras network: "
                     "scoring this export still needs TensorFlow (pip install 'kad[tf]')")
    return ExportRun(out, list(runtime.names), replaced, notes)


def _members(path: Path) -> list[str]:
    from kad.utils.artifact import read_manifest

    return list(read_manifest(path).get("members", {}))


def _publish(part: Path, out: Path, replaced: bool) -> None:
    """Rename the complete folder ``part`` to ``out``; an earlier export there (or an empty
    folder) is moved aside first and removed once ``out`` is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.kad-export-old")
        os.replace(out, old)
    try:
        os.replace(part, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        if replaced:
            for name in (*_FILES, MARKER):
                (old / name).unlink(missing_ok=True)
        old.rmdir()
