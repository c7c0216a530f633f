"""How one process extracts features: the plan of an extraction (what decides the
features and which cache entry holds them), and the local extraction loop that
:func:`kad.features.extract.extract_features` runs, which shards (:mod:`kad.features.shards`)
and the Ray
engine (:mod:`kad.features.ray_engine`) reuse.

It decodes and preprocesses images in a thread pool (OpenCV releases the GIL), starting
while the network is built and then while it runs on the previous batch (:class:`Loader`),
writes each batch to the memory-mapped entry, and resumes from the last written batch if
it was interrupted. Images that cannot be read are counted, reported and marked invalid in
the entry; they never stop the run.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kad import __version__
from kad.data.images import check_usable, resize
from kad.data.preprocessing import Preprocessing, get_preprocessing, preprocessing_at
from kad.errors import ImageReadError
from kad.features.backbones import Backbone, get_backbone, weights_identity
from kad.features.cache import (
    CacheEvent,
    DamagedEntryError,
    EventCallback,
    FeatureSet,
    cache_key,
    emit,
    entry_path,
)
from kad.utils.progress import Progress, task
from kad.utils.settings import FUNDUS_INPUT_SIZE


@dataclass
class Scores:
    """Scores of a stream of images; unreadable ones are in ``failed`` with the reason."""

    ids: list[str]
    scores: np.ndarray  # NaN where the image could not be read
    failed: dict[str, str]


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
    runtime: str = "keras"  # resolved: "keras" or "openvino" (see kad.features.runtime)
    #: The int8 network's :class:`~kad.features.int8.Quantization`; None for float32.
    quantization: object = None


def default_preprocessing(dataset) -> str:
    return "fundus" if getattr(dataset, "kind", "natural") == "fundus" else "natural"


#: Tiny images are upscaled at most this many times by default: more adds no detail,
#: only compute (which grows with the square of the input size).
MAX_UPSCALE = 10




def default_input_size(dataset, backbone: Backbone) -> int:
    """The network's input size when none is given, the one rule every command follows:
    :data:`FUNDUS_INPUT_SIZE` for fundus photographs; for datasets of tiny in-memory
    images (the 8x8 digits), ``MAX_UPSCALE`` times their side, but never less than the
    backbone's minimum (75 px for the Inception networks); otherwise the backbone's native
    size (32 px images such as CIFAR and SVHN included)."""
    if getattr(dataset, "kind", "natural") == "fundus":
        return FUNDUS_INPUT_SIZE
    array = getattr(getattr(dataset, "source", None), "array", None)
    native = backbone.default_size
    if array is None or getattr(array, "ndim", 0) < 3:
        return native
    side = max(int(array.shape[1]), int(array.shape[2]))
    return max(backbone.min_size, min(native, MAX_UPSCALE * side))


def plan_extraction(dataset, backbone="inception_resnet_v2", weights="imagenet",
                    image_size: int | None = None, preprocessing=None,
                    cache_dir: str | Path | None = None, runtime: str = "auto",
                    quantization=None) -> ExtractionPlan:
    """What decides the features of ``dataset``, and where they are cached.

    ``image_size`` None picks :func:`default_input_size`. ``runtime`` (``auto``, ``keras``
    or ``openvino``, see :mod:`kad.features.runtime`) is resolved here and recorded in the key, so
    features from different runtimes never mix. ``quantization`` (a
    :class:`~kad.features.int8.Quantization`) makes them the int8 network's, on OpenVINO,
    recorded in the key too (a float32 key is unchanged by it).
    """
    from kad.features.runtime import resolve_runtime

    bb = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    size = bb.input_size(default_input_size(dataset, bb) if image_size is None else image_size)
    # fundus:size=input works at the network's input size (see preprocessing_at)
    prep = get_preprocessing(preprocessing_at(preprocessing, size)
                             or default_preprocessing(dataset))
    engine = resolve_runtime("openvino" if quantization is not None else runtime).name
    inputs = {
        "dataset": dataset.fingerprint,
        "backbone": str(bb.spec),
        "weights": weights_identity(weights),
        "image_size": size,
        "preprocessing": prep.key,
        "preprocessing_revision": prep.revision,
        "runtime": engine,
    }
    if quantization is not None:
        inputs["int8"] = quantization.record()
    key = cache_key(inputs)
    path = entry_path(dataset.name, bb.name, key, Path(cache_dir) if cache_dir else None)
    return ExtractionPlan(bb, weights, size, prep, key, path, inputs, engine, quantization)


def cached_features(plan: ExtractionPlan, verify: bool = True) -> FeatureSet | None:
    """The complete entry of ``plan``, or None. A damaged entry raises
    :class:`~kad.features.cache.DamagedEntryError` naming the file and the remedy: a damaged
    ``meta.json`` always, a block file that does not match its checksum with ``verify``
    (each file is read once per process; without ``verify`` it is checked when first
    used)."""
    if not plan.path.is_dir():
        return None
    found = FeatureSet(plan.path)
    if verify:
        found.verify()
    return found


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
             progress: Progress | None, extra_meta: dict | None = None) -> FeatureSet:
    """Extract ``plan``'s entry here, reporting the task ``features of <dataset>`` (images
    done of all) to ``progress``, from before the network is built."""
    n = len(dataset)
    with task(progress, f"features of {dataset.name}", n) as update:
        return _extract_reporting(dataset, plan, batch_size, workers, update, extra_meta)


def _extract_reporting(dataset, plan: ExtractionPlan, batch_size: int, workers: int | None,
                       update, extra_meta: dict | None) -> FeatureSet:
    from kad.features.cache import EntryWriter

    n = len(dataset)
    recorded = EntryWriter.recorded(plan.path) or {}  # shown while the network is built
    done = min(int(recorded.get("done", 0)), n)
    update(done)
    # The first batches load while the network is built (or converted).
    loader = Loader(dataset.source, dataset.ids, plan, done, batch_size, workers,
                    pixels=takes_pixels(plan))
    try:
        return _extract_loading(dataset, plan, batch_size, workers, update, extra_meta,
                                loader)
    finally:
        loader.close()


def _extract_loading(dataset, plan: ExtractionPlan, batch_size: int, workers: int | None,
                     update, extra_meta: dict | None, loader: Loader) -> FeatureSet:
    from kad.features.cache import EntryWriter
    from kad.features.runtime import build_runtime

    n = len(dataset)
    engine = build_runtime(plan.backbone, plan.input_size, plan.weights, plan.runtime,
                           batch_size, plan.path.parent, quantization=plan.quantization,
                           pixels=takes_pixels(plan))
    names, dims = engine.names, engine.dims
    meta = {
        "key": plan.key, "inputs": plan.inputs, "dataset": dataset.name,
        "ids": [str(i) for i in dataset.ids], "kad": __version__, **(extra_meta or {}),
    }
    writer = EntryWriter(plan.path, names, dims, n, meta)
    update(writer.done)
    started: Loader | None = loader
    if writer.done != loader.first:  # the entry on disk could not be resumed as recorded:
        loader.close()  # stream_features loads from where it starts instead
        started = None
    # Writing batch k overlaps inference on batch k+1; durability is paid every few seconds.
    pending: Future | None = None
    last_sync = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kad-write") as saver:
            for start, outputs, failed in stream_features(
                    engine, dataset.source, dataset.ids, plan, batch_size, workers,
                    first=writer.done, loader=started):
                if pending is not None:
                    pending.result()
                stop = start + len(outputs[0])
                sync = stop == n or time.monotonic() - last_sync > SYNC_SECONDS
                pending = saver.submit(_save, writer, start, outputs, failed, sync)
                if sync:
                    last_sync = time.monotonic()
                update(stop)
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
                    workers: int | None = None, first: int = 0, loader: Loader | None = None,
                    ) -> Iterator[tuple[int, list[np.ndarray], dict[str, str]]]:
    """``(start, per-block outputs, failed)`` batch by batch, images loaded ahead in threads.

    ``model`` is a runtime from :func:`kad.features.runtime.build_runtime` or a Keras model. Every
    batch is run at the full ``batch_size`` (the last one padded), so an image's
    features never depend on how many images came with it. Rows of unreadable images are
    zeros and their ids are in ``failed`` with the reason. ``loader``: a :class:`Loader` of
    the same images already started (it began loading while the network was built);
    otherwise one is started here. A runtime whose ``takes_pixels`` is true (OpenVINO,
    which scales 8-bit images in the network, :class:`kad.features.runtime.OpenVINORuntime`)
    is given 8-bit images where the preprocessing makes them; any other the network's
    float32 input.
    """
    from kad.features.runtime import as_runtime

    engine = as_runtime(model)
    pixels = bool(getattr(engine, "takes_pixels", False)) and plan.preprocessing.eight_bit
    if pixels and loader is not None and loader.dtype != np.uint8:
        loader.close()  # it loads the network's float input: load the images instead
        loader = None
    own = loader is None
    if own:
        loader = Loader(source, ids, plan, first, batch_size, workers, pixels=pixels)
    try:
        for start, batch, n, failed in loader:
            if not pixels:
                batch = network_input(plan.backbone, batch)
            outputs = [o[:n] for o in engine.predict(batch)]
            for row, ident in enumerate(ids[start:start + n]):
                if str(ident) in failed:
                    for block in outputs:
                        block[row] = 0.0
            yield start, outputs, failed
    finally:
        if own:
            loader.close()


def load_preprocessed(source, index: int, preprocessing: Preprocessing,
                      input_size: int) -> np.ndarray:
    """One image as the network sees it, before the backbone's own scaling: float32 in
    [0, 1], ``input_size`` square. An image with nothing to screen in it (too small, one
    flat colour) raises :class:`~kad.errors.ImageReadError` like an unreadable one.

    A large JPEG is decoded at the smallest size the preprocessing can work from
    (:meth:`~kad.data.preprocessing.Preprocessing.source_side`), which is much cheaper.
    An 8-bit preprocessing (:attr:`~kad.data.preprocessing.Preprocessing.eight_bit`) gives
    :func:`load_image_pixels` divided by 255.
    """
    return preprocess_image(_decoded(source, index, preprocessing, input_size),
                            preprocessing, input_size)


def preprocess_image(rgb: np.ndarray, preprocessing: Preprocessing,
                     input_size: int) -> np.ndarray:
    """A decoded image as :func:`load_preprocessed` gives it (float32 in [0, 1],
    ``input_size`` square): an 8-bit preprocessing's image resized as 8 bits, divided by
    255, so it is exactly what the loader's 8-bit batches hold."""
    if not preprocessing.eight_bit:
        return resize(preprocessing(rgb), input_size)
    image = resize(preprocessing.pixels(rgb), input_size).astype(np.float32)
    image /= np.float32(255.0)
    return image


