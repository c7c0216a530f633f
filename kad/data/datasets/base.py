"""The data model every loader returns: a :class:`Dataset` of labels over an
:class:`ImageSource` that knows where the pixels are.

Loading a dataset only lists and stats files; pixels are decoded later, on demand, by
:meth:`ImageSource.load` (feature extraction does that in parallel). Every item carries a
stable string id, its original class or grade (``target``) and, where the dataset defines
them, an anomaly flag, an official split and a patient id.

The :attr:`Dataset.fingerprint` identifies exactly this selection of items with these
labels: it changes when a file changes (size or modification time), when a label or the
label mapping changes, and is the same across runs and processes otherwise. Caches of
extracted features are keyed on it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kad.errors import DatasetError

__all__ = [
    "ArraySource",
    "Dataset",
    "DatasetOptionError",
    "FileSource",
    "ImageSource",
    "check_data_dir",
    "compute_fingerprint",
    "first_few",
    "read_table",
    "list_image_files",
    "natural_key",
    "relative_ids",
]

_KINDS = ("natural", "fundus")


class DatasetOptionError(DatasetError, ValueError):
    """A loader option with an unknown name or a bad value: a :class:`ValueError`, and a
    :class:`~kad.errors.KadError` so that the command line reports it in one line."""


class ImageSource(ABC):
    """Where the pixels of a dataset's items come from, in item order."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, i: int) -> np.ndarray:
        """Item ``i`` as an ``(H, W, 3)`` RGB ``uint8`` array."""

    @abstractmethod
    def describe(self, i: int) -> str:
        """A human-readable location of item ``i`` for error messages."""

    @abstractmethod
    def take(self, idx: np.ndarray) -> ImageSource:
        """A source holding items ``idx`` (integer positions), in that order."""

    @abstractmethod
    def update_hash(self, digest: Any) -> None:
        """Feed what identifies the items' content into a ``hashlib`` object, cheaply."""


