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

Nothing damaged is served: when an entry completes, the SHA-256 of every block file is
recorded in ``meta.json``, and a block file is checked against it before its data is first
used in a process (:meth:`FeatureSet.block`, :func:`verify_entry`). A damaged ``meta.json``
or block file raises :class:`DamagedEntryError`, naming the file and the remedy.
:func:`list_entries`, :func:`verify_entry` and :func:`remove_entries` are what ``kad cache``
shows and does; :func:`check_writable` checks a folder before any work is started in it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kad.errors import KadError
from kad.utils.files import WRITE_ADVICE, file_sha256, record_key

CACHE_FORMAT = 2  # 2: block checksums in meta.json; images with nothing to screen marked failed
_META = "meta.json"
_PROGRESS = "progress.json"

log = logging.getLogger("kad.features.cache")


class DamagedEntryError(KadError):
    """A cache entry's ``meta.json`` or a block file is damaged; it is never used."""

    def __init__(self, entry: Path, file: Path, reason: str):
        self.entry, self.file, self.reason = Path(entry), Path(file), reason
        super().__init__(
            f"damaged feature cache entry: {file} {reason}; it is not used. Remove the entry "
            f"(kad cache remove {self.entry.name}, or delete {self.entry}) and extract again"
        )


@dataclass(frozen=True)
class CacheEvent:
    """Something the user should hear about while the cache is used.

    ``kind`` is ``"waiting"`` (another process holds the entry's lock), ``"damaged"`` (a
    damaged entry was found and is being extracted again) or ``"merged"`` (shards were
    joined into the entry). ``message`` is one line the command line prints as is.
    """

    kind: str
    entry: Path
    message: str
    lock: Path | None = None


EventCallback = Callable[[CacheEvent], None]


def emit(on_event: EventCallback | None, event: CacheEvent) -> None:
    """Hand ``event`` to ``on_event``; without one, log it as a warning on the
    ``kad.features.cache`` logger, which Python prints to stderr when logging is not configured."""
    if on_event is not None:
        on_event(event)
    else:
        log.warning(event.message)


# Block files checked in this process: path -> (inode, size, mtime_ns, sha256). A file is
# checked again when it is replaced or modified on disk.
_VERIFIED: dict[str, tuple[int, int, int, str]] = {}


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_block_file(entry: Path, path: Path, expected: str | None) -> None:
    """Raise :class:`DamagedEntryError` unless ``path`` has the SHA-256 ``expected``;
    remembered per process, so each file is read once."""
    if expected is None:
        raise DamagedEntryError(entry, path, "has no recorded checksum (written by an older "
                                             "kad or by hand)")
    try:
        key = _stat_key(path)
    except FileNotFoundError:
        raise DamagedEntryError(entry, path, "is missing") from None
    known = _VERIFIED.get(str(path))
    if known is not None and known[:3] == key and known[3] == expected:
        return
    found = file_sha256(path)
    if found != expected:
        raise DamagedEntryError(entry, path, f"does not match its checksum (sha256 {found[:12]}"
                                             f"..., recorded {expected[:12]}...)")
    _VERIFIED[str(path)] = (*key, found)


def read_meta(entry: Path) -> dict:
    """An entry's ``meta.json``; :class:`DamagedEntryError` naming it if it is damaged."""
    path = Path(entry) / _META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise KadError(f"{entry} is not a complete kad feature cache entry (no {_META})") \
            from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedEntryError(entry, path, f"is not valid JSON ({exc})") from None
    missing = [k for k in ("blocks", "dims", "ids", "inputs") if not isinstance(meta, dict)
               or k not in meta]
    if missing:
        raise DamagedEntryError(entry, path, f"lacks {', '.join(missing)}")
    if len(meta["blocks"]) != len(meta["dims"]):
        raise DamagedEntryError(entry, path, "lists blocks and sizes of different lengths")
    return meta


