"""One-file artefacts for fitted detectors and pipelines, which cannot run code when loaded.

An artefact is a zip file of plain data:

``manifest.json``
    What it is (``kind``), the artefact ``format``, kad and library versions, a summary
    (``info``) and the SHA-256 of every other member.
``object.json``
    The object as a JSON tree: plain values (None, bool, int, float, str, lists, dicts with
    string keys) and tagged references to the members below. Tuples are kept as tuples.
``arrays/*.npy``
    NumPy arrays and scalars of numeric or string dtypes, read with ``allow_pickle=False``.
``sklearn/*.skops``
    scikit-learn objects, read by :mod:`skops.io` with an allow-list of types that kad
    builds (:func:`sklearn_trusted_types`), never one read from the file.
``keras/*.keras``
    Keras networks in Keras' own format, read with ``safe_mode=True`` (no Lambda layers,
    no arbitrary code; kad's custom networks are registered with
    ``keras.saving.register_keras_serializable``).

Nothing is unpickled. Loading checks the manifest first: a file from another kad version,
of an older format (format 1 held a pickle, which is refused unread), of another kind, a
member whose checksum does not match, a missing member or one the manifest does not list
is refused with one line naming the file and what to do. A value that cannot be stored
this way is refused when saving, naming where it is and its type.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import platform
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from kad import __version__
from kad.errors import ArtifactError, UnstorableError

FORMAT = 2
MANIFEST = "manifest.json"
OBJECT = "object.json"

#: Tags of ``object.json`` nodes that are not plain JSON values.
_TUPLE, _ARRAY, _SCALAR, _SKLEARN, _KERAS = "$tuple", "$array", "$scalar", "$sklearn", "$keras"
_TAGS = (_TUPLE, _ARRAY, _SCALAR, _SKLEARN, _KERAS)
_DTYPE_KINDS = "biufcSUM"  # bool, ints, floats, complex, bytes, str, datetime; never object


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape kad's numbers (only those already imported)."""
    versions = {"kad": __version__, "python": platform.python_version()}
    for name in ("numpy", "sklearn", "cv2", "keras", "tensorflow", "openvino"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return versions


@cache
def sklearn_trusted_types() -> tuple[str, ...]:
    """scikit-learn's internal types that kad allows in ``.skops`` members, on top of those
    skops trusts by default (scikit-learn estimators, NumPy dtypes and containers): the
    trees of tree ensembles and neighbour searches and their distance metrics. Detectors
    add their own needs with :attr:`kad.BaseDetector.trusted_types`."""
    from sklearn.metrics._dist_metrics import DistanceMetric64

    metrics = [f"{c.__module__}.{c.__qualname__}" for c in DistanceMetric64.__subclasses__()
               if c.__name__ != "PyFuncDistance64"]  # holds a Python callable
    return (
        "sklearn.tree._tree.Tree",
        "sklearn.neighbors._kd_tree.KDTree",
        "sklearn.neighbors._ball_tree.BallTree",
        *metrics,
    )


def _is_keras_model(value: Any) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(value, keras.Model)


def _is_sklearn(value: Any) -> bool:
    from sklearn.base import BaseEstimator

    return isinstance(value, BaseEstimator)


def _member_name(where: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-\[\]]", "_", where) or "root"


@dataclass
class Encoder:
    """Turns a value into an ``object.json`` tree and the members it refers to.

    ``trusted`` adds type names (as skops writes them) to :func:`sklearn_trusted_types`
    for scikit-learn values. A value that cannot be stored raises
    :class:`~kad.errors.UnstorableError` (a :class:`TypeError`) naming ``where`` it is and
    its type.
    """

    trusted: tuple[str, ...] = ()
    members: dict[str, bytes] = field(default_factory=dict)

    def encode(self, value: Any, where: str, plain: bool = False) -> Any:
        """The tree of ``value``; ``plain`` allows only JSON values and tuples (no arrays,
        scikit-learn objects or networks)."""
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.generic):
            if plain:
                return self.encode(value.item(), where, plain)
            return {_SCALAR: self._array(np.asarray(value), where)}
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, tuple):
            return {_TUPLE: [self.encode(v, f"{where}[{i}]", plain)
                             for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]", plain) for i, v in enumerate(value)]
        if isinstance(value, dict):
            out = {}
            for key, v in value.items():
                if not isinstance(key, str) or key.startswith("$"):
                    raise UnstorableError(
                        f"{where} has the key {key!r}: kad stores dicts whose keys are "
                        "strings not starting with '$'")
                out[key] = self.encode(v, f"{where}.{key}", plain)
            return out
        if not plain and isinstance(value, np.ndarray):
            return {_ARRAY: self._array(value, where)}
        if not plain and _is_keras_model(value):
            return {_KERAS: self._keras(value, where)}
        if not plain and _is_sklearn(value):
            return {_SKLEARN: self._sklearn(value, where)}
        allowed = ("None, bool, int, float, str, and tuples, lists and dicts of them" if plain
                   else "None, bool, int, float, str, NumPy arrays and scalars, scikit-learn "
                   "objects, Keras models, and tuples, lists and dicts of them")
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise UnstorableError(f"{where} is a {kind}, which a kad model file cannot hold; it "
                              f"holds {allowed}")

    def _add(self, folder: str, where: str, suffix: str, data: bytes) -> str:
        name = f"{folder}/{_member_name(where)}{suffix}"
        if name in self.members:
            raise UnstorableError(f"{where} clashes with another stored value ({name})")
        self.members[name] = data
        return name

    def _array(self, array: np.ndarray, where: str) -> str:
        if array.dtype.kind not in _DTYPE_KINDS:
            raise UnstorableError(f"{where} is an array of dtype {array.dtype}, which a kad "
                                  "model file cannot hold (only numeric and string arrays)")
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return self._add("arrays", where, ".npy", buffer.getvalue())

    def _sklearn(self, value: Any, where: str) -> str:
        import skops.io as sio

        data = sio.dumps(value)
        allowed = set(sklearn_trusted_types()) | set(self.trusted)
        outside = sorted(set(sio.get_untrusted_types(data=data)) - allowed)
        if outside:
            raise UnstorableError(
                f"{where} ({type(value).__qualname__}) holds types outside kad's allow-list: "
                f"{', '.join(outside)}; store its learned values as arrays instead, or list "
                "safe types in the detector's trusted_types"
            )
        return self._add("sklearn", where, ".skops", data)

    def _keras(self, model: Any, where: str) -> str:
        with tempfile.TemporaryDirectory() as folder:
            file = Path(folder) / "model.keras"
            try:
                model.save(file)
            except Exception as exc:  # Keras raises several kinds for unserialisable models
                raise UnstorableError(
                    f"{where} ({type(model).__qualname__}) cannot be saved in Keras' format "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); register "
                    "custom layers and models with keras.saving.register_keras_serializable "
                    "and give them a get_config"
                ) from exc
            return self._add("keras", where, ".keras", file.read_bytes())