class FileSource(ImageSource):
    """Images stored as files; decoded with :func:`kad.data.images.read_image`."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [p if isinstance(p, Path) else Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"FileSource({len(self.paths)} files)"

    def load(self, i: int) -> np.ndarray:
        from kad.data.images import read_image  # the decoder; raises ImageReadError

        return read_image(self.paths[i])

    def load_scaled(self, i: int, min_side: int) -> np.ndarray:
        """Item ``i``, decoded smaller where its format allows and its shorter side stays
        at least ``min_side`` (:func:`kad.data.images.read_image`)."""
        from kad.data.images import read_image

        return read_image(self.paths[i], min_side=min_side)

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def take(self, idx: np.ndarray) -> FileSource:
        return FileSource([self.paths[int(i)] for i in idx])

    def update_hash(self, digest: Any) -> None:
        """Size and modification time of every file (stat only, contents are not read). A
        file that cannot be stat'ed (a broken link, a file removed since listing) is hashed
        as such: it is reported as unreadable when its pixels are read, never fatal here."""
        for path in self.paths:
            try:
                st = path.stat()
            except OSError as exc:
                digest.update(f"unreadable:{exc.errno}\0".encode())
                continue
            digest.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())


class ArraySource(ImageSource):
    """Images held in memory as one array ``(N, H, W[, C])`` of any dtype.

    Each item is converted on load with :func:`kad.data.images.to_rgb_uint8`. ``index`` selects
    and orders rows of ``array`` without copying it; ``names`` (one per row of ``array``)
    are used in messages, e.g. ``"train[123]"``.
    """

    def __init__(
        self,
        array: np.ndarray,
        index: np.ndarray | None = None,
        names: Sequence[str] | None = None,
    ):
        self.array = array
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.names = None if names is None else np.asarray(names, dtype=str)
        if self.names is not None and len(self.names) != len(array):
            raise ValueError(
                f"ArraySource: {len(self.names)} names for an array of {len(array)} images"
            )
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self.array) if self.index is None else len(self.index)

    def __repr__(self) -> str:
        return f"ArraySource({len(self)} images of shape {self.array.shape[1:]})"

    def _row(self, i: int) -> int:
        return int(i) if self.index is None else int(self.index[i])

    def load(self, i: int) -> np.ndarray:
        from kad.data.images import to_rgb_uint8

        return to_rgb_uint8(self.array[self._row(i)])

    def describe(self, i: int) -> str:
        row = self._row(i)
        return str(self.names[row]) if self.names is not None else f"array[{row}]"

    def take(self, idx: np.ndarray) -> ArraySource:
        rows = np.asarray(idx, dtype=np.int64)
        if self.index is not None:
            rows = self.index[rows]
        child = ArraySource(self.array, rows)
        child.names = self.names
        child._digest = self._digest
        return child

    def array_digest(self) -> str:
        """sha256 of the whole array (dtype, shape, bytes), computed once."""
        if self._digest is None:
            h = hashlib.sha256()
            h.update(f"{self.array.dtype.str}{self.array.shape}".encode())
            h.update(memoryview(np.ascontiguousarray(self.array)).cast("B"))
            self._digest = h.hexdigest()
        return self._digest

    def update_hash(self, digest: Any) -> None:
        digest.update(self.array_digest().encode())
        if self.index is not None:
            digest.update(self.index.tobytes())


def list_image_files(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file under ``folder`` (recursively, sorted by relative path): image files, and
    the others as ``(path, reason)`` for :attr:`Dataset.skipped` (see :func:`skip_reason`).
    Nothing is decoded. (Plain strings until the end: pathlib is slow for 100,000 files.)
    This is the one folder walk of kad: datasets and ``kad score`` both use it."""

    base = os.fspath(folder)
    files = []
    for root, dirs, names in os.walk(base):
        dirs.sort()
        rel = os.path.relpath(root, base)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        files.extend((prefix + name, os.path.join(root, name), name) for name in names)
    files.sort()
    images: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for _, full, _name in files:
        reason = skip_reason(full)
        if reason is None:
            images.append(Path(full))
        else:
            skipped.append((full, reason))
    return images, skipped


#: Image formats that kad does not decode, named as such rather than as "not an image".
_OTHER_IMAGE_FORMATS = frozenset({
    ".gif", ".heic", ".heif", ".avif", ".exr", ".svg", ".ico", ".psd",
    ".raw", ".dng", ".nef", ".cr2", ".cr3", ".arw", ".orf", ".jxl", ".emf", ".wmf",
})


def skip_reason(path: str | os.PathLike) -> str | None:
    """Why the file ``path`` is not an image kad can read, or None when it may be one.

    Only the name and the link are looked at, never the content: a broken symbolic link,
    a name whose extension is not among :data:`kad.data.images.IMAGE_EXTENSIONS`, or a
    DICOM file (``.dcm``, ``.dicom``) where the ``dicom`` extra is not installed."""
    from kad.data.dicom import is_dicom, missing_reason
    from kad.data.images import broken_link, is_image_file

    broken = broken_link(path)
    if broken:
        return broken
    if is_image_file(path):
        return missing_reason() if is_dicom(path) else None
    suffix = Path(path).suffix.lower()
    if suffix in _OTHER_IMAGE_FORMATS:
        return (f"unsupported image format {suffix}: kad reads JPEG, PNG, TIFF, BMP, WebP, "
                "JPEG 2000, PNM and (with the dicom extra) DICOM files; convert it to PNG "
                "or JPEG")
    return f"not an image file ({suffix or 'no extension'})"


def first_few(names: Iterable[str], count: int = 5) -> str:
    """The first ``count`` names, and how many there are in all when there are more."""
    names = list(names)
    shown = ", ".join(names[:count])
    return shown + (f", ... ({len(names)} in all)" if len(names) > count else "")


