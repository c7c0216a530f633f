"""The on-disk feature cache.

One entry holds the spatially averaged output of every block of one backbone for every image
of one dataset. An entry is a folder::

    <root>/<dataset>-<backbone>-<key>/
        meta.json            block names and sizes, image ids, failed images, the key's inputs
        blocks/<block>.npy   float32 (n_images, block_dim), one file per block

The key hashes the dataset fingerprint, the backbone and its options, the weights identity,
the input size and the preprocessing. Blocks are separate ``.npy`` files read memory-mapped,
so one block, a few, or their concatenation are read without loading the rest.

Writes are atomic: an entry is built in ``<entry>.partial/`` and renamed into place once
complete. The partial folder records how many rows are done after each flushed batch, so an
interrupted extraction resumes where it stopped; a lock file keeps two processes from
writing the same entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import KadError

CACHE_FORMAT = 2  # 2: images with nothing to screen in them are marked failed
_META = "meta.json"
_PROGRESS = "progress.json"


def cache_root() -> Path:
    """``$KAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/kad``, else ``~/.cache/kad``."""
    explicit = os.environ.get("KAD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kad"


def cache_key(inputs: dict) -> str:
    text = json.dumps({"format": CACHE_FORMAT, **inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class FeatureSet:
    """A complete cache entry, read-only.

    ``blocks`` lists the block names in network order; ``valid`` is False for images that
    could not be read (their rows are zeros and must not be used); ``failed`` says why.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / _META
        if not meta_path.is_file():
            raise KadError(f"{self.path} is not a complete kad feature cache entry")
        self.meta = json.loads(meta_path.read_text())
        self.blocks: list[str] = list(self.meta["blocks"])
        self.dims: dict[str, int] = dict(zip(self.blocks, self.meta["dims"], strict=True))
        self.ids = np.asarray(self.meta["ids"], dtype=str)
        self.failed: dict[str, str] = dict(self.meta.get("failed", {}))
        self.valid = ~np.isin(self.ids, list(self.failed)) if self.failed else np.ones(
            len(self.ids), dtype=bool)
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"<FeatureSet {self.meta['inputs']['backbone']} on {self.meta['dataset']}: "
                f"{len(self)} images, {len(self.blocks)} blocks>")

    @property
    def key(self) -> str:
        return self.meta["key"]

    def block(self, name: str) -> np.ndarray:
        """The memory-mapped ``(n_images, dim)`` array of one block."""
        if name not in self.dims:
            raise KadError(
                f"unknown block {name!r} for {self.meta['inputs']['backbone']}; blocks: "
                f"{', '.join(self.blocks)}"
            )
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / "blocks" / f"{_safe(name)}.npy",
                                         mmap_mode="r")
        return self._arrays[name]

    def resolve(self, representation: str | Sequence[str] = "concat") -> list[str]:
        """Block names for a representation: ``"concat"`` (every block), one block name, a
        comma-separated list or a sequence of names."""
        if isinstance(representation, str):
            if representation == "concat":
                return list(self.blocks)
            representation = [r.strip() for r in representation.split(",") if r.strip()]
        names = list(representation)
        if not names:
            raise KadError("empty representation: name 'concat' or at least one block")
        for name in names:
            self.block(name)  # validates
        return names

    def matrix(self, representation: str | Sequence[str] = "concat",
               rows: np.ndarray | None = None) -> np.ndarray:
        """Features of ``rows`` (all by default) for a representation, as one float32 array.

        Only the requested rows of the requested blocks are read from disk.
        """
        names = self.resolve(representation)
        index = np.arange(len(self)) if rows is None else np.asarray(rows)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        order = np.argsort(index, kind="stable")  # sorted reads are sequential on disk
        width = sum(self.dims[n] for n in names)
        out = np.empty((len(index), width), dtype=np.float32)
        col = 0
        for name in names:
            dim = self.dims[name]
            out[order, col:col + dim] = self.block(name)[index[order]]
            col += dim
        return out


