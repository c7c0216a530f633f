"""Feature extraction: every block of a backbone for every image of a dataset, cached.

:func:`extract_features` returns a :class:`~kad.features.cache.FeatureSet`. When the cache already
holds the entry it returns at once (verified), without importing TensorFlow. Otherwise it
runs the extraction in this process (:mod:`kad.features.extraction`), as one shard of several
(:mod:`kad.features.shards`) or on Ray (:mod:`kad.features.ray_engine`). Images that cannot be
read are
counted, reported and marked invalid in the entry; they never stop the run.
"""

from __future__ import annotations

from pathlib import Path

from kad.features.batching import network_batch
from kad.features.cache import EventCallback, FeatureSet, check_writable, entry_lock
from kad.features.extraction import (
    ExtractionPlan,
    _extract,
    _usable,
    cached_features,
    default_input_size,
    default_preprocessing,
    load_preprocessed,
    plan_extraction,
    stream_features,
)
from kad.utils.progress import Progress

__all__ = [
    "ExtractionPlan",
    "cached_features",
    "default_input_size",
    "default_preprocessing",
    "extract_features",
    "load_preprocessed",
    "plan_extraction",
    "stream_features",
]


def extract_features(dataset, backbone="inception_resnet_v2", weights="imagenet",
                     image_size: int | None = None, preprocessing=None, *,
                     batch_size: int = 64, workers: int | None = None,
                     cache_dir: str | Path | None = None,
                     progress: Progress | None = None,
                     on_event: EventCallback | None = None,
                     shard: tuple[int, int] | None = None,
                     engine: str = "local", ray_address: str | None = None,
                     blocks: list[str] | None = None,
                     runtime: str = "auto", quantization=None) -> FeatureSet:
    """Features of every block for every image of ``dataset``; see the module docstring.

    ``progress`` (a :class:`~kad.utils.progress.Progress`) gets the task ``features of
    <dataset>``, updated after every batch (the CLI draws a rich bar; a cached entry
    reports nothing);
    ``on_event`` receives :class:`~kad.features.cache.CacheEvent` lines to show (waiting for another
    process's lock, a damaged entry extracted again, shards merged). A cached entry is
    verified against its checksums before it is returned; a damaged one is extracted again.

    ``shard=(i, n)`` computes only the i-th of n disjoint shares (``0 <= i < n``) into its
    own resumable entry, see :mod:`kad.features.shards`. ``engine="ray"`` runs the extraction on Ray
    Data, see :mod:`kad.features.ray_engine`.

    An entry that keeps only some blocks (:func:`~kad.features.cache.prune_entry`, after ``kad
    fit``) is used when it holds ``blocks``; asked for all blocks (``blocks=None``), it is
    extracted again in full.

    ``runtime``: ``auto``, ``keras`` or ``openvino`` (:mod:`kad.features.runtime`).
    ``quantization``: the int8 network's :class:`~kad.features.int8.Quantization`
    (:mod:`kad.features.int8`), extracted locally only.
    """
    # The runtime is resolved once, here on the driver (auto: by what this machine has), and
    # recorded in the plan: a shard or a Ray actor builds the plan's runtime, so every
    # engine writes, and finds, the same entry.
    plan = plan_extraction(dataset, backbone, weights, image_size, preprocessing, cache_dir,
                           runtime, quantization)
    if quantization is not None and (shard is not None or engine != "local"):
        raise ValueError("int8 features are extracted locally: drop --shard and --engine ray")
    if shard is not None or engine != "local":
        # as many images per network call as the memory budget holds at this input size
        batch_size = network_batch(plan.backbone, plan.input_size, batch_size)
        if engine not in ("local", "ray"):
            raise ValueError(f"unknown engine {engine!r}: use local or ray")
        if shard is not None and engine != "local":
            raise ValueError("--shard and --engine ray do not go together: Ray shares the "
                             "work out itself")
        if shard is not None:
            from kad.features.shards import extract_shard

            return extract_shard(dataset, plan, shard, batch_size=batch_size,
                                 workers=workers, progress=progress, on_event=on_event)
        from kad.features.ray_engine import extract_with_ray

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
        return _extract(dataset, plan, network_batch(plan.backbone, plan.input_size, batch_size),
                        workers, progress)
