"""The feature cache never serves damaged data; kad cache list/verify/remove; writability."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import numpy as np
import pytest

from conftest import MNV2
from kad.errors import KadError
from kad.features.cache import (
    DamagedEntryError,
    EntryWriter,
    FeatureSet,
    check_writable,
    entry_lock,
    list_entries,
    lock_path,
    prune_entry,
    remove_entries,
    verify_entry,
)

BLOCKS, DIMS = ["conv1", "block_2_add"], [3, 5]


def make_entry(root, name="digits-mobilenet_v2-abc", n=7, seed=0):
    rng = np.random.default_rng(seed)
    meta = {"key": name[-3:], "dataset": "digits", "ids": [f"i{k}" for k in range(n)],
            "inputs": {"backbone": "mobilenet_v2", "image_size": 32,
                       "preprocessing": "natural", "weights": "none", "dataset": "f"}}
    writer = EntryWriter(root / name, BLOCKS, DIMS, n, meta)
    values = [rng.random((n, d), dtype=np.float32) * 0.1 for d in DIMS]
    writer.write(0, values, {"i3": "truncated"})
    return writer.commit(), values


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x7F  # the high byte of the last float32: 0.06 becomes ~1e37
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_never_served(tmp_path):
    entry, values = make_entry(tmp_path)
    file = entry.block_file("block_2_add")
    flip_last_byte(file)
    fresh = FeatureSet(entry.path)  # as a new process would see it
    np.testing.assert_array_equal(fresh.block("conv1"), values[0])  # intact block is fine
    with pytest.raises(DamagedEntryError) as info:
        fresh.block("block_2_add")
    message = str(info.value)
    assert str(file) in message and "kad cache remove" in message
    assert "\n" not in message and "allow_pickle" not in message
    result = verify_entry(entry.path)
    assert not result.ok and len(result.problems) == 1 and str(file) in result.problems[0]
    assert result.files_checked == 2 and result.bytes_read == sum(
        entry.block_file(b).stat().st_size for b in BLOCKS)


def test_verify_passes_an_intact_entry_and_notices_a_replaced_file(tmp_path):
    entry, values = make_entry(tmp_path)
    assert verify_entry(entry.path).ok
    np.save(entry.block_file("conv1"), values[0] + 1)  # a valid .npy, other numbers
    assert not verify_entry(entry.path).ok


def test_a_damaged_npy_header_names_the_file_and_never_advises_allow_pickle(tmp_path):
    entry, _ = make_entry(tmp_path)
    file = entry.block_file("conv1")
    data = bytearray(file.read_bytes())
    data[20:30] = b"'O'       "
    file.write_bytes(bytes(data))
    with pytest.raises(DamagedEntryError) as info:
        FeatureSet(entry.path).matrix("concat")
    assert str(file) in str(info.value) and "allow_pickle" not in str(info.value)


def test_a_damaged_meta_json_names_its_file(tmp_path):
    entry, _ = make_entry(tmp_path)
    meta = entry.path / "meta.json"
    meta.write_text(meta.read_text()[:64])
    with pytest.raises(DamagedEntryError) as info:
        FeatureSet(entry.path)
    assert str(meta) in str(info.value) and "not valid JSON" in str(info.value)
    (listed,) = list_entries(tmp_path)
    assert listed.state == "damaged" and "meta.json" in listed.detail
    assert not verify_entry(entry.path).ok


def test_a_damaged_progress_record_starts_the_partial_entry_over(tmp_path):
    meta = {"ids": ["a", "b"], "inputs": {}}
    writer = EntryWriter(tmp_path / "e", BLOCKS, DIMS, 2, meta)
    writer.write(0, [np.ones((1, d), np.float32) for d in DIMS], {})
    writer.sync()
    writer.close()
    progress = tmp_path / "e.partial" / "progress.json"
    progress.write_text(progress.read_text()[:30])
    again = EntryWriter(tmp_path / "e", BLOCKS, DIMS, 2, meta)
    assert again.done == 0
    again.close()


def test_list_verify_and_remove(tmp_path):
    first, _ = make_entry(tmp_path, "digits-mobilenet_v2-aaa")
    make_entry(tmp_path, "digits-mobilenet_v2-bbb", n=3)
    listed = list_entries(tmp_path)
    assert [e.name for e in listed] == ["digits-mobilenet_v2-aaa", "digits-mobilenet_v2-bbb"]
    row = listed[0]
    assert (row.state, row.dataset, row.backbone, row.image_size, row.preprocessing,
            row.n_images, row.n_blocks) == ("complete", "digits", "mobilenet_v2", 32,
                                            "natural", 7, 2)
    assert row.size_bytes >= 7 * sum(DIMS) * 4 and row.created.endswith("Z")
    (removed,) = remove_entries(["digits-mobilenet_v2-a"], tmp_path)
    assert removed.path == first.path and not first.path.exists()
    assert removed.size_bytes == row.size_bytes
    with pytest.raises(KadError, match="no cache entry 'nothing'"):
        remove_entries(["nothing"], tmp_path)
    make_entry(tmp_path, "digits-mobilenet_v2-bbc")
    with pytest.raises(KadError, match="names 2 cache entries"):
        remove_entries(["digits-mobilenet_v2-bb"], tmp_path)
    assert len(remove_entries(root=tmp_path, all_entries=True)) == 2
    assert list_entries(tmp_path) == [] and not list(tmp_path.iterdir())


def _hold_lock(path, ready, release):
    import fcntl

    with open(lock_path(path), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        ready.set()
        release.wait(10)


def test_a_process_waiting_on_the_lock_says_so(tmp_path):
    entry = tmp_path / "digits-mobilenet_v2-abc"
    ready, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_lock, args=(entry, ready, release))
    holder.start()
    ready.wait(10)
    with pytest.raises(KadError, match="being written by a running kad process"):
        remove_entries([str(_partial(entry))], tmp_path)
    events = []
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    with entry_lock(entry, events.append):
        pass
    holder.join()
    assert time.monotonic() - started >= 0.2
    (event,) = events
    assert event.kind == "waiting" and event.lock == lock_path(entry)
    assert event.message == (f"waiting for another kad process extracting {entry.name} "
                             f"(lock {lock_path(entry)})")


def _partial(entry):
    partial = entry.with_name(entry.name + ".partial")
    (partial / "blocks").mkdir(parents=True)
    return partial


def test_check_writable_names_the_path_and_what_to_do(tmp_path, monkeypatch):
    assert check_writable(tmp_path / "new" / "folder").is_dir()
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for target in (blocker, blocker / "sub"):
        with pytest.raises(KadError, match=f"{blocker} is a file, not a folder"):
            check_writable(target, what="feature cache folder")
    with pytest.raises(KadError, match="it is a folder; name a file"):
        check_writable(tmp_path, is_file=True, what="--out file")
    assert check_writable(tmp_path / "out" / "model.kad", is_file=True).parent.is_dir()

    real_write = os.write
    for code, advice in ((errno.ENOSPC, "the disk is full"),
                         (errno.EROFS, "read-only file system")):
        def failing(fd, data, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "write", failing)
        with pytest.raises(KadError) as info:
            check_writable(tmp_path / "cache", what="feature cache folder")
        monkeypatch.setattr(os, "write", real_write)
        message = str(info.value)
        assert message.startswith(f"cannot write to the feature cache folder {tmp_path}/cache")
        assert advice in message and "\n" not in message
        assert not [p for p in (tmp_path / "cache").iterdir()], "the probe is left behind"
    with pytest.raises(KadError, match="GiB are needed"):
        check_writable(tmp_path, need_bytes=1 << 60)


def test_meta_records_a_checksum_per_block(tmp_path):
    entry, _ = make_entry(tmp_path)
    meta = json.loads((entry.path / "meta.json").read_text())
    assert sorted(meta["checksums"]) == sorted(BLOCKS)
    assert all(len(v) == 64 for v in meta["checksums"].values())


def test_rows_written_out_of_order_resume_and_never_add_rows(tmp_path):
    n, meta = 10, {"ids": [f"i{k}" for k in range(10)], "inputs": {}}
    rows = [np.arange(n * d, dtype=np.float32).reshape(n, d) for d in DIMS]
    writer = EntryWriter(tmp_path / "e", BLOCKS, DIMS, n, meta)
    writer.write_at(6, [r[6:10] for r in rows], {"i8": "truncated"})
    writer.write_at(0, [r[0:3] for r in rows], {})
    writer.sync()
    writer.close()
    size = writer._file("conv1").stat().st_size
    again = EntryWriter(tmp_path / "e", BLOCKS, DIMS, n, meta)  # resumed
    assert again.done == 3 and again.missing() == [(3, 6)]
    again.write_at(3, [r[3:6] for r in rows], {"i4": "empty file"})
    again.write_at(6, [r[6:10] for r in rows], {"i8": "truncated"})  # the same batch twice
    entry = again.commit()
    assert entry.block_file("conv1").stat().st_size == size
    for name, values in zip(BLOCKS, rows, strict=True):
        np.testing.assert_array_equal(entry.block(name), values)
    assert list(entry.failed) == ["i4", "i8"], "failed images in row order"
    with pytest.raises(KadError, match="rows 8:12 of an entry of 10"):
        EntryWriter(tmp_path / "f", BLOCKS, DIMS, n, meta).write_at(
            8, [np.zeros((4, d), np.float32) for d in DIMS], {})


def test_pruning_keeps_the_pipelines_blocks_and_never_passes_for_complete(tmp_path):
    entry, values = make_entry(tmp_path)
    size = entry.block_file("conv1").stat().st_size
    pruned = prune_entry(entry.path, ["block_2_add"])
    assert (pruned.kept, pruned.removed, pruned.freed_bytes) == (["block_2_add"], ["conv1"],
                                                                 size)
    assert not entry.block_file("conv1").exists()
    again = FeatureSet(entry.path)
    assert again.pruned and again.all_blocks == BLOCKS and again.blocks == ["block_2_add"]
    np.testing.assert_array_equal(again.matrix("block_2_add"), values[1])
    with pytest.raises(KadError, match="'concat' needs all 2 blocks"):
        again.matrix("concat")
    with pytest.raises(KadError, match="block 'conv1' was removed"):
        again.block("conv1")
    assert verify_entry(entry.path).ok
    with pytest.raises(KadError, match="cannot keep blocks nope"):
        prune_entry(entry.path, ["nope"])


def test_fit_checks_out_and_the_cache_before_any_work(tmp_path, monkeypatch):
    from kad.data.datasets import load_dataset
    from kad.screening.fitting import fit_pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("features were extracted although --out cannot be written")

    monkeypatch.setattr("kad.features.extract.extract_features", no_work)
    blocker = tmp_path / "file"
    blocker.write_text("")
    digits = load_dataset("digits")
    with pytest.raises(KadError, match=f"cannot use {blocker} as the --out file: {blocker} "
                                       f"is a file, not a folder"):
        fit_pipeline(digits, backbone=MNV2, weights="none",
                     image_size=32, out=blocker / "model.kad")
    with pytest.raises(KadError, match="as the feature cache folder"):
        fit_pipeline(digits, backbone=MNV2, weights="none",
                     image_size=32, cache_dir=blocker / "cache")


def test_without_a_callback_the_wait_is_logged(tmp_path, caplog):
    entry = tmp_path / "digits-mobilenet_v2-abc"
    ready, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_lock, args=(entry, ready, release))
    holder.start()
    ready.wait(10)
    threading.Timer(0.2, release.set).start()
    with caplog.at_level("WARNING", logger="kad.features.cache"), entry_lock(entry):
        pass
    holder.join()
    assert [r.getMessage() for r in caplog.records] == [
        f"waiting for another kad process extracting {entry.name} (lock {lock_path(entry)})"]


def test_a_disk_that_fills_up_during_extraction_gives_one_line(tmp_path, monkeypatch):
    meta = {"ids": ["a", "b"], "inputs": {}}
    writer = EntryWriter(tmp_path / "e", BLOCKS, DIMS, 2, meta)
    writer.write(0, [np.ones((1, d), np.float32) for d in DIMS], {})
    writer.sync()

    def full(fd, data, position):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(KadError) as info:
        writer.write(1, [np.ones((1, d), np.float32) for d in DIMS], {})
    assert str(info.value) == (
        f"cannot write to the feature cache folder {tmp_path}: the disk is full: free space "
        f"there or choose another folder; the 1 rows already recorded in "
        f"{tmp_path / 'e.partial'} are kept and the next run resumes after them")
    writer.close()


def test_remove_takes_only_entries_of_the_cache_folder(tmp_path, monkeypatch):
    """`kad cache remove results` once deleted ./results, a folder outside the cache that
    held a meta.json; `kad cache remove ""` removed an entry."""
    from typer.testing import CliRunner

    from kad.cli import app

    root = tmp_path / "cache"
    entry, _ = make_entry(root, "digits-mobilenet_v2-abc")
    make_entry(root, "digits-mobilenet_v2-abd")
    outside = tmp_path / "results"
    outside.mkdir()
    (outside / "meta.json").write_text(entry.path.joinpath("meta.json").read_text())
    (outside / "mine.txt").write_text("the user's")
    monkeypatch.chdir(tmp_path)
    for name, message in [
        ("results", "no cache entry 'results'"),
        (str(outside), "is not in the feature cache"),
        ("./results", "is not in the feature cache"),
        (str(root / ".." / "results"), "is not in the feature cache"),
        ("", "an empty cache entry name names nothing"),
        ("  ", "an empty cache entry name names nothing"),
        ("d", "too short to name a cache entry"),
        ("digits-mobilenet_v2-ab", "names 2 cache entries"),
        (str(root), "is not in the feature cache"),
    ]:
        with pytest.raises(KadError, match=message):
            remove_entries([name], root)
        result = CliRunner().invoke(app, ["cache", "remove", name, "--cache-dir", str(root)])
        assert result.exit_code == 1 and message.split("'")[0] in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert (outside / "mine.txt").exists() and entry.path.exists()
    assert len(list_entries(root)) == 2


def test_remove_refuses_a_non_entry_and_a_symlink_out_of_the_cache(tmp_path):
    root = tmp_path / "cache"
    make_entry(root, "digits-mobilenet_v2-abc")
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("x")
    with pytest.raises(KadError, match="not a kad feature cache entry"):
        remove_entries([str(root / "notes")], root)
    elsewhere, _ = make_entry(tmp_path / "other", "digits-mobilenet_v2-zzz")
    (root / "digits-mobilenet_v2-lnk").symlink_to(elsewhere.path, target_is_directory=True)
    for name in ("digits-mobilenet_v2-lnk", str(root / "digits-mobilenet_v2-lnk")):
        with pytest.raises(KadError):
            remove_entries([name], root)
    removed = remove_entries(root=root, all_entries=True)
    assert [r.path.name for r in removed] == ["digits-mobilenet_v2-abc"]
    assert elsewhere.path.is_dir() and (root / "notes" / "keep.txt").exists()
    (removed_by_name,) = remove_entries(["digits-mobilenet_v2-zz"], tmp_path / "other")
    assert not removed_by_name.path.exists()


@pytest.mark.parametrize(("n", "dim"), [(1, 1), (7, 1280), (4096, 16), (100_000, 3)])
def test_a_new_block_file_is_the_npy_file_numpy_makes(tmp_path, n, dim):
    from kad.features.cache import new_block_file

    offset = new_block_file(tmp_path / "kad.npy", n, dim)
    np.lib.format.open_memmap(tmp_path / "numpy.npy", mode="w+", dtype="<f4",
                              shape=(n, dim)).flush()
    assert (tmp_path / "kad.npy").read_bytes() == (tmp_path / "numpy.npy").read_bytes()
    assert offset == np.load(tmp_path / "kad.npy", mmap_mode="r").offset