class EntryWriter:
    """Builds an entry in ``<entry>.partial/``; see the module docstring.

    Rows are written with ``os.pwrite`` at their place in each block's ``.npy`` file, not
    through writable memory maps, whose dirty pages would stay in the process's resident
    memory until the end: memory stays flat however large the dataset. ``sync`` makes the
    written rows durable and only then records them as done, so a resumed extraction never
    trusts rows that did not reach the disk.
    """

    def __init__(self, final: Path, blocks: list[str], dims: list[int], n: int, meta: dict):
        self.final = final
        self.partial = final.with_name(final.name + ".partial")
        self.blocks, self.dims, self.n, self.meta = blocks, dims, n, meta
        fresh = not (self.partial / _PROGRESS).is_file()
        if not fresh:
            progress = json.loads((self.partial / _PROGRESS).read_text())
            if progress.get("blocks") != blocks or progress.get("n") != n:
                fresh = True  # written by a different layout: start over
        if fresh:
            shutil.rmtree(self.partial, ignore_errors=True)
            (self.partial / "blocks").mkdir(parents=True)
            progress = {"blocks": blocks, "dims": dims, "n": n, "done": 0, "failed": {}}
            for name, dim in zip(blocks, dims, strict=True):
                np.lib.format.open_memmap(self._file(name), mode="w+", dtype="<f4",
                                          shape=(n, dim)).flush()
            _write_json(self.partial / _PROGRESS, progress)
        self.progress = progress
        self.written = int(progress["done"])
        self._failed: dict[str, str] = {}
        self._files = []
        for name in blocks:
            offset = np.load(self._file(name), mmap_mode="r").offset
            self._files.append((os.open(self._file(name), os.O_WRONLY), offset))

    def _file(self, name: str) -> Path:
        return self.partial / "blocks" / f"{_safe(name)}.npy"

    @property
    def done(self) -> int:
        """Rows known to be on disk."""
        return int(self.progress["done"])

    def write(self, start: int, outputs: list[np.ndarray], failed: dict[str, str]) -> None:
        """Write rows ``start:start+len`` of every block (durable at the next ``sync``)."""
        if start != self.written:
            raise KadError(f"cache writer expected row {self.written}, got {start}")
        for (fd, offset), dim, values in zip(self._files, self.dims, outputs, strict=True):
            data = np.ascontiguousarray(values, dtype="<f4").tobytes()
            position = offset + start * dim * 4
            while data:
                count = os.pwrite(fd, data, position)
                data, position = data[count:], position + count
        self.written = start + len(outputs[0])
        self._failed.update(failed)

    def sync(self) -> None:
        """Make written rows durable, then record them as done."""
        if self.written == self.done and not self._failed:
            return
        for fd, _ in self._files:
            os.fsync(fd)
        self.progress["done"] = self.written
        self.progress["failed"].update(self._failed)
        self._failed = {}
        _write_json(self.partial / _PROGRESS, self.progress)

    def close(self) -> None:
        for fd, _ in self._files:
            os.close(fd)
        self._files = []

    def commit(self) -> FeatureSet:
        self.sync()
        self.close()
        if self.done != self.n:
            raise KadError(f"cache entry incomplete: {self.done} of {self.n} rows written")
        _write_json(self.partial / _META, {
            **self.meta, "blocks": self.blocks, "dims": self.dims,
            "failed": self.progress["failed"],
        })
        (self.partial / _PROGRESS).unlink()
        if self.final.exists():  # written meanwhile by someone else: keep theirs
            shutil.rmtree(self.partial)
        else:
            os.replace(self.partial, self.final)
        return FeatureSet(self.final)


@contextmanager
def entry_lock(final: Path) -> Iterator[None]:
    """Exclusive lock on an entry while it is being written (blocks other writers)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(final.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def entry_path(dataset_name: str, backbone: str, key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{_safe(dataset_name)}-{_safe(backbone)}-{key}"
