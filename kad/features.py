"""Feature extraction: every block of a backbone for every image of a dataset, cached.

:func:`extract_features` returns a :class:`~kad.cache.FeatureSet`. When the cache already
holds the entry it returns at once, without importing TensorFlow. Otherwise it decodes and
preprocesses images in a thread pool (OpenCV releases the GIL) while the network runs on
the previous batch, writes each batch to the memory-mapped entry, and resumes from the last
written batch if it was interrupted. Images that cannot be read are counted, reported and
marked invalid in the entry; they never stop the run.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .backbones import Backbone, get_backbone, weights_identity
from .cache import (
    CacheEvent,
    DamagedEntryError,
    EventCallback,
    FeatureSet,
    cache_key,
    check_writable,
    emit,
    entry_lock,
    entry_path,
)
from .errors import ImageReadError
from .images import check_usable, resize
from .preprocessing import Preprocessing, get_preprocessing

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ExtractionPlan:
    """Everything that decides the features, and the cache entry that holds them."""

    backbone: Backbone
    weights: str | Path | None
    input_size: int
    preprocessing: Preprocessing
    key: str
    path: Path
    inputs: dict


def default_preprocessing(dataset) -> str:
    return "fundus" if getattr(dataset, "kind", "natural") == "fundus" else "natural"


def plan_extraction(dataset, backbone="inception_resnet_v2", weights="imagenet",
                    image_size: int | None = None, preprocessing=None,
                    cache_dir: str | Path | None = None) -> ExtractionPlan:
    bb = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    size = bb.input_size(image_size)
    prep = get_preprocessing(preprocessing or default_preprocessing(dataset))
    inputs = {
        "dataset": dataset.fingerprint,
        "backbone": str(bb.spec),
        "weights": weights_identity(weights),
        "image_size": size,
        "preprocessing": prep.key,
    }
    key = cache_key(inputs)
    path = entry_path(dataset.name, bb.name, key, Path(cache_dir) if cache_dir else None)
    return ExtractionPlan(bb, weights, size, prep, key, path, inputs)


def cached_features(plan: ExtractionPlan, verify: bool = True) -> FeatureSet | None:
    """The complete entry of ``plan``, or None. A damaged entry raises
    :class:`~kad.cache.DamagedEntryError` naming the file and the remedy: a damaged
    ``meta.json`` always, a block file that does not match its checksum with ``verify``
    (each file is read once per process; without ``verify`` it is checked when first
    used)."""
    if not plan.path.is_dir():
        return None
    found = FeatureSet(plan.path)
    if verify:
        found.verify()
    return found


def extract_features(dataset, backbone="inception_resnet_v2", weights="imagenet",
                     image_size: int | None = None, preprocessing=None, *,
                     batch_size: int = 64, workers: int | None = None,
                     cache_dir: str | Path | None = None,
                     progress: ProgressCallback | None = None,
                     on_event: EventCallback | None = None,
                     shard: tuple[int, int] | None = None,
                     engine: str = "local", ray_address: str | None = None,
                     blocks: list[str] | None = None) -> FeatureSet:
    """Features of every block for every image of ``dataset``; see the module docstring.

    ``progress(done, total)`` is called after every batch (the CLI draws a rich bar);
    ``on_event`` receives :class:`~kad.cache.CacheEvent` lines to show (waiting for another
    process's lock, a damaged entry extracted again, shards merged). A cached entry is
    verified against its checksums before it is returned; a damaged one is extracted again.

    ``shard=(i, n)`` computes only the i-th of n disjoint shares (``0 <= i < n``) into its
    own resumable entry, see :mod:`kad.shards`. ``engine="ray"`` runs the extraction on Ray
    Data, see :mod:`kad.ray_engine`.

    An entry that keeps only some blocks (:func:`~kad.cache.prune_entry`, after ``kad
    fit``) is used when it holds ``blocks``; asked for all blocks (``blocks=None``), it is
    extracted again in full.
    """
    plan = plan_extraction(dataset, backbone, weights, image_size, preprocessing, cache_dir)
    if shard is not None or engine != "local":
        if engine not in ("local", "ray"):
            raise ValueError(f"unknown engine {engine!r}: use local or ray")
        if shard is not None and engine != "local":
            raise ValueError("--shard and --engine ray do not go together: Ray shares the "
                             "work out itself")
        if shard is not None:
            from .shards import extract_shard

            return extract_shard(dataset, plan, shard, batch_size=batch_size,
                                 workers=workers, progress=progress, on_event=on_event)
        from .ray_engine import extract_with_ray

        return extract_with_ray(dataset, plan, batch_size=batch_size, address=ray_address,
                                progress=progress, on_event=on_event)
    found = _usable(plan, on_event, blocks=blocks)
    if found is not None:
        return found
    check_writable(plan.path.parent, what="feature cache folder")
    with entry_lock(plan.path, on_event):
        found = _usable(plan, on_event, locked=True, blocks=blocks)  # finished meanwhile?
        if found is not None:
            return found
        return _extract(dataset, plan, batch_size, workers, progress)


def _usable(plan: ExtractionPlan, on_event: EventCallback | None,
            locked: bool = False, blocks: list[str] | None = None) -> FeatureSet | None:
    """The verified entry, or None. Holding the entry's lock, a damaged entry, or one that
    lacks blocks that are asked for, is reported and removed, so that it is extracted
    again."""
    try:
        found = cached_features(plan, verify=True)
        if found is None or not found.pruned or (
                blocks is not None and set(blocks) <= set(found.blocks)):
            return found
        if locked:
            emit(on_event, CacheEvent(
                "pruned", plan.path, f"{plan.path.name} keeps only {len(found.blocks)} of "
                                     f"{len(found.all_blocks)} blocks; extracting all again"))
            shutil.rmtree(plan.path, ignore_errors=True)
        return None
    except DamagedEntryError as exc:
        if not locked:
            return None
        emit(on_event, CacheEvent("damaged", plan.path,
                                  f"{exc.file} {exc.reason}; removing {plan.path.name} and "
                                  f"extracting it again"))
        shutil.rmtree(plan.path, ignore_errors=True)
        return None


SYNC_SECONDS = 10.0  # how often finished batches are made durable during extraction


def _extract(dataset, plan: ExtractionPlan, batch_size: int, workers: int | None,
             progress: ProgressCallback | None, extra_meta: dict | None = None) -> FeatureSet:
    from .cache import EntryWriter

    model, names = plan.backbone.build_extractor(plan.input_size, plan.weights)
    dims = [int(out.shape[-1]) for out in model.outputs]
    meta = {
        "key": plan.key, "inputs": plan.inputs, "dataset": dataset.name,
        "ids": [str(i) for i in dataset.ids], "kad": __version__, **(extra_meta or {}),
    }
    n = len(dataset)
    writer = EntryWriter(plan.path, names, dims, n, meta)
    if progress:
        progress(writer.done, n)
    # Writing batch k overlaps inference on batch k+1; durability is paid every few seconds.
    pending: Future | None = None
    last_sync = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kad-write") as saver:
            for start, outputs, failed in stream_features(
                    model, dataset.source, dataset.ids, plan, batch_size, workers,
                    first=writer.done):
                if pending is not None:
                    pending.result()
                stop = start + len(outputs[0])
                sync = stop == n or time.monotonic() - last_sync > SYNC_SECONDS
                pending = saver.submit(_save, writer, start, outputs, failed, sync)
                if sync:
                    last_sync = time.monotonic()
                if progress:
                    progress(stop, n)
            if pending is not None:
                pending.result()
    except BaseException:
        # Interrupted: what was written is made durable, so a rerun resumes after it.
        try:
            writer.sync()
        finally:
            writer.close()
        raise
    return writer.commit()


def _save(writer, start, outputs, failed, sync: bool) -> None:
    writer.write(start, outputs, failed)
    if sync:
        writer.sync()


def stream_features(model, source, ids, plan: ExtractionPlan, batch_size: int = 64,
                    workers: int | None = None, first: int = 0,
                    ) -> Iterator[tuple[int, list[np.ndarray], dict[str, str]]]:
    """``(start, per-block outputs, failed)`` batch by batch, images loaded ahead in threads.

    Every batch is run at the full ``batch_size`` (the last one padded), so an image's
    features never depend on how many images came with it. Rows of unreadable images are
    zeros and their ids are in ``failed`` with the reason.
    """
    for start, batch, failed in _batches(source, ids, plan, first, batch_size, workers):
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]),
                                                    dtype=batch.dtype)])
        outputs = [np.asarray(o, dtype=np.float32)[:n] for o in model.predict_on_batch(batch)]
        for row, ident in enumerate(ids[start:start + n]):
            if str(ident) in failed:
                for block in outputs:
                    block[row] = 0.0
        yield start, outputs, failed


def load_preprocessed(source, index: int, preprocessing: Preprocessing,
                      input_size: int) -> np.ndarray:
    """One image as the network sees it, before the backbone's own scaling: float32 in
    [0, 1], ``input_size`` square. An image with nothing to screen in it (too small, one
    flat colour) raises :class:`~kad.errors.ImageReadError` like an unreadable one."""
    rgb = check_usable(source.load(index), source.describe(index))
    return resize(preprocessing(rgb), input_size)


def _load_batch(source, ids, plan: ExtractionPlan, start: int, stop: int):
    batch = np.zeros((stop - start, plan.input_size, plan.input_size, 3), dtype=np.float32)
    failed: dict[str, str] = {}
    for row, index in enumerate(range(start, stop)):
        try:
            batch[row] = load_preprocessed(source, index, plan.preprocessing, plan.input_size)
        except ImageReadError as exc:
            failed[str(ids[index])] = exc.reason
    return start, plan.backbone.preprocess(batch), failed


def _batches(source, ids, plan: ExtractionPlan, first: int, batch_size: int,
             workers: int | None) -> Iterator[tuple[int, np.ndarray, dict[str, str]]]:
    """Preprocessed batches in order, loaded ahead by a thread pool."""
    n = len(source)
    workers = workers or max(1, min(4, (os.cpu_count() or 2)))
    ahead = workers + 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kad-load") as pool:
        pending: list[Future] = []
        for start in range(first, n, batch_size):
            pending.append(pool.submit(_load_batch, source, ids, plan, start,
                                       min(start + batch_size, n)))
            if len(pending) >= ahead:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