def read_table(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> list[tuple[int, dict[str, str]]]:
    """Rows of a labels CSV as ``(line number, {column: value})``; column names are
    matched case-insensitively, blank lines ignored, and a UTF-8 byte-order mark (as
    Excel writes it) is read as such. Every labels CSV kad reads goes through here."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DatasetError(
                    f"labels file {path} is empty; it needs a header line "
                    f"{','.join(required)} and one row per image"
                )
            columns = [h.strip().lower() for h in header]
            missing = [c for c in required if c not in columns]
            if missing:
                raise DatasetError(
                    f"labels file {path} lacks the column(s) {', '.join(missing)}; found "
                    f"columns: {', '.join(repr(h) for h in header)}; expected a header line "
                    f"{','.join(required + optional)}"
                )
            where = {c: columns.index(c) for c in required + optional if c in columns}
            rows = []
            for record in reader:
                if not any(cell.strip() for cell in record):
                    continue
                values = {c: record[i].strip() if i < len(record) else "" for c, i in where.items()}
                rows.append((reader.line_num, values))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read labels file {path}: {exc}") from exc
    if not rows:
        raise DatasetError(f"labels file {path} has a header but no rows")
    for column in required:
        blank = [line for line, values in rows if not values[column]]
        if blank:
            raise DatasetError(
                f"labels file {path}: column {column!r} is empty on line(s) "
                f"{first_few(map(str, blank))}; fill it in or remove those rows"
            )
    return rows


def relative_ids(paths: Sequence[Path], root: Path) -> list[str]:
    """``paths`` (all under ``root``) relative to ``root``, with ``/`` separators."""
    start = len(os.path.join(os.fspath(root), ""))
    return [os.fspath(p)[start:].replace(os.sep, "/") for p in paths]


def check_data_dir(data_dir: str | os.PathLike | None, name: str, expected: str) -> Path:
    """``data_dir`` as an existing folder, or a :class:`DatasetError` saying what to pass."""
    if data_dir is None:
        raise DatasetError(
            f"dataset {name!r} is read from a folder: pass --data-dir (data_dir=...) "
            f"pointing at {expected}"
        )
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DatasetError(f"data folder {path} for dataset {name!r} does not exist")
    if not path.is_dir():
        raise DatasetError(
            f"data folder {path} for dataset {name!r} is not a folder; pass the folder "
            f"holding {expected}"
        )
    return path


def natural_key(text: str) -> tuple:
    """Sort key putting ``"2"`` before ``"10"`` and otherwise sorting alphabetically."""
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _str_array(values: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=str) if len(values) else np.zeros(0, dtype=str)
    if arr.shape != (n,):
        raise ValueError(f"Dataset: {what} has shape {arr.shape}, expected ({n},)")
    return arr


def compute_fingerprint(
    name: str,
    options: dict[str, Any],
    ids: np.ndarray,
    columns: dict[str, np.ndarray | None],
    source: ImageSource,
) -> str:
    """sha256 over the dataset name, the label options, every item's id and labels, and
    what identifies the items' content (file size and mtime, or the array bytes)."""
    h = hashlib.sha256()
    h.update(b"kad-dataset-v1\0")
    h.update(name.encode() + b"\0")
    h.update(json.dumps(options, sort_keys=True, default=str).encode() + b"\0")
    h.update("\0".join(ids.tolist()).encode() + b"\1")
    for key in sorted(columns):
        values = columns[key]
        h.update(key.encode() + b"=")
        if values is None:
            h.update(b"none\1")
        else:
            h.update("\0".join(str(v) for v in values.tolist()).encode() + b"\1")
    source.update_hash(h)
    return h.hexdigest()


@dataclass(eq=False)
class Dataset:
    """A labelled collection of images; see the module docstring."""

    name: str
    source: ImageSource
    ids: np.ndarray
    target: np.ndarray
    anomaly: np.ndarray | None = None
    split: np.ndarray | None = None
    patient: np.ndarray | None = None
    kind: str = "natural"
    fingerprint: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    #: The dataset's natural class order (CIFAR label order, grades ascending); classes
    #: not in it sort after it, naturally.
    class_order: tuple[str, ...] = ()
    #: The options that shaped the labels (e.g. ``{"anomaly_grades": [4]}``), for reports.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.source)
        self.ids = _str_array(self.ids, n, "ids")
        self.target = _str_array(self.target, n, "target")
        if self.anomaly is not None:
            self.anomaly = np.asarray(self.anomaly, dtype=bool)
            if self.anomaly.shape != (n,):
                raise ValueError(
                    f"Dataset: anomaly has shape {self.anomaly.shape}, expected ({n},)"
                )
        if self.split is not None:
            self.split = _str_array(self.split, n, "split")
        if self.patient is not None:
            self.patient = _str_array(self.patient, n, "patient")
        if self.kind not in _KINDS:
            raise ValueError(f"Dataset kind must be one of {_KINDS}, got {self.kind!r}")
        self.class_order = tuple(self.class_order)
        if not self.fingerprint:
            self.fingerprint = compute_fingerprint(
                self.name, self.options, self.ids, self._label_columns(), self.source
            )

    def _label_columns(self) -> dict[str, np.ndarray | None]:
        return {
            "target": self.target,
            "anomaly": None if self.anomaly is None else self.anomaly.astype(np.uint8),
            "split": self.split,
            "patient": self.patient,
            "kind": np.asarray([self.kind]),
        }

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"<Dataset {self.name!r}: {len(self)} images, {self.fingerprint[:12]}>"

    @property
    def classes(self) -> list[str]:
        """The distinct targets present, in the dataset's natural order."""
        present = set(self.target.tolist())
        ordered = [c for c in self.class_order if c in present]
        rest = sorted(present.difference(ordered), key=natural_key)
        return ordered + rest

    def counts(self) -> dict[str, int]:
        """Number of items per target, in :attr:`classes` order."""
        counter = Counter(self.target.tolist())
        return {c: counter[c] for c in self.classes}

    def subset(self, idx: Any) -> Dataset:
        """The rows ``idx`` (integer positions or a boolean mask), everything else kept."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(
                    f"subset: boolean mask of shape {idx.shape} for a dataset of {len(self)}"
                )
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset: index out of range for a dataset of {len(self)} images")
        idx = np.where(idx < 0, idx + len(self), idx)
        h = hashlib.sha256(f"{self.fingerprint}:subset:".encode())
        h.update(idx.tobytes())

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return replace(
            self,
            source=self.source.take(idx),
            ids=self.ids[idx],
            target=self.target[idx],
            anomaly=pick(self.anomaly),
            split=pick(self.split),
            patient=pick(self.patient),
            fingerprint=h.hexdigest(),
            skipped=list(self.skipped),
            excluded=dict(self.excluded),
            options=dict(self.options),
        )

    def summary(self) -> str:
        """One or two lines: size, per-target counts, anomalies, skipped and excluded."""
        counts = ", ".join(f"{k}: {v}" for k, v in self.counts().items())
        line = f"{self.name}: {len(self)} images ({counts})"
        if self.anomaly is not None:
            line += f", {int(self.anomaly.sum())} anomalous"
        if self.patient is not None:
            line += f", {len(set(self.patient.tolist()))} patients"
        if self.split is not None:
            splits = Counter(self.split.tolist())
            line += ", " + ", ".join(f"{k} {splits[k]}" for k in sorted(splits))
        extra = []
        if self.excluded:
            extra.append("excluded " + ", ".join(f"{k}: {v}" for k, v in self.excluded.items()))
        if self.skipped:
            named = "; ".join(f"{Path(p).name} ({why.split(';')[0]})"
                              for p, why in self.skipped[:3])
            more = f"; ... and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            extra.append(f"skipped {len(self.skipped)} file(s): {named}{more}")
        return line if not extra else line + "\n  " + "; ".join(extra)
