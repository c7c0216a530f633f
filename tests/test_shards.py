"""Sharded extraction: shares of whole batches, resumable, joined bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MNV2, StopAt
from kad.errors import KadError
from kad.features.extract import extract_features, plan_extraction
from kad.features.shards import find_shards, merge_shards, parse_shard, shard_range
from kad.utils.progress import Recorder


def test_shares_are_whole_batches_that_tile_the_dataset():
    for n, batch, count in ((19, 4, 2), (100, 8, 3), (5, 4, 4), (64, 64, 1)):
        ranges = [shard_range(n, batch, i, count) for i in range(count)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(start % batch == 0 for start, _ in ranges)
    assert shard_range(19, 4, 0, 2) == (0, 8) and shard_range(19, 4, 1, 2) == (8, 19)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(ValueError, match="--shard|index runs"):
            parse_shard(bad)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import cv2

    from kad.data.datasets import load_dataset

    tmp_path = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(1)
    (tmp_path / "data" / "normal").mkdir(parents=True)
    for i in range(19):
        cv2.imwrite(str(tmp_path / "data" / "normal" / f"{i:02d}.png"),
                    rng.integers(0, 255, (36, 36, 3), dtype=np.uint8))
    (tmp_path / "data" / "normal" / "07.png").write_bytes(b"not an image")
    return load_dataset("folder", tmp_path / "data", kind="natural")


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory):
    """The reference: one single-process run."""
    return extract_features(folder, MNV2, "none", 32, batch_size=4,
                            cache_dir=tmp_path_factory.mktemp("single"))


@pytest.mark.tf
def test_two_shards_merged_equal_one_run_bit_for_bit(folder, single, tmp_path):
    cache = tmp_path / "sharded"
    events = []
    first = extract_features(folder, MNV2, "none", 32, batch_size=4, cache_dir=cache,
                             shard=(1, 2), on_event=events.append)
    assert first.meta["shard"]["start"] == 8 and len(first) == 11 and not events
    assert "normal/07.png" not in first.failed
    with pytest.raises(KadError, match=r"shard\(s\) 0/2 are not complete"):
        merge_shards(plan_extraction(folder, MNV2, "none", 32, cache_dir=cache).path)
    whole = extract_features(folder, MNV2, "none", 32, batch_size=4, cache_dir=cache,
                             shard=(0, 2), on_event=events.append)
    assert [e.kind for e in events] == ["merged"]
    assert whole.path == plan_extraction(folder, MNV2, "none", 32, cache_dir=cache).path
    assert not find_shards(whole.path), "merged shards are removed"
    assert list(whole.ids) == list(single.ids) and whole.failed == single.failed
    for block in single.blocks:
        assert whole.block_file(block).read_bytes() == single.block_file(block).read_bytes()
    assert whole.meta["checksums"] == single.meta["checksums"]


@pytest.mark.tf
def test_an_interrupted_shard_resumes(folder, single, tmp_path):
    cache = tmp_path / "cache"

    with pytest.raises(KeyboardInterrupt):
        extract_features(folder, MNV2, "none", 32, batch_size=4, cache_dir=cache,
                         shard=(1, 2), progress=StopAt(4))
    entry = plan_extraction(folder, MNV2, "none", 32, cache_dir=cache).path
    (partial,) = find_shards(entry)
    assert not partial.complete and partial.index == 1

    recorder = Recorder()
    extract_features(folder, MNV2, "none", 32, batch_size=4, cache_dir=cache, shard=(1, 2),
                     progress=recorder)
    first = next(e for e in recorder.events if e[0] == "update")
    assert first[2:] == (4, 11), "the shard resumes after its first batch"
    whole = extract_features(folder, MNV2, "none", 32, batch_size=4, cache_dir=cache,
                             shard=(0, 2))
    for block in single.blocks:
        assert whole.block_file(block).read_bytes() == single.block_file(block).read_bytes()


def _entry(final, rows, ids, shard=None, failed=None):
    from kad.features.cache import EntryWriter

    meta = {"key": "k", "inputs": {"backbone": "b"}, "dataset": "d", "ids": ids, "kad": "0"}
    if shard:
        meta["shard"] = shard
    writer = EntryWriter(final, ["a", "b"], [2, 3], len(ids), meta)
    writer.write(0, rows, failed or {})
    return writer.commit()


def test_merge_joins_hand_made_shards_and_keeps_them_when_the_disk_is_full(tmp_path,
                                                                           monkeypatch):
    import errno
    import os

    rng = np.random.default_rng(0)
    rows = [rng.random((10, 2), dtype=np.float32), rng.random((10, 3), dtype=np.float32)]
    ids = [f"i{k}" for k in range(10)]
    single = _entry(tmp_path / "one" / "d-b-k", rows, ids, failed={"i7": "bad"})
    entry = tmp_path / "two" / "d-b-k"
    for index, (start, stop) in enumerate([(0, 4), (4, 10)]):
        _entry(entry.with_name(f"d-b-k.shard-{index}-of-2"), [r[start:stop] for r in rows],
               ids[start:stop], {"index": index, "count": 2, "start": start, "stop": stop,
                                 "n": 10, "batch_size": 4},
               {"i7": "bad"} if start <= 7 < stop else None)

    def full(fd, data, position):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", full)
        with pytest.raises(KadError, match="the disk is full.*the shards are kept"):
            merge_shards(entry)
    assert len(find_shards(entry)) == 2 and not entry.exists()
    merged = merge_shards("d-b-k", root=entry.parent)
    assert merged.path == entry and not find_shards(entry)
    for block in ("a", "b"):
        assert merged.block_file(block).read_bytes() == single.block_file(block).read_bytes()
    assert merged.failed == {"i7": "bad"} and list(merged.ids) == ids
