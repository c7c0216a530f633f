"""``kad export``: a fitted pipeline written as a folder that scores with kad's core and
OpenVINO alone (the layout: :mod:`kad.features.exported`).

:func:`export_pipeline` builds the pipeline's network in Keras, checks its weights against
the pipeline's fingerprint, converts it to OpenVINO (or reuses the cached conversion,
:func:`kad.features.runtime.model_runtime`) and writes the IR, the pipeline's model file
and ``kad-export.json``. The folder is written beside ``DIR`` under a temporary name and
renamed when complete; an existing ``DIR`` is replaced only with ``overwrite`` and only
when it holds nothing but a kad export, so a file kad did not write is never deleted.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kad import __version__
from kad.errors import KadError
from kad.features.exported import (
    EXPORT_FORMAT,
    FILES,
    MARKER,
    NETWORK_BIN,
    NETWORK_XML,
    PIPELINE_FILE,
    input_scaling,
)
from kad.screening.pipeline import Pipeline, load_pipeline
from kad.utils.files import file_sha256

__all__ = ["ExportRun", "export_pipeline"]


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
    ours = set(FILES) | {MARKER}
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
    quantization = None
    if pipeline.quantization is not None:  # the int8 network it was fitted and scores with
        from kad.features.int8 import Quantization

        quantization = Quantization.from_record(pipeline.quantization)
    runtime = model_runtime(pipeline.representation.network(network, pipeline.all_blocks),
                            pipeline.backbone, pipeline.image_size, pipeline.weights_used,
                            "openvino", pipeline.network_batch, log_line=log_line,
                            extractor=network, quantization=quantization)
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
                if file_sha256(part / name) != digest:
                    raise KadError(f"{part / name} does not match the conversion it was "
                                   "copied from; export again")
            pipeline.save(part / PIPELINE_FILE, with_maps=False)  # its network is not here
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
                "precision": pipeline.precision,
                "files": {name: file_sha256(part / name) for name in FILES},
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
    if pipeline.maps is not None:
        notes.append(f"the model's lesion maps model ({type(pipeline.maps.detector).__name__} "
                     f"at {pipeline.maps.image_size} px) is not exported: heatmaps of the "
                     "export come from its own detector; use the model file for the lesion "
                     "maps")
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
            for name in (*FILES, MARKER):
                (old / name).unlink(missing_ok=True)
        try:
            old.rmdir()
        except OSError:  # something appeared there meanwhile: kept, never deleted
            pass