def cache_root() -> Path:
    """``$KAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/kad``, else ``~/.cache/kad``."""
    explicit = os.environ.get("KAD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kad"


def cache_key(inputs: dict) -> str:
    return record_key({"format": CACHE_FORMAT, **inputs})


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
        self.meta = read_meta(self.path)
        self.blocks: list[str] = list(self.meta["blocks"])
        self.dims: dict[str, int] = dict(zip(self.blocks, self.meta["dims"], strict=True))
        self.ids = np.asarray(self.meta["ids"], dtype=str)
        self.failed: dict[str, str] = dict(self.meta.get("failed", {}))
        #: every block the backbone has; more than ``blocks`` once :func:`prune_entry` kept
        #: only those a fitted pipeline uses
        self.all_blocks: list[str] = list(self.meta.get("pruned_from") or self.blocks)
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
        if name not in self.dims and name in self.all_blocks:
            raise KadError(
                f"block {name!r} was removed from {self.path} (it keeps only "
                f"{', '.join(self.blocks)}, the blocks a fitted pipeline uses); remove the "
                f"entry (kad cache remove {self.path.name}) and extract again for all blocks")
        if name not in self.dims:
            raise KadError(
                f"unknown block {name!r} for {self.meta['inputs']['backbone']}; blocks: "
                f"{', '.join(self.blocks)}"
            )
        if name not in self._arrays:
            file = self.block_file(name)
            check_block_file(self.path, file, self.meta.get("checksums", {}).get(name))
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:  # checksum fine, yet no float32 array
                raise DamagedEntryError(self.path, file, f"cannot be read ({exc})") from None
            if array.dtype != np.float32 or array.shape != (len(self), self.dims[name]):
                raise DamagedEntryError(
                    self.path, file, f"holds {array.dtype} {array.shape}, expected float32 "
                                     f"{(len(self), self.dims[name])}")
            self._arrays[name] = array
        return self._arrays[name]

    @property
    def pruned(self) -> bool:
        """Whether this entry keeps only some of the backbone's blocks."""
        return self.all_blocks != self.blocks

    def block_file(self, name: str) -> Path:
        return self.path / "blocks" / f"{_safe(name)}.npy"

    def verify(self) -> None:
        """Check every block file now (each is read once per process); raise
        :class:`DamagedEntryError` for the first damaged one."""
        for name in self.blocks:
            self.block(name)

    def resolve(self, representation: str | Sequence[str] = "concat") -> list[str]:
        """Block names for a representation: ``"concat"`` (every block), one block name, a
        comma-separated list or a sequence of names."""
        if isinstance(representation, str):
            if representation == "concat":
                if self.pruned:
                    raise KadError(
                        f"'concat' needs all {len(self.all_blocks)} blocks, but {self.path} "
                        f"keeps only {', '.join(self.blocks)} (the blocks a fitted pipeline "
                        f"uses); remove the entry (kad cache remove {self.path.name}) and "
                        f"extract again")
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


def new_block_file(path: Path, n: int, dim: int) -> int:
    """Create ``path`` as an ``.npy`` file of ``n`` x ``dim`` float32 zeros (the bytes
    ``np.lib.format.open_memmap`` writes, without mapping the file: the rows are sparse
    until written) and return where the rows start."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (int(n), int(dim))}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        offset = fh.tell()
        fh.truncate(offset + int(n) * int(dim) * 4)
    return offset


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
        progress = _read_progress(self.partial / _PROGRESS)
        fresh = progress is None or progress.get("blocks") != blocks or progress.get("n") != n
        if not fresh and not self._files_fit():
            fresh = True  # a block file lost or cut short: nothing in it is trusted
        offsets = {}
        if fresh:
            shutil.rmtree(self.partial, ignore_errors=True)
            (self.partial / "blocks").mkdir(parents=True)
            progress = {"blocks": blocks, "dims": dims, "n": n, "done": 0, "failed": {}}
            for name, dim in zip(blocks, dims, strict=True):
                offsets[name] = new_block_file(self._file(name), n, dim)
            _write_json(self.partial / _PROGRESS, progress)
        self.progress = progress
        self.written = int(progress["done"])
        self._failed: dict[str, str] = {}
        self._new: list[tuple[int, int]] = []
        self._files = []
        for name in blocks:
            offset = offsets.get(name)
            if offset is None:
                offset = np.load(self._file(name), mmap_mode="r").offset
            self._files.append((os.open(self._file(name), os.O_WRONLY), offset))

    def _file(self, name: str) -> Path:
        return self.partial / "blocks" / f"{_safe(name)}.npy"

    def _files_fit(self) -> bool:
        for name, dim in zip(self.blocks, self.dims, strict=True):
            try:
                array = np.load(self._file(name), mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                return False
            if array.dtype != np.float32 or array.shape != (self.n, dim):
                return False
        return True

    @property
    def done(self) -> int:
        """Rows known to be on disk from the first row on, without a gap."""
        return int(self.progress["done"])

    def missing(self) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` not yet known to be on disk (rows written out of
        order by :meth:`write_at` count once synced)."""
        return _gaps(self.progress, self.n)

    def _ranges(self) -> list[tuple[int, int]]:
        return _done_ranges(self.progress)

    @staticmethod
    def recorded(final: Path) -> dict | None:
        """The progress record of ``final``'s partial entry (``blocks``, ``dims``, ``n``,
        ``done``, ``ranges``), or None; with :func:`missing_rows`, what a resumed run
        still has to compute, known before the network is built."""
        return _read_progress(final.with_name(final.name + ".partial") / _PROGRESS)

    def _pwrite(self, start: int, outputs: list[np.ndarray]) -> None:
        try:
            for (fd, offset), dim, values in zip(self._files, self.dims, outputs,
                                                 strict=True):
                data = np.ascontiguousarray(values, dtype="<f4").tobytes()
                position = offset + start * dim * 4
                while data:
                    count = os.pwrite(fd, data, position)
                    data, position = data[count:], position + count
        except OSError as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: OSError) -> KadError:
        """A write error as one line: the folder, what to do, and that the rows already
        recorded are kept for the next run."""
        error = _write_error(self.partial.parent, exc, "feature cache folder")
        return KadError(f"{error}; the {self.done} rows already recorded in {self.partial} "
                        f"are kept and the next run resumes after them")

    def write(self, start: int, outputs: list[np.ndarray], failed: dict[str, str]) -> None:
        """Write rows ``start:start+len`` of every block (durable at the next ``sync``)."""
        if start != self.written:
            raise KadError(f"cache writer expected row {self.written}, got {start}")
        self._pwrite(start, outputs)
        self.written = start + len(outputs[0])
        self._failed.update(failed)

    def write_at(self, start: int, outputs: list[np.ndarray], failed: dict[str, str]) -> None:
        """Write rows ``start:start+len`` in any order (durable at the next ``sync``). Rows
        land at their own place, so writing a batch twice never adds rows."""
        stop = start + len(outputs[0])
        if not 0 <= start <= stop <= self.n:
            raise KadError(f"cache writer got rows {start}:{stop} of an entry of {self.n}")
        self._pwrite(start, outputs)
        self._new.append((start, stop))
        self._failed.update(failed)

    def sync(self) -> None:
        """Make written rows durable, then record them as done."""
        if self.written == self.done and not self._failed and not self._new:
            return
        try:
            for fd, _ in self._files:
                os.fsync(fd)
        except OSError as exc:
            raise self._failure(exc) from None
        extra = [tuple(r) for r in self.progress.get("ranges", [])] + self._new
        self.progress["ranges"] = [list(r) for r in extra]
        self.progress["done"] = self.written
        ranges = self._ranges()
        prefix = ranges[0][1] if ranges and ranges[0][0] == 0 else 0
        self.progress["done"] = prefix
        self.progress["ranges"] = [list(r) for r in ranges if r[0] > prefix]
        self.written = max(self.written, prefix)
        self.progress["failed"].update(self._failed)
        self._failed, self._new = {}, []
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
        failed = self.progress["failed"]
        order = {str(ident): row for row, ident in enumerate(self.meta.get("ids", []))}
        failed = dict(sorted(failed.items(), key=lambda item: order.get(item[0], -1)))
        return finish_entry(self.partial, self.final, {
            **self.meta, "blocks": self.blocks, "dims": self.dims, "failed": failed,
        })