def load_image_pixels(source, index: int, preprocessing: Preprocessing, input_size: int,
                      out: np.ndarray | None = None) -> np.ndarray:
    """One image as the network sees it, before the backbone's own scaling, as ``uint8``
    on the 0-255 scale, ``input_size`` square, for a preprocessing with 8-bit output
    (:attr:`~kad.data.preprocessing.Preprocessing.eight_bit`); written into ``out`` (a
    row of a batch) when given. Raises as :func:`load_preprocessed` does."""
    rgb = _decoded(source, index, preprocessing, input_size)
    if out is None:
        return resize(preprocessing.pixels(rgb), input_size)
    return preprocessing.pixels_into(rgb, out)  # made in the batch's row, or resized into it


def _decoded(source, index: int, preprocessing: Preprocessing, input_size: int):
    side = preprocessing.source_side(input_size)
    load_scaled = getattr(source, "load_scaled", None)
    image = source.load(index) if load_scaled is None or side is None else load_scaled(
        index, side)
    return check_usable(image, source.describe(index))


def _load_into(source, ids, plan: ExtractionPlan, start: int, stop: int, batch: np.ndarray,
               row: int = 0) -> dict[str, str]:
    """Images ``start:stop`` as the network takes them, written into ``batch`` from ``row``
    on; ``{id: reason}`` of those that could not be read, whose rows are zeros. A
    ``uint8`` batch receives the images themselves (:func:`load_image_pixels`: the network
    scales them), a ``float32`` one the network's input (scaled in place, no copy of the
    batch)."""
    failed: dict[str, str] = {}
    prep, size = plan.preprocessing, plan.input_size
    for at, index in enumerate(range(start, stop), row):
        try:
            if batch.dtype == np.uint8:
                load_image_pixels(source, index, prep, size, out=batch[at])
            elif prep.eight_bit:
                _scale_into(plan.backbone, load_image_pixels(source, index, prep, size), batch[at])
            else:
                plan.backbone.preprocess_into(load_preprocessed(source, index, prep, size),
                                              batch[at])
        except ImageReadError as exc:
            failed[str(ids[index])] = exc.reason
            batch[at] = 0
    return failed