def write_artifact(path: str | Path, kind: str, tree: Any, members: dict[str, bytes],
                   info: dict | None = None) -> Path:
    """Atomically write an artefact (parent folders are created); ``tree`` and ``members``
    come from an :class:`Encoder`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {OBJECT: json.dumps(tree, indent=1).encode(), **members}
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "members": {name: hashlib.sha256(data).hexdigest() for name, data in content.items()},
        "info": info or {},
    }
    from kad.utils.files import atomic_write

    with atomic_write(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2, default=_summary))
        for name, data in content.items():
            # Floating-point arrays barely deflate (7% for features) at a cost of about
            # a second per 10 MB: binary members are stored as they are.
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if name == OBJECT
                        else zipfile.ZIP_STORED)
    return path


def _summary(value: Any) -> Any:
    """NumPy values in the manifest's human-readable summary, as JSON values."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"the model file's summary cannot hold a {type(value).__name__}")


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no saved kad model at {path}: the file does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read(MANIFEST))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError,
            OSError) as exc:
        raise ArtifactError(
            f"{path} is not a kad model file or is corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a kad model file: its manifest is not an object")
    return manifest


@dataclass
class Artifact:
    """A checked artefact: its manifest, its ``object.json`` tree (still encoded) and its
    members. :meth:`decode` turns a node of the tree into values."""

    path: Path
    manifest: dict
    tree: Any
    members: dict[str, bytes]

    def fail(self, message: str) -> ArtifactError:
        return ArtifactError(f"{self.path}: {message}")

    def decode(self, node: Any, where: str, trusted: Iterable[str] = (),
               plain: bool = False) -> Any:
        """Values of ``node``; ``trusted`` adds type names to kad's scikit-learn allow-list,
        ``plain`` refuses anything but JSON values and tuples."""
        trusted = tuple(trusted)
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, f"{where}[{i}]", trusted, plain) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self.fail(f"{where} holds a {type(node).__name__}, which is not kad data")
        tags = [k for k in node if k.startswith("$")]
        if not tags:
            return {k: self.decode(v, f"{where}.{k}", trusted, plain) for k, v in node.items()}
        if len(node) != 1 or tags[0] not in _TAGS:
            raise self.fail(f"{where} is tagged {', '.join(map(repr, tags))}, which kad does "
                            f"not read (it reads {', '.join(_TAGS)})")
        tag, value = tags[0], node[tags[0]]
        if tag == _TUPLE:
            if not isinstance(value, list):
                raise self.fail(f"{where} is a malformed tuple")
            return tuple(self.decode(v, f"{where}[{i}]", trusted, plain)
                         for i, v in enumerate(value))
        if plain:
            raise self.fail(f"{where} must be a plain value, but it refers to {value!r}")
        data = self._member(value, where)
        if tag in (_ARRAY, _SCALAR):
            array = self._array(data, value)
            return array[()] if tag == _SCALAR else array
        if tag == _SKLEARN:
            return self._sklearn(data, value, trusted)
        return self._keras(data, value)

    def _member(self, name: Any, where: str) -> bytes:
        if not isinstance(name, str) or name not in self.members or name == OBJECT:
            raise self.fail(f"{where} refers to {name!r}, which is not a member of the file")
        return self.members[name]

    def _array(self, data: bytes, name: str) -> np.ndarray:
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:  # object arrays need pickle: refused
            raise self.fail(f"{name} cannot be read without unpickling ({exc}); the file is "
                            "refused") from exc
        except Exception as exc:
            raise self.fail(f"{name} is not a NumPy array ({type(exc).__name__}: {exc})") from exc
        if not isinstance(array, np.ndarray) or array.dtype.kind not in _DTYPE_KINDS:
            raise self.fail(f"{name} is not a numeric or string NumPy array")
        return array

    def _sklearn(self, data: bytes, name: str, trusted: tuple[str, ...]) -> Any:
        import skops.io as sio
        from skops.io.exceptions import UntrustedTypesFoundException

        allowed = [*sklearn_trusted_types(), *trusted]
        try:
            return sio.loads(data, trusted=allowed)
        except UntrustedTypesFoundException as exc:
            found = sorted(set(sio.get_untrusted_types(data=data)) - set(allowed))
            raise self.fail(f"{name} names types outside kad's allow-list "
                            f"({', '.join(found) or exc}); the file is refused") from exc
        except Exception as exc:
            raise self.fail(f"{name} could not be read ({type(exc).__name__}: {exc})") from exc

    def _keras(self, data: bytes, name: str) -> Any:
        from kad.utils.deps import import_keras

        keras = import_keras()
        with tempfile.TemporaryDirectory() as folder:
            file = Path(folder) / "model.keras"
            file.write_bytes(data)
            try:
                return keras.saving.load_model(file, compile=False, safe_mode=True)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                raise self.fail(
                    f"the network {name} could not be loaded in Keras' safe mode "
                    f"({type(exc).__name__}: {first}); the file is refused"
                ) from exc