def finish_entry(partial: Path, final: Path, meta: dict) -> FeatureSet:
    """Record the checksum of every block file of ``partial`` in its ``meta.json`` and move
    it into place as ``final`` (atomically; someone else's complete entry is kept)."""
    checksums = {}
    for name in meta["blocks"]:
        file = partial / "blocks" / f"{_safe(name)}.npy"
        checksums[name] = file_sha256(file)
        _VERIFIED[str(final / "blocks" / file.name)] = (*_stat_key(file), checksums[name])
    _write_json(partial / _META, {**meta, "checksums": checksums,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                           time.gmtime())})
    (partial / _PROGRESS).unlink(missing_ok=True)
    if final.exists():  # written meanwhile by someone else: keep theirs
        shutil.rmtree(partial)
    else:
        os.replace(partial, final)
    return FeatureSet(final)


def _done_ranges(progress: dict) -> list[tuple[int, int]]:
    spans = sorted([(0, int(progress.get("done", 0)))]
                   + [tuple(r) for r in progress.get("ranges", [])])
    merged: list[list[int]] = []
    for start, stop in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        elif stop > start:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def _gaps(progress: dict, n: int) -> list[tuple[int, int]]:
    gaps, position = [], 0
    for start, stop in _done_ranges(progress):
        if start > position:
            gaps.append((position, start))
        position = max(position, stop)
    if position < n:
        gaps.append((position, n))
    return gaps