def _scale_into(backbone: Backbone, pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
    """8-bit ``pixels`` (0-255) as the network's input, written into ``out`` (float32):
    divided by 255 and then scaled, the very operations that :func:`load_preprocessed`
    and :meth:`Backbone.preprocess` apply, so the numbers are the same to the last bit."""
    np.divide(pixels, np.float32(255.0), out=out, dtype=np.float32)
    return backbone.preprocess_into(out, out)


def network_input(backbone: Backbone, batch: np.ndarray) -> np.ndarray:
    """A batch from a :class:`Loader` as the network's input: a ``uint8`` batch (images on
    the 0-255 scale) scaled into a new float32 one, a float32 batch as it is."""
    if batch.dtype != np.uint8:
        return batch
    out = np.empty(batch.shape, np.float32)
    for row in range(len(batch)):  # one image at a time: no float temporaries of the batch
        _scale_into(backbone, batch[row], out[row])
    return out


def takes_pixels(plan: ExtractionPlan) -> bool:
    """Whether the network of ``plan`` can take 8-bit images and scale them itself: its
    preprocessing has 8-bit output, it runs on OpenVINO (whose preprocessing folds the
    scaling into the compiled model) and the backbone's scaling is a scale and offset."""
    return (plan.runtime == "openvino" and plan.preprocessing.eight_bit
            and plan.backbone.input_scaling is not None)


def _batch_dtype(plan: ExtractionPlan, pixels: bool) -> type:
    """A batch's element type: ``uint8`` for 8-bit images where ``pixels`` is asked and the
    preprocessing makes them, else the network's float32 input."""
    return np.uint8 if pixels and plan.preprocessing.eight_bit else np.float32


def _load_batch(source, ids, plan: ExtractionPlan, start: int, stop: int,
                pixels: bool = False):
    """``(start, batch, failed)``: images ``start:stop`` as the network takes them, rows of
    unreadable ones zeros; with ``pixels``, the 8-bit images (see :func:`takes_pixels`)."""
    batch = np.zeros((stop - start, plan.input_size, plan.input_size, 3),
                     dtype=_batch_dtype(plan, pixels))
    return start, batch, _load_into(source, ids, plan, start, stop, batch)


#: Batches a :class:`Loader` loads ahead of the one the network runs on.
AHEAD = 2


class Loader:
    """Preprocessed batches of images in order, loaded ahead by a thread pool from the
    moment the loader is made, so that loading overlaps building or converting the network.

    Each batch is split into one slice per worker, written straight into the batch, so the
    next batch is ready as soon as possible while the network runs on the current one.
    With ``pixels`` (see :func:`takes_pixels`) a batch holds the 8-bit images themselves,
    for a network that scales its own input; otherwise the network's float32 input,
    scaled in place. Memory is bounded and allocated once: ``AHEAD + 1`` batches, each
    ``batch_size`` x ``input_size`` x ``input_size`` x 3 (the last batch padded with zeros
    to the full size), reused in turn: a batch is handed out until the next one is asked
    for. (Threads, not processes: OpenCV and NumPy release the GIL, and a process would
    have to copy every batch back.)

    Iterating yields ``(start, batch, n, failed)``: the first ``n`` rows of ``batch`` are
    the images ``start:start + n``; ``failed`` maps ids of unreadable ones to the reason
    (their rows are zeros). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, source, ids, plan: ExtractionPlan, first: int = 0,
                 batch_size: int = 64, workers: int | None = None, pixels: bool = False):
        self.source, self.ids, self.plan = source, ids, plan
        self.first, self.batch_size = int(first), int(batch_size)
        self.workers = workers or max(1, min(4, (os.cpu_count() or 2)))
        self.dtype = _batch_dtype(plan, pixels)
        self._step = max(1, -(-self.batch_size // self.workers))
        self._starts = iter(range(self.first, len(source), self.batch_size))
        self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                        thread_name_prefix="kad-load")
        self._pending: deque[tuple[int, int, np.ndarray, list[Future]]] = deque()
        self._free: list[np.ndarray] = []
        for _ in range(AHEAD):
            self._submit_next()

    def _submit_next(self) -> None:
        start = next(self._starts, None)
        if start is None:
            return
        stop = min(start + self.batch_size, len(self.source))
        size = self.plan.input_size
        if self._free:
            batch = self._free.pop()
            batch[stop - start:] = 0  # padding rows of a reused batch
        else:
            batch = np.zeros((self.batch_size, size, size, 3), dtype=self.dtype)
        parts = [self._pool.submit(_load_into, self.source, self.ids, self.plan, a,
                                   min(a + self._step, stop), batch, a - start)
                 for a in range(start, stop, self._step)]
        self._pending.append((start, stop, batch, parts))

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, int, dict[str, str]]]:
        handed: np.ndarray | None = None
        while self._pending:
            start, stop, batch, parts = self._pending.popleft()
            failed: dict[str, str] = {}
            for part in parts:
                failed.update(part.result())
            if handed is not None:  # the caller asked for the next batch: done with it
                self._free.append(handed)
            self._submit_next()
            handed = batch
            yield start, batch, stop - start, failed

    def close(self) -> None:
        """Stop loading: batches not started are dropped, running slices finish."""
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ int8 calibration

#: Images the int8 calibration loads ahead at a time (lowered by the memory budget).
CALIBRATION_BATCH = 16


def plan_quantization(dataset, rows: np.ndarray, plan: ExtractionPlan, limit: int | None = None,
                      progress: Progress | None = None):
    """The :class:`~kad.features.int8.Quantization` calibrated on ``rows`` of ``dataset``
    (at most ``limit``, default :data:`~kad.features.int8.CALIBRATION_LIMIT`, evenly spread:
    :func:`~kad.features.int8.calibration_rows`), prepared as the float ``plan`` prepares
    them, by a :class:`Loader` (a few batches in memory at a time). Its key names the
    plan's key (dataset, backbone, weights, size, preprocessing), the images' ids, their
    number and NNCF's version."""
    from kad.errors import KadError
    from kad.features.batching import network_batch
    from kad.features.int8 import CALIBRATION_LIMIT, Quantization, calibration_rows, nncf_version
    from kad.utils.files import record_key

    chosen = calibration_rows(rows, CALIBRATION_LIMIT if limit is None else limit)
    if not len(chosen):
        raise KadError("the int8 calibration needs training images; there are none")
    ids = [str(i) for i in np.asarray(dataset.ids, dtype=str)[chosen]]
    version = nncf_version()
    key = record_key({"features": plan.key, "ids": ids, "images": len(ids), "nncf": version})
    source = dataset.source.take(chosen)

    def load(report: Progress | None) -> Iterator[np.ndarray]:
        done = 0
        with task(report, "int8 calibration", len(ids)) as update, \
                Loader(source, ids, plan, 0, network_batch(plan.backbone, plan.input_size,
                                                           CALIBRATION_BATCH)) as loader:
            for start, batch, n, failed in loader:
                for row in range(n):
                    if ids[start + row] not in failed:
                        yield batch[row:row + 1].copy()
                done += n
                update(done)

    return Quantization(key, len(ids), version, load, progress)
