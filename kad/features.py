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
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .backbones import Backbone, get_backbone, weights_identity
from .cache import FeatureSet, cache_key, entry_lock, entry_path
from .errors import ImageReadError
from .images import resize
from .preprocessing import Preprocessing, get_preprocessing, preprocessing_at

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
    # fundus:size=input works at the network's input size (see preprocessing_at)
    prep = get_preprocessing(preprocessing_at(preprocessing, size)
                             or default_preprocessing(dataset))
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


def cached_features(plan: ExtractionPlan) -> FeatureSet | None:
    return FeatureSet(plan.path) if (plan.path / "meta.json").is_file() else None


def extract_features(dataset, backbone="inception_resnet_v2", weights="imagenet",
                     image_size: int | None = None, preprocessing=None, *,
                     batch_size: int = 64, workers: int | None = None,
                     cache_dir: str | Path | None = None,
                     progress: ProgressCallback | None = None) -> FeatureSet:
    """Features of every block for every image of ``dataset``; see the module docstring.

    ``progress(done, total)`` is called after every batch (the CLI draws a rich bar).
    """
    plan = plan_extraction(dataset, backbone, weights, image_size, preprocessing, cache_dir)
    found = cached_features(plan)
    if found is not None:
        return found
    with entry_lock(plan.path):
        found = cached_features(plan)  # another process may have finished it meanwhile
        if found is not None:
            return found
        return _extract(dataset, plan, batch_size, workers, progress)


SYNC_SECONDS = 10.0  # how often finished batches are made durable during extraction


def _extract(dataset, plan: ExtractionPlan, batch_size: int, workers: int | None,
             progress: ProgressCallback | None) -> FeatureSet:
    from .cache import EntryWriter

    model, names = plan.backbone.build_extractor(plan.input_size, plan.weights)
    dims = [int(out.shape[-1]) for out in model.outputs]
    meta = {
        "key": plan.key, "inputs": plan.inputs, "dataset": dataset.name,
        "ids": [str(i) for i in dataset.ids], "kad": __version__,
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
    [0, 1], ``input_size`` square."""
    return resize(preprocessing(source.load(index)), input_size)


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