def missing_rows(progress: dict | None, n: int) -> list[tuple[int, int]]:
    """Row ranges a partial entry with this progress record still lacks (all of them when
    there is no record, or it is for another number of rows)."""
    if not progress or progress.get("n") != n:
        return [(0, n)] if n else []
    return _gaps(progress, n)


def _read_progress(path: Path) -> dict | None:
    """A partial entry's progress record, or None if there is none or it is damaged (the
    partial entry is then started over: nothing in it is trusted)."""
    try:
        progress = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s is damaged (%s); extracting this entry from the start", path, exc)
        return None
    return progress if isinstance(progress, dict) and "done" in progress else None


def lock_path(final: Path) -> Path:
    return final.with_name(final.name + ".lock")


@contextmanager
def entry_lock(final: Path, on_event: EventCallback | None = None) -> Iterator[None]:
    """Exclusive lock on an entry while it is being written (blocks other writers).

    If another process holds it, a ``"waiting"`` :class:`CacheEvent` is emitted first, so
    the user sees why nothing moves. The lock is the operating system's (``filelock``:
    ``flock`` on POSIX, ``msvcrt`` on Windows), released when its process ends however it
    ends.
    """
    from filelock import FileLock, Timeout

    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(final))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        emit(on_event, CacheEvent(
            "waiting", final, f"waiting for another kad process extracting {final.name} "
                              f"(lock {lock_path(final)})", lock_path(final)))
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def is_locked(final: Path) -> bool:
    """Whether another process holds the entry's lock right now."""
    from filelock import FileLock, Timeout

    path = lock_path(final)
    if not path.is_file():
        return False
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def entry_path(dataset_name: str, backbone: str, key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{_safe(dataset_name)}-{_safe(backbone)}-{key}"


# -- what `kad cache` lists, verifies and removes ---------------------------------------------


@dataclass(frozen=True)
class EntryInfo:
    """One folder of the cache as ``kad cache list`` shows it.

    ``state`` is ``"complete"``, ``"partial"`` (an interrupted or running extraction; see
    ``detail``), ``"shard"`` (one complete shard waiting for the others) or ``"damaged"``
    (``detail`` says what is wrong). Fields that are unknown (a damaged ``meta.json``) are
    None.
    """

    path: Path
    state: str
    dataset: str | None
    backbone: str | None
    image_size: int | None
    preprocessing: str | None
    weights: str | None
    n_images: int | None
    n_blocks: int | None
    size_bytes: int
    created: str | None
    detail: str = ""

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify_entry` found: ``ok`` or the ``problems``, one line each, naming
    the file; ``bytes_read`` and ``seconds`` are the cost of the check."""

    path: Path
    ok: bool
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RemovedEntry:
    path: Path
    size_bytes: int


def _folder_bytes(path: Path) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def _is_entry_folder(path: Path) -> bool:
    return path.is_dir() and ((path / _META).exists() or (path / _PROGRESS).exists()
                              or path.name.endswith(".partial") or ".shard-" in path.name)


def _info(path: Path) -> EntryInfo:
    size = _folder_bytes(path)
    state, detail = "complete", ""
    if path.name.endswith(".partial"):
        state = "partial"
        progress = _read_progress(path / _PROGRESS)
        final = path.with_name(path.name[:-len(".partial")])
        detail = (f"{progress['done']} of {progress['n']} rows" if progress else
                  "no usable progress record: starts over")
        if is_locked(final):
            detail += ", being written now"
        n = progress.get("n") if progress else None
        blocks = progress.get("blocks") if progress else None
        return EntryInfo(path, state, None, None, None, None, None, n,
                         len(blocks) if blocks else None, size, None, detail)
    try:
        meta = read_meta(path)
    except KadError as exc:
        reason = exc.reason if isinstance(exc, DamagedEntryError) else str(exc)
        return EntryInfo(path, "damaged", None, None, None, None, None, None, None, size,
                         None, f"{_META} {reason}")
    if "shard" in meta:
        state = "shard"
        shard = meta["shard"]
        detail = f"shard {shard['index']}/{shard['count']}, rows {shard['start']}:" \
                 f"{shard['stop']}"
    elif "checksums" not in meta:
        state, detail = "damaged", "no checksums (written by an older kad): remove it"
    inputs = meta.get("inputs", {})
    return EntryInfo(path, state, meta.get("dataset"), inputs.get("backbone"),
                     inputs.get("image_size"), inputs.get("preprocessing"),
                     inputs.get("weights"), len(meta["ids"]), len(meta["blocks"]), size,
                     meta.get("created"), detail)


def list_entries(root: str | Path | None = None) -> list[EntryInfo]:
    """Every entry, partial entry and shard in the cache folder, by name."""
    base = Path(root) if root else cache_root()
    if not base.is_dir():
        return []
    return [_info(p) for p in sorted(base.iterdir()) if _is_entry_folder(p)]


def verify_entry(path: str | Path) -> VerifyResult:
    """Read every block file of a complete entry (or shard) and compare it with its
    recorded checksum, shape and type; every problem is listed, not only the first."""
    path = Path(path)
    started = time.perf_counter()
    try:
        meta = read_meta(path)
    except KadError as exc:
        return VerifyResult(path, False, [str(exc)], 0, 0, time.perf_counter() - started)
    problems, checked, read = [], 0, 0
    features = FeatureSet(path)
    for name in features.blocks:
        file = features.block_file(name)
        _VERIFIED.pop(str(file), None)  # asked explicitly: read it again
        checked += 1
        try:
            read += file.stat().st_size if file.exists() else 0
            features.block(name)
        except DamagedEntryError as exc:
            problems.append(f"{exc.file} {exc.reason}")
    if "checksums" not in meta:
        problems.insert(0, f"{path / _META} records no checksums (written by an older kad)")
    return VerifyResult(path, not problems, problems, checked, read,
                        time.perf_counter() - started)


#: A unique beginning of an entry's name must be at least this long to name it.
MIN_PREFIX = 6


def _inside(path: Path, base: Path) -> bool:
    """Whether ``path``, symlinks resolved, is a folder directly in ``base`` (resolved)."""
    try:
        return path.resolve().parent == base.resolve()
    except OSError:
        return False


def resolve_entry(name: str | Path, root: str | Path | None = None) -> Path:
    """An entry folder of the cache ``root`` from its folder name, a unique beginning of
    the name (at least :data:`MIN_PREFIX` characters) or its path. Only entries directly
    in the cache folder, symlinks resolved, are named: an empty name, a path elsewhere,
    an ambiguous or too short beginning, or a folder that is not a cache entry raises
    :class:`~kad.errors.KadError`."""
    base = Path(root) if root else cache_root()
    text = str(name).strip()
    if not text:
        raise KadError("an empty cache entry name names nothing; give an entry's name "
                       "(see kad cache list)")
    if "/" in text or os.sep in text or (os.altsep and os.altsep in text) \
            or text in (".", "..") or Path(text).is_absolute():
        candidate = Path(text).expanduser()
        if not _inside(candidate, base):
            raise KadError(f"{candidate} is not in the feature cache {base}: kad cache "
                           "removes and checks only its own entries")
        if candidate.is_symlink() or not _is_entry_folder(candidate):
            raise KadError(f"{candidate} is not a kad feature cache entry; see kad cache list")
        return candidate
    entries = [p for p in (base.iterdir() if base.is_dir() else [])
               if _is_entry_folder(p) and not p.is_symlink() and _inside(p, base)]
    exact = [p for p in entries if p.name == text]
    if exact:
        return exact[0]
    matches = [p for p in entries if p.name.startswith(text)]
    if not matches:
        raise KadError(f"no cache entry {text!r} in {base}; see kad cache list")
    if len(text) < MIN_PREFIX:
        raise KadError(f"{text!r} is too short to name a cache entry: give its full name or "
                       f"at least {MIN_PREFIX} characters of it (see kad cache list)")
    if len(matches) == 1:
        return matches[0]
    raise KadError(f"{text!r} names {len(matches)} cache entries in {base} "
                   f"({', '.join(p.name for p in matches[:4])}, ...): give more of the name")


def _writer_of(path: Path) -> Path:
    """The folder whose lock guards ``path`` (a partial folder shares its entry's lock)."""
    name = path.name
    return path.with_name(name[:-len(".partial")] if name.endswith(".partial") else name)


def remove_entries(names: Sequence[str | Path] = (), root: str | Path | None = None, *,
                   all_entries: bool = False) -> list[RemovedEntry]:
    """Remove the named entries (see :func:`resolve_entry`), or every one with
    ``all_entries``. An entry being written by a running extraction is refused."""
    base = Path(root) if root else cache_root()
    if all_entries:
        paths = [info.path for info in list_entries(base)
                 if not info.path.is_symlink() and _inside(info.path, base)]
    else:
        if not names:
            raise KadError("name the cache entries to remove, or ask for all of them")
        paths = [resolve_entry(name, base) for name in names]
    for path in paths:
        if is_locked(_writer_of(path)):
            raise KadError(f"{path} is being written by a running kad process (lock "
                           f"{lock_path(_writer_of(path))}); wait for it or stop it first")
    removed = []
    for path in paths:
        size = _folder_bytes(path)
        shutil.rmtree(path)
        removed.append(RemovedEntry(path, size))
    for path in paths:  # a lock file is left only while its entry or partial entry is
        target = _writer_of(path)
        if not any(p.exists() for p in (target, target.with_name(target.name + ".partial"))):
            lock_path(target).unlink(missing_ok=True)
    return removed


@dataclass(frozen=True)
class PrunedEntry:
    """What :func:`prune_entry` kept and how much disk it freed."""

    path: Path
    kept: list[str]
    removed: list[str]
    freed_bytes: int


def prune_entry(path: str | Path, keep: Sequence[str],
                on_event: EventCallback | None = None) -> PrunedEntry:
    """Keep only the blocks ``keep`` of a complete entry and delete the others' files, so a
    screening programme stores the blocks its pipeline uses, not all of them.

    The kept blocks are verified first. ``meta.json`` (replaced atomically before any file
    is deleted) records every block the backbone has, so the entry is never taken for a
    complete one: :func:`kad.features.extract.extract_features` extracts all blocks again when it
    is asked for more than an entry keeps.
    """
    path = Path(path)
    with entry_lock(path, on_event):
        features = FeatureSet(path)
        unknown = sorted(set(keep) - set(features.blocks))
        keep = [b for b in features.blocks if b in set(keep)]
        if unknown or not keep:
            raise KadError(f"cannot keep blocks {', '.join(unknown) or '(none)'} of {path}: "
                           f"it has {', '.join(features.blocks)}")
        for name in keep:
            features.block(name)  # checksum
        drop = [b for b in features.blocks if b not in keep]
        if not drop:
            return PrunedEntry(path, keep, [], 0)
        meta = dict(features.meta)
        meta.update(
            blocks=keep, dims=[features.dims[b] for b in keep],
            checksums={b: meta["checksums"][b] for b in keep},
            pruned_from=features.all_blocks)
        _write_json(path / _META, meta)
        freed = 0
        for name in drop:
            file = features.block_file(name)
            freed += file.stat().st_size if file.exists() else 0
            file.unlink(missing_ok=True)
    return PrunedEntry(path, keep, drop, freed)


# -- writability -----------------------------------------------------------------------------

def _write_error(path: Path, exc: OSError, what: str) -> KadError:
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()),
                       path)
        return KadError(f"cannot use {path} as the {what}: {blocker} is a file, not a folder; "
                        f"choose another path or move that file away")
    advice = WRITE_ADVICE.get(exc.errno, f"{exc.strerror or exc}: choose another folder")
    return KadError(f"cannot write to the {what} {path}: {advice}")


def check_writable(path: str | Path, *, what: str = "folder", is_file: bool = False,
                   need_bytes: int = 0) -> Path:
    """Check that ``path`` can be written before any work starts; return it.

    A folder (``is_file=False``) is created if missing; for a file (``--out``), its folder
    is checked and ``path`` must not be a folder. A small probe file is written, synced and
    removed, so a read-only file system, a full disk, missing permissions or a file where a
    folder should be each raise one :class:`~kad.errors.KadError` line naming the path and
    what to do. ``need_bytes`` also requires that much free space.
    """
    path = Path(path).expanduser()
    folder = path.parent if is_file else path
    if is_file and path.is_dir():
        raise KadError(f"cannot write the {what} {path}: it is a folder; name a file")
    if folder.exists() and not folder.is_dir():
        raise KadError(f"cannot use {folder} as the {what}: {folder} is a file, not a "
                       f"folder; choose another path or move that file away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".kad-write-probe-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise _write_error(folder, exc, what) from None
    if need_bytes:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise KadError(f"cannot write to the {what} {folder}: {need_bytes / 2**30:.1f} GiB "
                           f"are needed and {free / 2**30:.1f} GiB are free; free space there "
                           f"or choose another folder")
    return path
