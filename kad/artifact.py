"""One-file artefacts for fitted detectors and pipelines.

An artefact is a zip file holding ``manifest.json`` (what it is, kad and library versions,
a SHA-256 of the payload) and ``payload.pkl`` (the pickled object; Keras 3 models pickle
through their own ``.keras`` format). Loading checks the manifest before unpickling: a
file from another kad version, a corrupt file or a file of another kind is refused with a
clear error rather than scoring wrongly.

Loading unpickles: only load artefacts you trust, as with any pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import sys
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ArtifactError

FORMAT = 1
_MANIFEST = "manifest.json"
_PAYLOAD = "payload.pkl"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape kad's numbers (only those already imported)."""
    versions = {"kad": __version__, "python": platform.python_version()}
    for name in ("numpy", "sklearn", "cv2", "keras", "tensorflow", "openvino"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return versions


def save_artifact(obj: Any, path: str | Path, kind: str, info: dict | None = None) -> Path:
    """Atomically write ``obj`` to ``path`` (a file; parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "class": f"{type(obj).__module__}.{type(obj).__qualname__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "info": info or {},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(_MANIFEST, json.dumps(manifest, indent=2))
            zf.writestr(_PAYLOAD, payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no saved kad model at {path}: the file does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read(_MANIFEST))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise ArtifactError(
            f"{path} is not a kad model file or is corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    return manifest


def load_artifact(path: str | Path, kind: str) -> Any:
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("format") != FORMAT or manifest.get("kind") != kind:
        raise ArtifactError(
            f"{path} holds a {manifest.get('kind')!r} artefact of format "
            f"{manifest.get('format')!r}; expected a {kind!r} of format {FORMAT}"
        )
    saved = manifest.get("versions", {}).get("kad")
    if saved != __version__:
        raise ArtifactError(
            f"{path} was saved by kad {saved} and this is kad {__version__}; scores could "
            f"differ, so it is refused: refit it with this version, or install kad=={saved}"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            payload = zf.read(_PAYLOAD)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ArtifactError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from exc
    if hashlib.sha256(payload).hexdigest() != manifest.get("sha256"):
        raise ArtifactError(f"{path} is corrupt: its payload does not match its checksum")
    try:
        return pickle.loads(payload)
    except Exception as exc:
        raise ArtifactError(
            f"{path} could not be loaded ({type(exc).__name__}: {exc}); was it saved with "
            "a detector plugin that is not installed here?"
        ) from exc