def _checked(path: Path, manifest: dict, kind: str) -> None:
    fmt = manifest.get("format")
    if fmt != FORMAT:
        if fmt == 1:
            raise ArtifactError(
                f"{path} is a model file of format 1, which held a pickle: kad no longer reads "
                "those, since loading one could run code; refit the model with this version "
                f"of kad (format {FORMAT})"
            )
        raise ArtifactError(f"{path} is a kad model file of format {fmt!r}; this kad reads "
                            f"format {FORMAT}: refit the model with this version")
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{path} holds a {manifest.get('kind')!r}, not a {kind!r}")
    saved = manifest.get("versions", {}).get("kad") if isinstance(
        manifest.get("versions"), dict) else None
    if saved != __version__:
        raise ArtifactError(
            f"{path} was saved by kad {saved} and this is kad {__version__}; scores could "
            f"differ, so it is refused: refit it with this version, or install kad=={saved}"
        )


def open_artifact(path: str | Path, kind: str) -> Artifact:
    """Read and check the artefact at ``path`` (see the module docstring); nothing in it is
    decoded yet."""
    path = Path(path)
    manifest = read_manifest(path)
    _checked(path, manifest, kind)
    listed = manifest.get("members")
    if not isinstance(listed, dict) or OBJECT not in listed:
        raise ArtifactError(f"{path} is corrupt: its manifest does not list its members")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n != MANIFEST]
            unexpected = sorted(set(names) - set(listed))
            if unexpected:
                raise ArtifactError(
                    f"{path} holds members its manifest does not list "
                    f"({', '.join(unexpected)}); the file is refused"
                )
            members = {name: zf.read(name) for name in listed}
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ArtifactError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from exc
    for name, data in members.items():
        if hashlib.sha256(data).hexdigest() != listed[name]:
            raise ArtifactError(f"{path} is corrupt: its member {name} does not match its "
                                "checksum")
    try:
        tree = json.loads(members.pop(OBJECT), parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is corrupt: {OBJECT} is not JSON that kad reads "
                            f"({type(exc).__name__}: {exc})") from exc
    unused = sorted(set(members) - set(_references(tree)))
    if unused:
        raise ArtifactError(f"{path} holds members that nothing in it refers to "
                            f"({', '.join(unused)}); the file is refused")
    return Artifact(path, manifest, tree, members)


def _references(node: Any) -> Iterable[str]:
    """Member names that the tagged nodes of ``node`` refer to."""
    if isinstance(node, list):
        for value in node:
            yield from _references(value)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in _TAGS and key != _TUPLE and isinstance(value, str):
                yield value
            else:
                yield from _references(value)


def _constant(name: str) -> float:
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]
