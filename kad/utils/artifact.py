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

Nothing is unpickled. Loading checks the manifest first: a file of another format (format
1 held a pickle, which is refused unread), of another kind, a member whose checksum does
not match, a missing member or one the manifest does not list is refused with one line
naming the file and what to do.

**Versions.** A file loads in any kad that reads its ``format`` (:data:`FORMAT`, the layout
described here) and the state version of its detector
(:attr:`kad.BaseDetector.state_version`, recorded in the detector's record). The kad version
that wrote the file is recorded in ``versions`` and shown, but does not decide: a patch or
minor release that changes neither reads the files of the one before. A release that
changes the layout raises :data:`FORMAT`; a detector whose learned state changes raises
its ``state_version`` (and may read the older one,
:meth:`kad.BaseDetector.upgrade_fitted_state`). Anything else is refused in one line naming
the file, the versions found and expected, and what to do. A value that cannot be stored
this way is refused when saving, naming where it is and its type.

Opening a file costs memory and time in proportion to what it declares, and what it may
declare is bounded (:class:`Limits`): before anything is inflated, the zip's central
directory is checked for its size, the number of members, each member's declared size,
their total, and the compression ratio of large members (kad stores arrays uncompressed, so
a member that inflates more than :data:`MAX_RATIO` times is a bomb, not a model); the
manifest and ``object.json`` have their own small limits. Each member is then read through
a stream that stops at its declared size: one that inflates to more, or to less, is refused.
The zips inside members (``.skops`` and ``.keras`` files) are checked the same way before
scikit-learn or Keras open them. A kNN detector's training matrix can reach hundreds of MB:
the defaults allow members of :data:`MAX_MEMBER_BYTES` and files of :data:`MAX_TOTAL_BYTES`;
``KAD_MODEL_MAX_BYTES`` (bytes, e.g. ``32e9``) raises both for larger models, and
:func:`open_artifact` takes explicit ``limits``. Every refusal is one line naming the file,
the member and the limit.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import re
import struct
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from kad import __version__
from kad.errors import ArtifactError, UnstorableError

#: The layout of a model file. Raised only when the layout changes; a file loads in any kad
#: that reads its format (and its detector's state version), whatever kad version wrote it.
FORMAT = 2
MANIFEST = "manifest.json"
OBJECT = "object.json"

#: The manifest is a small summary; ``object.json`` holds settings and score lists.
MAX_MANIFEST_BYTES = 4 * 2**20
MAX_OBJECT_BYTES = 64 * 2**20
#: Members of a file (kad writes one per array, scikit-learn object or network).
MAX_MEMBERS = 4096
#: The central directory lists the members: about 100 bytes each.
MAX_DIRECTORY_BYTES = 2 * 2**20
#: One member (a kNN training matrix: 100,000 images of 1,536 float32 features is 600 MB)
#: and all of them together; ``KAD_MODEL_MAX_BYTES`` raises both.
MAX_MEMBER_BYTES = 4 * 2**30
MAX_TOTAL_BYTES = 8 * 2**30
#: The most a member larger than :data:`RATIO_FLOOR` may inflate (kad deflates only JSON,
#: about 3 to 1; arrays are stored as they are).
MAX_RATIO = 50
RATIO_FLOOR = 2**20
#: Nesting of ``object.json`` (kad writes a few levels).
MAX_JSON_DEPTH = 64
LIMIT_ENV = "KAD_MODEL_MAX_BYTES"
_CHUNK = 2**20

#: Tags of ``object.json`` nodes that are not plain JSON values.
_TUPLE, _ARRAY, _SCALAR, _SKLEARN, _KERAS = "$tuple", "$array", "$scalar", "$sklearn", "$keras"
_TAGS = (_TUPLE, _ARRAY, _SCALAR, _SKLEARN, _KERAS)
_DTYPE_KINDS = "biufcSUM"  # bool, ints, floats, complex, bytes, str, datetime; never object


@dataclass(frozen=True)
class Limits:
    """What a model file may declare before anything in it is inflated (see the module
    docstring); :meth:`from_env` reads ``KAD_MODEL_MAX_BYTES``."""

    manifest_bytes: int = MAX_MANIFEST_BYTES
    object_bytes: int = MAX_OBJECT_BYTES
    members: int = MAX_MEMBERS
    directory_bytes: int = MAX_DIRECTORY_BYTES
    member_bytes: int = MAX_MEMBER_BYTES
    total_bytes: int = MAX_TOTAL_BYTES
    ratio: float = MAX_RATIO

    @classmethod
    def from_env(cls) -> Limits:
        raw = os.environ.get(LIMIT_ENV)
        if not raw:
            return cls()
        try:
            value = int(float(raw))
        except (ValueError, OverflowError):
            value = 0
        if value < 1:
            raise ArtifactError(f"{LIMIT_ENV}={raw!r} is not a size in bytes (a positive "
                                "number, e.g. 32e9)")
        return cls(member_bytes=value, total_bytes=max(value, MAX_TOTAL_BYTES))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{int(n)} bytes"


def _check_directory(fh, label: str, limits: Limits) -> None:
    """Refuse a zip whose central directory is too large or lists too many members, before
    :mod:`zipfile` parses it (``fh``: the open file, ``label``: how to name it)."""
    try:
        end = zipfile._EndRecData(fh)
    except (OSError, ValueError, struct.error):
        end = None
    if end is None:  # not a zip: zipfile names the problem
        return
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > limits.members:
        raise ArtifactError(f"{label} lists {entries} members, more than the {limits.members} "
                            "a kad model file may hold; the file is refused")
    if size > limits.directory_bytes:
        raise ArtifactError(f"{label} has a central directory of {_mib(size)}, more than the "
                            f"{_mib(limits.directory_bytes)} allowed; the file is refused")
    fh.seek(0)


def _check_members(zf: zipfile.ZipFile, label: str, limits: Limits,
                   small: dict[str, int] | None = None) -> dict[str, zipfile.ZipInfo]:
    """The members of ``zf`` by name, after checking from the central directory alone their
    number, names, methods, declared sizes, total and compression ratios; ``small`` gives
    lower size limits to some members."""
    infos = zf.infolist()
    if len(infos) > limits.members:
        raise ArtifactError(f"{label} holds {len(infos)} members, more than the "
                            f"{limits.members} a kad model file may hold; the file is refused")
    found: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        if name in found:
            raise ArtifactError(f"{label} holds the member {name} twice; the file is refused")
        if info.flag_bits & 0x1:
            raise ArtifactError(f"{label}: the member {name} is encrypted; the file is refused")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArtifactError(f"{label}: the member {name} is compressed with method "
                                f"{info.compress_type}, which kad does not read (it writes "
                                "stored and deflated members); the file is refused")
        limit = (small or {}).get(name, limits.member_bytes)
        if info.file_size > limit:
            raise ArtifactError(
                f"{label}: the member {name} declares {_mib(info.file_size)}, more than the "
                f"{_mib(limit)} allowed; the file is refused (set {LIMIT_ENV} for larger "
                "models)")
        if (info.file_size > RATIO_FLOOR
                and info.file_size > limits.ratio * max(info.compress_size, 1)):
            ratio = info.file_size / max(info.compress_size, 1)
            raise ArtifactError(
                f"{label}: the member {name} would inflate {ratio:.0f} "
                f"times ({_mib(info.compress_size)} to {_mib(info.file_size)}), more than the "
                f"{limits.ratio:g} times allowed; the file is refused")
        total += info.file_size
        if total > limits.total_bytes:
            raise ArtifactError(
                f"{label}: its members declare more than {_mib(limits.total_bytes)} in all; "
                f"the file is refused (set {LIMIT_ENV} for larger models)")
        found[name] = info
    return found


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> bytes:
    """The member's bytes, read through a stream that stops at its declared size; a member
    that inflates to more or less than it declares is refused."""
    out = bytearray(info.file_size)
    view = memoryview(out)
    done = 0
    with zf.open(info) as fh:
        while True:
            chunk = fh.read(min(_CHUNK, info.file_size - done + 1))
            if not chunk:
                break
            if done + len(chunk) > info.file_size:
                raise ArtifactError(f"{label}: the member {info.filename} inflates to more than "
                                    f"the {info.file_size} bytes it declares; the file is "
                                    "refused")
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
    if done != info.file_size:
        raise ArtifactError(f"{label}: the member {info.filename} holds {done} bytes, not the "
                            f"{info.file_size} it declares; the file is refused")
    return bytes(out)


def check_inner_zip(data: bytes, label: str, limits: Limits | None = None) -> None:
    """Refuse a zip held in a member (a ``.skops`` or ``.keras`` file) that is too large
    for the bytes it is made of, before the library that reads it inflates anything."""
    limits = limits or Limits.from_env()
    inner = Limits(members=limits.members, directory_bytes=limits.directory_bytes,
                   member_bytes=min(limits.member_bytes,
                                    int(limits.ratio * len(data)) + RATIO_FLOOR),
                   total_bytes=min(limits.total_bytes,
                                   int(limits.ratio * len(data)) + RATIO_FLOOR),
                   ratio=limits.ratio)
    buffer = io.BytesIO(data)
    try:
        _check_directory(buffer, label, inner)
        with zipfile.ZipFile(buffer) as zf:
            _check_members(zf, label, inner)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArtifactError(f"{label} is not a readable zip ({type(exc).__name__}: {exc}); "
                            "the file is refused") from exc


def _json_depth_ok(node: Any, limit: int) -> bool:
    """True when ``node`` nests no deeper than ``limit`` (checked without recursion)."""
    stack = [(node, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return True


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


def _open_zip(path: Path, limits: Limits):
    """The open zip of ``path`` and its checked members, or a one-line refusal."""
    if not path.is_file():
        raise ArtifactError(f"no saved kad model at {path}: the file does not exist")
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed with the zip)
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc
    try:
        _check_directory(fh, str(path), limits)
        zf = zipfile.ZipFile(fh)
    except ArtifactError:
        fh.close()
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        fh.close()
        raise ArtifactError(
            f"{path} is not a kad model file or is corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        infos = _check_members(zf, str(path), limits, {MANIFEST: limits.manifest_bytes,
                                                        OBJECT: limits.object_bytes})
    except BaseException:
        zf.close()
        fh.close()
        raise
    return fh, zf, infos


def _manifest(path: Path, zf: zipfile.ZipFile, infos: dict) -> dict:
    if MANIFEST not in infos:
        raise ArtifactError(f"{path} is not a kad model file or is corrupt: it has no "
                            f"{MANIFEST}")
    try:
        manifest = json.loads(_read_member(zf, infos[MANIFEST], str(path)))
    except (zipfile.BadZipFile, ValueError, UnicodeDecodeError, RecursionError, OSError,
            EOFError, zlib.error) as exc:
        raise ArtifactError(
            f"{path} is not a kad model file or is corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a kad model file: its manifest is not an object")
    if not _json_depth_ok(manifest, MAX_JSON_DEPTH):
        raise ArtifactError(f"{path} is corrupt: its manifest nests deeper than "
                            f"{MAX_JSON_DEPTH} levels")
    return manifest


def read_manifest(path: str | Path, limits: Limits | None = None) -> dict:
    """The manifest of the model file at ``path``, read within ``limits``."""
    path = Path(path)
    fh, zf, infos = _open_zip(path, limits or Limits.from_env())
    with fh, zf:
        return _manifest(path, zf, infos)


@dataclass
class Artifact:
    """A checked artefact: its manifest, its ``object.json`` tree (still encoded) and its
    members. :meth:`decode` turns a node of the tree into values."""

    path: Path
    manifest: dict
    tree: Any
    members: dict[str, bytes]
    limits: Limits = field(default_factory=Limits)

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
        self._check_npy_header(data, name)
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

    def _check_npy_header(self, data: bytes, name: str) -> None:
        """Refuse an ``.npy`` member whose header declares a dtype kad does not store, or a
        shape whose data is not exactly the bytes that follow, before NumPy allocates it."""
        from numpy.lib import format as npy

        buffer = io.BytesIO(data)
        try:
            version = npy.read_magic(buffer)
            if version == (1, 0):
                shape, fortran, dtype = npy.read_array_header_1_0(buffer)
            elif version == (2, 0):
                shape, fortran, dtype = npy.read_array_header_2_0(buffer)
            else:
                raise ValueError(f"NumPy format version {version} is not one kad writes")
        except (ValueError, TypeError, SyntaxError, OverflowError, MemoryError) as exc:
            raise self.fail(f"{name} is not a NumPy array ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
        if dtype.hasobject:
            raise self.fail(f"{name} cannot be read without unpickling (an object array); "
                            "the file is refused")
        if dtype.kind not in _DTYPE_KINDS or len(shape) > 32:
            raise self.fail(f"{name} is not a numeric or string NumPy array")
        count = math.prod(int(v) for v in shape)
        if count * dtype.itemsize != len(data) - buffer.tell():
            raise self.fail(f"{name} is damaged: its header declares {shape} of {dtype} "
                            f"({count * dtype.itemsize} bytes) but it holds "
                            f"{len(data) - buffer.tell()} bytes of data; the file is refused")

    def _sklearn(self, data: bytes, name: str, trusted: tuple[str, ...]) -> Any:
        import skops.io as sio

        check_inner_zip(data, f"{self.path}: {name}", self.limits)
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

        check_inner_zip(data, f"{self.path}: {name}", self.limits)
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


def written_by(manifest: dict) -> str:
    """The kad version recorded in a manifest as the one that wrote the file (shown in
    messages and reports; it does not decide whether the file loads), or ``"?"``."""
    versions = manifest.get("versions")
    saved = versions.get("kad") if isinstance(versions, dict) else None
    return saved if isinstance(saved, str) and saved else "?"


def _checked(path: Path, manifest: dict, kind: str) -> None:
    """Refuse a file of another format or kind. Whether a file loads is decided by its
    format (:data:`FORMAT`) and by the state version of its detectors
    (:attr:`kad.BaseDetector.state_version`), never by the kad version that wrote it."""
    fmt = manifest.get("format")
    if fmt != FORMAT:
        saved = written_by(manifest)
        if fmt == 1:
            raise ArtifactError(
                f"{path} is a model file of format 1, which held a pickle: kad no longer reads "
                "those, since loading one could run code; refit the model with `kad fit` "
                f"(this kad {__version__} writes format {FORMAT})"
            )
        other = f"kad {saved}" if saved != "?" else "the kad version that wrote it"
        raise ArtifactError(
            f"{path} is a kad model file of format {fmt!r}, written by kad {saved}; this kad "
            f"{__version__} reads format {FORMAT}: refit the model with `kad fit`, or load it "
            f"with {other}")
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{path} holds a {manifest.get('kind')!r}, not a {kind!r}")


def open_artifact(path: str | Path, kind: str, limits: Limits | None = None) -> Artifact:
    """Read and check the artefact at ``path`` within ``limits`` (by default
    :meth:`Limits.from_env`; see the module docstring); nothing in it is decoded yet."""
    path = Path(path)
    limits = limits or Limits.from_env()
    fh, zf, infos = _open_zip(path, limits)
    with fh, zf:
        manifest = _manifest(path, zf, infos)
        _checked(path, manifest, kind)
        listed = manifest.get("members")
        if (not isinstance(listed, dict) or OBJECT not in listed
                or not all(isinstance(v, str) for v in listed.values())):
            raise ArtifactError(f"{path} is corrupt: its manifest does not list its members")
        unexpected = sorted(set(infos) - set(listed) - {MANIFEST})
        if unexpected:
            raise ArtifactError(
                f"{path} holds members its manifest does not list "
                f"({', '.join(unexpected[:10])}); the file is refused"
            )
        missing = sorted(set(listed) - set(infos))
        if missing:
            raise ArtifactError(f"{path} is corrupt: its member {missing[0]} is missing")
        try:
            members = {name: _read_member(zf, infos[name], str(path)) for name in listed}
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as exc:
            raise ArtifactError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from exc
    for name, data in members.items():
        if hashlib.sha256(data).hexdigest() != listed[name]:
            raise ArtifactError(f"{path} is corrupt: its member {name} does not match its "
                                "checksum")
    try:
        tree = json.loads(members.pop(OBJECT), parse_constant=_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is corrupt: {OBJECT} is not JSON that kad reads "
                            f"({type(exc).__name__}: {exc})") from exc
    if not _json_depth_ok(tree, MAX_JSON_DEPTH):
        raise ArtifactError(f"{path} is corrupt: {OBJECT} nests deeper than {MAX_JSON_DEPTH} "
                            "levels")
    unused = sorted(set(members) - set(_references(tree)))
    if unused:
        raise ArtifactError(f"{path} holds members that nothing in it refers to "
                            f"({', '.join(unused[:10])}); the file is refused")
    return Artifact(path, manifest, tree, members, limits)


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
