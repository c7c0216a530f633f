"""Sharded extraction: one disjoint share of a dataset per process or machine, joined into
the ordinary cache entry.

``extract_features(..., shard=(i, n))`` computes rows ``shard_range(len(dataset), batch_size,
i, n)`` into its own entry ``<entry>.shard-<i>-of-<n>/``, built and resumed exactly like a
whole entry (in ``<entry>.shard-<i>-of-<n>.partial/``, under its own lock, with its failed
images and checksums in its ``meta.json``). Shares are whole batches: every image is
computed in the same batch, at the same place and with the same padding as in one
single-process run, so the joined entry is bit-identical to it.

When the last shard completes, :func:`merge_shards` joins the shards into the entry
(checking every shard's checksums first) and removes them; it can also be called on its own
(``kad cache merge``), for shards computed on machines whose outputs were copied into one
cache folder afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kad import __version__
from kad.errors import KadError
from kad.features.cache import (
    CacheEvent,
    DamagedEntryError,
    EventCallback,
    FeatureSet,
    _safe,
    _write_error,
    cache_root,
    check_writable,
    emit,
    entry_lock,
    finish_entry,
    read_meta,
)
from kad.utils.progress import Progress

_SHARD = re.compile(r"^(?P<entry>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)$")
_COPY_ROWS_BYTES = 64 << 20


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (``0 <= i < n``) as ``(i, n)``, or one clear error."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"--shard {text!r}: write it as i/n, e.g. 0/4 for the first of 4 "
                         f"shares")
    return check_shard((int(match[1]), int(match[2])))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = (int(v) for v in shard)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index runs from 0 to {count - 1} for "
                         f"{count} shares")
    return index, count


def shard_range(n: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``index`` of ``count``: whole batches of
    ``batch_size``, shares differing by at most one batch (empty when there are fewer
    batches than shards)."""
    batches = -(-n // batch_size)
    first, last = index * batches // count, (index + 1) * batches // count
    return min(first * batch_size, n), min(last * batch_size, n)


def shard_path(entry: Path, index: int, count: int) -> Path:
    return entry.with_name(f"{entry.name}.shard-{index}-of-{count}")


@dataclass(frozen=True)
class ShardInfo:
    """One shard of an entry as found in the cache folder."""

    index: int
    count: int
    path: Path
    complete: bool  # its meta.json is there (verified only when merging)
    start: int | None
    stop: int | None


def find_shards(entry: Path) -> list[ShardInfo]:
    """The shards of ``entry`` (complete or partial), by count and index."""
    found = {}
    for path in entry.parent.glob(f"{entry.name}.shard-*"):
        name = path.name[:-len(".partial")] if path.name.endswith(".partial") else path.name
        match = _SHARD.match(name)
        if not match or match["entry"] != entry.name or not path.is_dir():
            continue
        index, count = int(match["index"]), int(match["count"])
        complete = not path.name.endswith(".partial") and (path / "meta.json").is_file()
        start = stop = None
        if complete:
            try:
                shard = read_meta(path).get("shard", {})
                start, stop = shard.get("start"), shard.get("stop")
            except KadError:
                pass
        if complete or (count, index) not in found:
            found[(count, index)] = ShardInfo(index, count, path if complete else
                                              shard_path(entry, index, count), complete,
                                              start, stop)
    return [found[k] for k in sorted(found)]


class _Share:
    """Rows ``start:stop`` of a dataset, as :func:`kad.features.extraction._extract` reads it."""

    def __init__(self, dataset, start: int, stop: int):
        self.name = dataset.name
        self.ids = np.asarray(dataset.ids)[start:stop]
        self.source = dataset.source.take(np.arange(start, stop))

    def __len__(self) -> int:
        return len(self.ids)


def extract_shard(dataset, plan, shard: tuple[int, int], *, batch_size: int = 64,
                  workers: int | None = None, progress: Progress | None = None,
                  on_event: EventCallback | None = None) -> FeatureSet:
    """Compute one shard (see the module docstring). Returns the whole entry when this
    shard completed the set (it is merged then), else this shard's own entry, whose
    ``meta["shard"]`` says which rows it holds."""
    from kad.features.extraction import _extract, _usable

    index, count = check_shard(shard)
    whole = _usable(plan, on_event)
    if whole is not None:
        return whole
    n = len(dataset)
    start, stop = shard_range(n, batch_size, index, count)
    path = shard_path(plan.path, index, count)
    check_writable(plan.path.parent, what="feature cache folder")
    shard_plan = dataclasses.replace(plan, path=path)
    with entry_lock(path, on_event):
        done = _usable(shard_plan, on_event, locked=True)
        if done is None:
            meta = {"shard": {"index": index, "count": count, "start": start, "stop": stop,
                              "n": n, "batch_size": batch_size}}
            done = _extract(_Share(dataset, start, stop), shard_plan, batch_size, workers,
                            progress, extra_meta=meta)
    present = {s.index for s in find_shards(plan.path) if s.count == count and s.complete}
    if present == set(range(count)):
        return merge_shards(plan.path, count=count, on_event=on_event)
    return done


def merge_shards(entry: str | Path, *, count: int | None = None,
                 root: str | Path | None = None,
                 on_event: EventCallback | None = None) -> FeatureSet:
    """Join the complete shards of ``entry`` (a path, or a name in ``root``) into the entry
    itself, bit-identical to a single-process extraction, and remove the shards.

    Every shard is verified against its checksums first; missing or damaged shards, or
    shards that do not tile the dataset, are refused with one line saying which to rerun.
    An entry that is already complete is returned as is.
    """
    entry = Path(entry)
    if not entry.is_absolute() and not entry.parent.name:
        entry = (Path(root) if root else cache_root()) / _safe(entry.name)
    with entry_lock(entry, on_event):
        if (entry / "meta.json").is_file():
            whole = FeatureSet(entry)
            whole.verify()
            return whole
        shards = [s for s in find_shards(entry) if s.complete]
        counts = sorted({s.count for s in shards})
        if count is None:
            full = [c for c in counts if {s.index for s in shards if s.count == c}
                    == set(range(c))]
            if not counts:
                raise KadError(f"no complete shards of {entry.name} in {entry.parent}; run "
                               f"kad extract ... --shard i/n for every i first")
            count = full[0] if full else counts[0]
        shards = [s for s in shards if s.count == count]
        missing = sorted(set(range(count)) - {s.index for s in shards})
        if missing:
            raise KadError(f"cannot merge {entry.name}: shard(s) "
                           f"{', '.join(f'{i}/{count}' for i in missing)} are not complete; "
                           f"run kad extract with --shard for them (on any machine sharing "
                           f"{entry.parent}) and merge again")
        parts = [FeatureSet(s.path) for s in shards]
        for part in parts:
            part.verify()  # raises DamagedEntryError naming the file
        meta = _merged_meta(entry, parts)
        partial = entry.with_name(entry.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "blocks").mkdir(parents=True)
        try:
            for name, dim in zip(meta["blocks"], meta["dims"], strict=True):
                _join_block(partial / "blocks" / f"{_safe(name)}.npy", len(meta["ids"]),
                            dim, [p.block(name) for p in parts])
            merged = finish_entry(partial, entry, meta)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise KadError(f"{_write_error(entry.parent, exc, 'feature cache folder')}; the "
                           f"shards are kept, merge again with kad cache merge "
                           f"{entry.name}") from None
        merged.verify()
        for shard in shards:
            shutil.rmtree(shard.path)
            for leftover in (shard.path.with_name(shard.path.name + ".lock"),):
                leftover.unlink(missing_ok=True)
    emit(on_event, CacheEvent("merged", entry, f"joined {count} shard(s) into {entry}"))
    return merged


def _merged_meta(entry: Path, parts: list[FeatureSet]) -> dict:
    first = parts[0].meta
    position = 0
    for part in parts:
        shard = part.meta["shard"]
        same = (part.meta["blocks"], part.meta["dims"], part.meta["inputs"], shard["n"],
                shard["batch_size"])
        if same != (first["blocks"], first["dims"], first["inputs"], first["shard"]["n"],
                    first["shard"]["batch_size"]):
            raise KadError(f"cannot merge {entry.name}: {part.path} was computed with other "
                           f"blocks, inputs or batch size than {parts[0].path}; remove it "
                           f"and compute that shard again")
        if (shard["start"], shard["stop"]) != (position, position + len(part)):
            raise KadError(f"cannot merge {entry.name}: {part.path} holds rows "
                           f"{shard['start']}:{shard['stop']}, expected {position}:...; "
                           f"remove it and compute that shard again")
        position = shard["stop"]
    if position != first["shard"]["n"]:
        raise KadError(f"cannot merge {entry.name}: the shards hold {position} of "
                       f"{first['shard']['n']} rows")
    failed: dict[str, str] = {}
    for part in parts:
        failed.update(part.failed)
    return {
        "key": first["key"], "inputs": first["inputs"], "dataset": first["dataset"],
        "ids": [i for part in parts for i in part.meta["ids"]], "kad": __version__,
        "blocks": first["blocks"], "dims": first["dims"], "failed": failed,
        "merged_from": len(parts),
    }


def _join_block(path: Path, n: int, dim: int, pieces: list[np.ndarray]) -> None:
    """One block file with the same header as :class:`~kad.features.cache.EntryWriter` writes, the
    pieces' rows copied in with ``pwrite`` (memory stays flat)."""
    from kad.features.cache import new_block_file

    offset = new_block_file(path, n, dim)
    step = max(1, _COPY_ROWS_BYTES // (4 * dim))
    fd = os.open(path, os.O_WRONLY)
    try:
        row = 0
        for piece in pieces:
            for start in range(0, len(piece), step):
                data = np.ascontiguousarray(piece[start:start + step], dtype="<f4").tobytes()
                position = offset + (row + start) * dim * 4
                while data:
                    written = os.pwrite(fd, data, position)
                    data, position = data[written:], position + written
            row += len(piece)
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["ShardInfo", "check_shard", "extract_shard", "find_shards", "merge_shards",
           "parse_shard", "shard_path", "shard_range", "DamagedEntryError"]
