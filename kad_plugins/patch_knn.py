"""Patch kNN: an image is as anomalous as its most unusual location.

Every other feature detector scores the spatial mean of a block's map, so a lesion a few
pixels wide, which changes a handful of the map's locations, barely moves its score. This
detector keeps the locations apart, as PatchCore does (Roth et al. 2022, "Towards total
recall in industrial anomaly detection"): it remembers the features of normal locations
and scores each location of a new image by its distance to the nearest of them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np

from kad.detectors.base import BaseDetector, DamagedStateError, check_array_state

#: float32 entries of one tile of the distance matrix (32 MiB, one per thread): the query
#: locations of a tile, of one image or of several, are compared with the whole bank in
#: one product
_TILE = 1 << 23
_MIN_ROWS, _MAX_ROWS = 64, 4096
#: query locations projected and searched at a time when scoring many images
_BATCH_ROWS = 1 << 16
#: the approximate index (``index="hnsw"``): hnswlib's graph degree, the candidates kept
#: while building it and while searching it
_HNSW_M, _HNSW_EF_CONSTRUCTION, _HNSW_EF = 16, 100, 64
INDEXES = ("exact", "hnsw")
#: how the bank is drawn from the training locations
SAMPLINGS = ("random", "coreset")
#: the greedy coreset is chosen among at most this many training locations (drawn
#: uniformly first: a kind of location as rare as one in this many is still offered) and
#: measures distances on at most ``_CORESET_DIMS`` random directions, as PatchCore does
_CORESET_POOL, _CORESET_DIMS = 200_000, 32
#: the nearest neighbours are found by this many rounds of argmin at most, by
#: argpartition beyond (:func:`_smallest`)
_ARGMIN_ROUNDS = 32
#: threads searching tiles at once, at most
_MAX_WORKERS = 8


def _workers() -> int:
    """The cores this process may run on, at most ``_MAX_WORKERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(_MAX_WORKERS, cores or 1))


def _product(queries: np.ndarray, augmented: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = queries @ augmented``: one tile of ranking keys (the single place where
    query locations meet the bank, so that the work done can be counted)."""
    return np.matmul(queries, augmented, out=out)


class PatchKNNDetector(BaseDetector):
    """Distance of each location to the nearest normal locations; the score is the largest.

    ``fit`` takes the unpooled block maps of normal images, ``(n, h, w, c)``: kad's
    pipeline passes the maps of its blocks stacked on the finest grid
    (:class:`kad.features.representation.BlockMaps`) and sets ``block_channels`` to each
    block's number of channels, in order (:meth:`for_representation`; None: all channels
    are one block). The detector keeps a memory
    bank of at most ``bank_size`` location vectors, drawn uniformly at random with
    ``random_state`` (``sampling="random"``, the default: uniform draws keep fitting
    linear in the number of images). A block of more than ``max_dims`` channels is first
    projected onto ``max_dims`` random Gaussian directions (distances kept within a few
    percent, by the Johnson-Lindenstrauss lemma, as PatchCore projects for its coreset).

    For each block, a location's distance is the mean Euclidean distance of its features
    to those of its ``n_neighbors`` nearest bank locations. The distances are
    standardised per block, by the median and the median absolute deviation of the
    distances of the training images' locations, and added over blocks: a location's
    anomaly is how many typical spreads above an ordinary location it lies, at every
    scale together, so that a block with wider features does not drown the others. An
    image's score is its largest location anomaly.

    Three options shape what "normal" means for small lesions on photographs of one kind
    (fundus photographs cropped around the fundus): ``sampling="coreset"`` draws the bank
    by greedy k-centre instead (PatchCore's coreset: each next vector is the training
    location farthest from those kept, so rare normal locations, such as the optic disc,
    stay in a small bank; chosen among at most 200,000 locations, or ``bank_size`` when
    larger, on 32 random directions); ``aggregate`` (odd, 1 by default) replaces each
    location's features by the mean of its ``aggregate`` x ``aggregate`` neighbourhood on
    the stacked grid, as PatchCore aggregates; ``position`` (0 by default) appends the
    location's two coordinates relative to the grid's centre, weighted so that crossing
    half the grid costs ``position`` typical feature spreads of the block
    (``position_scale_``): a structure then counts as normal only where normal images
    have it.

    Its heatmap is its own (:meth:`explain_maps`): the location anomalies, whose maximum
    *is* the score; ordinary locations are near or below zero. :meth:`score_maps` gives
    a batch's scores and maps from one search (:meth:`_score_maps`).

    A training image's locations in the bank are not their own neighbours: its training
    distances are measured against the bank without them, so that the standardisation and
    ``threshold_`` rest on distances comparable with new images'. The bank keeps its
    vectors in image order, so an image's own vectors are one run of columns, set aside
    in the same products as the others: fitting costs one pass of every training location
    over the bank, linear in the number of images.

    The search is exact by default (``index="exact"``): the locations of many images at
    once, in tiles of about 32 MiB of distance matrix, are ranked against the whole bank
    by one float32 product each, and the distances to the nearest vectors so found are
    recomputed in float64. A location's result depends on its own features only, never on
    the images scored with it. ``index="hnsw"`` searches a graph of the bank instead
    (hnswlib, ``pip install hnswlib``; degree 16, 64 candidates), several times faster and
    approximate: it is built from the bank on first use, never saved, and the training
    pass of ``fit`` stays exact.

    The pass over the training images in ``fit`` and the scoring of images report, image
    by image, to the ``progress`` given to ``fit`` and ``anomaly_score``.
    """

    input_kind = "maps"
    quick_params = {"bank_size": 2000}
    #: ``verbose`` drew a bar; fitting reports to ``fit``'s ``progress`` instead
    retired_params = ("verbose",)

    def __init__(self, n_neighbors=1, bank_size=50000, block_channels=None, max_dims=128,
                 random_state=0, contamination=0.1, index="exact", sampling="random",
                 aggregate=1, position=0.0):
        self.n_neighbors = n_neighbors
        self.bank_size = bank_size
        self.block_channels = block_channels
        self.max_dims = max_dims
        self.random_state = random_state
        self.contamination = contamination
        self.index = index
        self.sampling = sampling
        self.aggregate = aggregate
        self.position = position

    @staticmethod
    def _slices(widths) -> list[slice]:
        edges = np.cumsum([0, *widths])
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def _project(self, maps: np.ndarray) -> np.ndarray:
        """``maps`` (..., h, w, c) as the bank holds them: each location's features
        averaged over its ``aggregate`` x ``aggregate`` neighbourhood, each block of more
        than ``max_dims`` channels projected onto its ``max_dims`` random Gaussian
        directions (``projections_``), and with ``position`` > 0 the location's two
        coordinates appended to every block (``position_scale_``)."""
        maps = _neighbourhood_mean(np.asarray(maps, dtype=np.float32), int(self.aggregate))
        coordinates = _coordinates(maps.shape[-3:-1]) if self.position else None
        parts = []
        for b, (channels, projection) in enumerate(zip(
                self._slices(self.input_widths_), self.projections_, strict=True)):
            part = maps[..., channels]
            parts.append(part if projection is None else part @ projection.T)
            if coordinates is not None:
                parts.append(np.broadcast_to(coordinates * self.position_scale_[b],
                                             (*part.shape[:-1], 2)))
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def _position_scales(self, maps: np.ndarray) -> np.ndarray:
        """Per block, ``position`` times the spread of the training locations' features
        (the root of the sum of the channels' variances, after aggregation and
        projection): a location at the fundus edge is, by its coordinates alone, about
        ``position`` typical feature differences away from the centre."""
        sample = maps.reshape(-1, maps.shape[-1])
        rows = np.random.default_rng(self.random_state).choice(
            len(sample), min(len(sample), 100_000), replace=False)
        sample = sample[np.sort(rows)]
        scales = []
        for channels, projection in zip(self._slices(self.input_widths_), self.projections_,
                                        strict=True):
            part = sample[:, channels]
            part = part if projection is None else part @ projection.T
            scales.append(float(self.position) * float(np.sqrt(part.var(axis=0).sum())))
        return np.asarray(scales)

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        from sklearn.random_projection import GaussianRandomProjection

        n, h, w, c = X.shape
        widths = [c] if self.block_channels is None else [int(v) for v in self.block_channels]
        if min(widths) < 1 or sum(widths) != c:
            raise ValueError(f"block_channels {self.block_channels!r} must be positive and "
                             f"add up to the maps' {c} channels")
        if not (isinstance(self.bank_size, (int, np.integer)) and self.bank_size >= 1):
            raise ValueError(f"bank_size must be a positive integer, got {self.bank_size!r}")
        if not (isinstance(self.max_dims, (int, np.integer)) and self.max_dims >= 1):
            raise ValueError(f"max_dims must be a positive integer, got {self.max_dims!r}")
        if self.index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {self.index!r}")
        if self.index == "hnsw":
            _import_hnswlib()
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if not (isinstance(self.aggregate, (int, np.integer)) and self.aggregate >= 1
                and self.aggregate % 2 == 1):
            raise ValueError(f"aggregate must be an odd positive integer (the side of the "
                             f"neighbourhood averaged, e.g. 3), got {self.aggregate!r}")
        if not (isinstance(self.position, (int, float, np.number))
                and not isinstance(self.position, bool) and 0 <= self.position < np.inf):
            raise ValueError(f"position must be a number >= 0 (the weight of a location's "
                             f"coordinates, e.g. 1.0), got {self.position!r}")
        # Wide blocks are projected onto max_dims random directions, which keeps distances
        # within a few percent (Johnson-Lindenstrauss) at a fraction of the cost and size.
        self.input_widths_ = tuple(widths)
        self.projections_ = [
            None if width <= self.max_dims else GaussianRandomProjection(
                int(self.max_dims),
                random_state=None if self.random_state is None else self.random_state + b,
            ).fit(np.zeros((1, width))).components_.astype(np.float32)
            for b, width in enumerate(widths)]
        extra = 2 if self.position else 0
        self.dims_ = tuple(min(width, int(self.max_dims)) + extra for width in widths)
        self.position_scale_ = (self._position_scales(
            _neighbourhood_mean(np.asarray(X, dtype=np.float32), int(self.aggregate)))
            if self.position else np.zeros(len(widths)))
        X = self._project(X)
        c = X.shape[-1]
        locations = X.reshape(-1, c)
        size = min(int(self.bank_size), len(locations))
        if self.sampling == "coreset" and size < len(locations):
            with self._task("patch kNN: choosing the coreset", size) as update:
                keep = _greedy_coreset(locations, size, self.random_state, update)
        else:
            keep = np.sort(np.random.default_rng(self.random_state).choice(
                len(locations), size, replace=False))
        # in image order: each image's vectors are one run of the bank
        self.bank_ = np.ascontiguousarray(locations[keep], dtype=np.float32)
        self.bank_image_ = (keep // (h * w)).astype(np.int64)
        others = size - int(np.bincount(self.bank_image_).max())
        if n < 2 or not (isinstance(self.n_neighbors, (int, np.integer))
                         and 1 <= self.n_neighbors <= others):
            raise ValueError(
                f"PatchKNNDetector needs at least 2 training images and n_neighbors in "
                f"[1, {others}] (the bank vectors of the other images), got n_samples={n}, "
                f"n_neighbors={self.n_neighbors!r}")
        # every training location against the bank without its own image's vectors, many
        # images per product: the longest part of fitting, reported to fit's progress
        with self._task("patch kNN: training images against the bank", n) as update:
            distances = self._search(locations, h * w, update, own_images=True)
        distances = distances.reshape(len(self.dims_), n, h, w).transpose(1, 0, 2, 3)
        per_block = distances.transpose(1, 0, 2, 3).reshape(distances.shape[1], -1)
        self.centre_ = np.median(per_block, axis=1)
        spread = np.median(np.abs(per_block - self.centre_[:, None]), axis=1)
        self.spread_ = np.where(spread > 0, spread, 1.0)
        self._training = distances

    def distances(self, maps: np.ndarray) -> np.ndarray:
        """``(blocks, h, w)``: for every block, each location's mean distance to its
        ``n_neighbors`` nearest bank locations, for one image's map ``(h, w, c)``."""
        return self._distances(self._project(maps))

    def _distances(self, maps: np.ndarray) -> np.ndarray:
        """:meth:`distances` of a map already projected."""
        h, w, c = maps.shape
        return self._search(maps.reshape(h * w, c), h * w).reshape(-1, h, w)

    def _augmented(self) -> list[np.ndarray]:
        """Each block's bank as ``(dims + 1, bank)`` float32: ``-b`` over ``|b|²/2``, so
        that ``[x, 1] @ augmented = |b|²/2 - x·b``, which orders the bank vectors as
        ``|x - b|²`` does. A cache, rebuilt from ``bank_`` (after loading, after fitting)."""
        cached = self.__dict__.get("_augmented_bank")
        if cached is None or cached[0] is not self.bank_:
            parts = []
            for channels in self._slices(self.dims_):
                bank = self.bank_[:, channels]
                part = np.empty((bank.shape[1] + 1, len(bank)), dtype=np.float32)
                part[:-1] = -bank.T
                part[-1] = 0.5 * np.einsum("ij,ij->i", bank, bank)
                parts.append(part)
            cached = self._augmented_bank = (self.bank_, parts)
        return cached[1]

    def _tile_rows(self) -> int:
        """Query locations per tile: about ``_TILE`` entries of distance matrix."""
        return int(np.clip(_TILE // len(self.bank_), _MIN_ROWS, _MAX_ROWS))

    def _search(self, queries: np.ndarray, per_image: int, update=lambda _: None, *,
                own_images: bool = False) -> np.ndarray:
        """``(blocks, len(queries))``: each projected location's mean distance to its
        ``n_neighbors`` nearest bank vectors, block by block. ``queries`` are the
        locations of whole images, ``per_image`` each; ``update(images done)`` is called
        as images are finished.

        ``own_images``: ``queries`` are the training maps, in order, and the bank vectors
        of a location's own image are not its neighbours (their columns of the tile are set
        to infinity: the bank is in image order, so they are one run).

        Exact search: ``[x, 1] @ augmented`` ranks the whole bank for a tile of locations
        in one float32 product; the ``n_neighbors`` smallest are taken and their distances
        recomputed in float64, so that cancellation in the product cannot blur small
        ones. Every location is ranked on its own row: its result does not depend on the
        locations it shares a tile with."""
        if self.index == "hnsw" and not own_images:
            out = self._search_hnsw(queries)
            for image in range(1, len(queries) // per_image + 1):
                update(image)
            return out
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        k = int(self.n_neighbors)
        blocks = self._slices(self.dims_)
        augmented = self._augmented()
        rows = self._tile_rows()
        if own_images:  # where each image's run of bank vectors starts and ends
            edges = np.searchsorted(self.bank_image_,
                                    np.arange(len(queries) // per_image + 1), side="left")
        out = np.empty((len(blocks), len(queries)))
        buffers = threading.local()  # each thread's tile, reused

        def search_tile(start: int) -> int:
            stop = min(start + rows, len(queries))
            if getattr(buffers, "tile", None) is None:
                buffers.tile = np.empty((min(rows, len(queries)), len(self.bank_)),
                                        dtype=np.float32)
            tile = buffers.tile[:stop - start]
            for b, channels in enumerate(blocks):
                x = np.ascontiguousarray(queries[start:stop, channels], dtype=np.float32)
                ones = np.empty((len(x), x.shape[1] + 1), dtype=np.float32)
                ones[:, :-1], ones[:, -1] = x, 1.0
                _product(ones, augmented[b], tile)
                if own_images:
                    for image in range(start // per_image, (stop - 1) // per_image + 1):
                        first = max(start, image * per_image) - start
                        last = min(stop, (image + 1) * per_image) - start
                        tile[first:last, edges[image]:edges[image + 1]] = np.inf
                near = _smallest(tile, k)
                out[b, start:stop] = self._exact(x, near, channels)
            return stop

        # tiles in parallel, each on one BLAS thread: cheaper than threaded products of
        # a small inner dimension, and the same result for a location on any tile
        starts = range(0, len(queries), rows)
        reported = 0
        with threadpool_limits(1), ThreadPoolExecutor(min(_workers(), len(starts))) as pool:
            for stop in pool.map(search_tile, starts):
                done = stop // per_image
                for image in range(reported + 1, done + 1):  # image by image
                    update(image)
                reported = max(reported, done)
        return out

    def _exact(self, x: np.ndarray, near: np.ndarray, channels: slice) -> np.ndarray:
        """Mean float64 distance of each location ``x`` to its bank vectors ``near``."""
        diff = x[:, None, :].astype(np.float64) - self.bank_[:, channels][near]
        return np.sqrt(np.einsum("ijk,ijk->ij", diff, diff)).mean(axis=1)

    def _search_hnsw(self, queries: np.ndarray) -> np.ndarray:
        """:meth:`_search` through hnswlib graphs of the bank, one per block, built on
        first use (a cache: never saved, rebuilt after loading)."""
        k = int(self.n_neighbors)
        cached = self.__dict__.get("_hnsw")
        if cached is None or cached[0] is not self.bank_:
            hnswlib = _import_hnswlib()
            graphs = []
            for b, channels in enumerate(self._slices(self.dims_)):
                graph = hnswlib.Index(space="l2", dim=channels.stop - channels.start)
                graph.init_index(max_elements=len(self.bank_), M=_HNSW_M,
                                 ef_construction=_HNSW_EF_CONSTRUCTION,
                                 random_seed=100 + b + (self.random_state or 0))
                # one thread: the same graph, so the same scores, at every build
                graph.add_items(np.ascontiguousarray(self.bank_[:, channels]),
                                np.arange(len(self.bank_)), num_threads=1)
                graph.set_ef(max(_HNSW_EF, k))
                graphs.append(graph)
            cached = self._hnsw = (self.bank_, graphs)
        out = np.empty((len(cached[1]), len(queries)))
        for b, (channels, graph) in enumerate(zip(self._slices(self.dims_), cached[1],
                                                  strict=True)):
            x = np.ascontiguousarray(queries[:, channels], dtype=np.float32)
            near, _ = graph.knn_query(x, k=k)
            out[b] = self._exact(x, near.astype(np.int64), channels)
        return out

    def _anomaly(self, distances: np.ndarray) -> np.ndarray:
        """Location anomalies ``(h, w)`` from per-block distances ``(blocks, h, w)``."""
        return ((distances - self.centre_[:, None, None])
                / self.spread_[:, None, None]).sum(axis=0)

    def location_scores(self, maps: np.ndarray) -> np.ndarray:
        """``(h, w)`` anomaly of every location of one image's map ``(h, w, c)``: its
        per-block distances, standardised and added (see the class docstring)."""
        return self._anomaly(self.distances(maps))

    def _anomalies(self, X) -> Iterator[np.ndarray]:
        """The location anomalies of every image of ``X`` ``(n, h, w, c)``, one ``(h, w)``
        float64 array per image, in order: the images projected and searched many at a
        time, reported to the call's progress."""
        n, h, w, _ = X.shape
        group = max(1, _BATCH_ROWS // (h * w))  # images projected and searched together
        with self._task("patch kNN: scoring images", n) as update:
            for first in range(0, n, group):
                maps = self._project(X[first:first + group])
                distances = self._search(maps.reshape(-1, maps.shape[-1]), h * w,
                                         lambda done, f=first: update(f + done))
                distances = distances.reshape(len(self.dims_), len(maps), h, w)
                for i in range(len(maps)):
                    yield self._anomaly(distances[:, i])

    def _score(self, X):
        return np.array([anomaly.max() for anomaly in self._anomalies(X)], dtype=np.float64)

    def _score_maps(self, X):
        """Scores and maps of a batch from one search: each image's map is its location
        anomalies as :meth:`explain_maps` returns them, and its score their maximum, as
        :meth:`anomaly_score` takes it (the same numbers, bit for bit)."""
        anomalies = list(self._anomalies(X))
        scores = np.array([anomaly.max() for anomaly in anomalies], dtype=np.float64)
        return scores, [anomaly.astype(np.float32) for anomaly in anomalies]

    def _training_scores(self, X):  # noqa: ARG002 - the hook's signature; computed by _fit
        training, self._training = self._training, None  # computed by _fit, without
        return np.array([self._anomaly(d).max() for d in training])  # own-image matches

    def set_fitted_state(self, state):
        """As the base class does; a model saved before positions existed has none
        (``position_scale_`` zeros)."""
        state = dict(state)
        if "position_scale_" not in state and isinstance(state.get("input_widths_"), tuple):
            state["position_scale_"] = np.zeros(len(state["input_widths_"]))
        super().set_fitted_state(state)

    def validate_fitted_state(self):
        """The blocks' widths add up to the maps' channels, each projection maps its block
        to ``dims_``, the bank is finite and as wide as the projected blocks, with at least
        ``n_neighbors`` rows, and there is a finite centre and a positive spread per
        block."""
        super().validate_fitted_state()
        if len(self.input_shape_) != 3:
            raise DamagedStateError(f"input_shape_ is {self.input_shape_!r}, not (h, w, c)")
        channels = self.input_shape_[2]
        widths, dims = self.input_widths_, self.dims_
        if (not isinstance(widths, tuple) or not isinstance(dims, tuple) or not widths
                or len(dims) != len(widths)
                or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in (*widths, *dims))
                or sum(widths) != channels):
            raise DamagedStateError(f"input_widths_ {widths!r} and dims_ {dims!r} do not "
                                    f"split the maps' {channels} channels")
        if not isinstance(self.projections_, list) or len(self.projections_) != len(widths):
            raise DamagedStateError("projections_ is not one projection per block")
        extra = 2 if self.position else 0
        scales = check_array_state("position_scale_", self.position_scale_,
                                   shape=(len(widths),), kinds="f")
        if (scales < 0).any():
            raise DamagedStateError("position_scale_ has negative scales")
        for b, (width, dim, projection) in enumerate(zip(widths, dims, self.projections_,
                                                         strict=True)):
            dim -= extra
            if dim < 1:
                raise DamagedStateError(f"dims_ {dims!r} leave no channels beside the "
                                        "coordinates")
            if projection is None:
                if dim != width:
                    raise DamagedStateError(f"block {b} is not projected but dims_ says {dim} "
                                            f"of {width} channels")
            else:
                check_array_state(f"projections_[{b}]", projection, shape=(dim, width),
                                  kinds="f")
        bank = check_array_state("bank_", self.bank_, shape=(None, sum(dims)), kinds="f")
        k = self.n_neighbors
        if not (isinstance(k, (int, np.integer)) and 1 <= k <= len(bank)):
            raise DamagedStateError(f"n_neighbors is {k!r} for a bank of {len(bank)} vectors")
        check_array_state("bank_image_", self.bank_image_, shape=(len(bank),), kinds="iu")
        check_array_state("centre_", self.centre_, shape=(len(dims),), kinds="f")
        spread = check_array_state("spread_", self.spread_, shape=(len(dims),), kinds="f")
        if (spread <= 0).any():
            raise DamagedStateError("spread_ has non-positive spreads")

    def for_representation(self, representation):
        """A clone whose ``block_channels`` are the representation's, in order."""
        from sklearn.base import clone

        return clone(self).set_params(block_channels=tuple(representation.channels))

    def explain_maps(self, x):
        """The location anomalies of one image's stacked maps ``x`` (:meth:`location_scores`),
        on their grid: their maximum is the score."""
        return self.location_scores(np.asarray(x, dtype=np.float32)).astype(np.float32)


def _smallest(tile: np.ndarray, k: int) -> np.ndarray:
    """``(rows, k)``: the columns of each row's ``k`` smallest entries of ``tile``, which is
    overwritten. Up to ``_ARGMIN_ROUNDS`` neighbours, ``k`` rounds of ``argmin`` that each
    set the found entry to infinity: one vectorised pass per neighbour, about 30 times
    cheaper than ``np.argpartition`` for 3 neighbours of a bank of 10,000."""
    if k > _ARGMIN_ROUNDS:
        return np.argpartition(tile, k - 1, axis=1)[:, :k]
    near = np.empty((len(tile), k), dtype=np.intp)
    rows = np.arange(len(tile))
    for j in range(k):
        near[:, j] = tile.argmin(axis=1)
        if j + 1 < k:
            tile[rows, near[:, j]] = np.inf
    return near


def _neighbourhood_mean(maps: np.ndarray, side: int) -> np.ndarray:
    """Each location of ``maps`` (..., h, w, c) replaced by the mean of its ``side`` x
    ``side`` neighbourhood (edges repeated), as PatchCore aggregates a patch's
    neighbourhood; ``side`` 1 returns ``maps``."""
    if side == 1:
        return maps
    from scipy.ndimage import uniform_filter

    size = (1,) * (maps.ndim - 3) + (side, side, 1)
    return uniform_filter(maps, size=size, mode="nearest")


def _coordinates(side: tuple[int, int]) -> np.ndarray:
    """``(h, w, 2)``: each location's row and column relative to the grid's centre, in
    units of half the grid's side (-1 to 1 from edge to edge): for a fundus photograph
    cropped square around the fundus, the place relative to the fundus centre."""
    h, w = side
    rows = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    cols = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)


def _greedy_coreset(locations: np.ndarray, size: int, random_state, update) -> np.ndarray:
    """Sorted rows of ``locations`` chosen by greedy k-centre (PatchCore's coreset): each
    next row is the one farthest from those already chosen, so rare locations are kept
    where a uniform draw drops them. The search runs among at most ``_CORESET_POOL`` rows
    drawn uniformly (or ``size``, when more are asked for), on at most ``_CORESET_DIMS``
    random Gaussian directions, starting from a row drawn with ``random_state``;
    ``update(chosen)`` reports progress."""
    rng = np.random.default_rng(random_state)
    pool = (np.arange(len(locations)) if len(locations) <= max(_CORESET_POOL, size)
            else np.sort(rng.choice(len(locations), max(_CORESET_POOL, size), replace=False)))
    if size >= len(pool):
        update(len(pool))
        return pool
    points = locations[pool]
    if points.shape[1] > _CORESET_DIMS:
        points = points @ (rng.normal(size=(points.shape[1], _CORESET_DIMS))
                           / np.sqrt(_CORESET_DIMS)).astype(np.float32)
    points = np.ascontiguousarray(points, dtype=np.float32)
    first = int(rng.integers(len(points)))
    from threadpoolctl import threadpool_limits

    # one matrix-vector product per step, memory-bound: a second BLAS thread only spins
    with threadpool_limits(1):
        chosen = _k_centre(points, size, first, update)
    return np.sort(pool[chosen])


def _k_centre(points: np.ndarray, size: int, first: int, update) -> np.ndarray:
    """Rows of ``points`` (float32, contiguous) chosen by greedy k-centre from ``first``,
    in the order chosen; ties go to the lowest row (``np.argmax``). Each step measures
    every row's squared distance to the new centre as ``|x|² - 2 x·c + |c|²`` in float32,
    in buffers allocated once."""
    norms = np.einsum("ij,ij->i", points, points)
    chosen = np.empty(size, dtype=np.int64)
    nearest = np.full(len(points), np.inf, dtype=np.float32)
    distance = np.empty(len(points), dtype=np.float32)
    place = first
    for i in range(size):
        if i:
            place = int(np.argmax(nearest))
        chosen[i] = place
        np.matmul(points, points[place], out=distance)
        distance *= -2
        distance += norms
        distance += norms[place]
        np.minimum(nearest, distance, out=nearest)
        nearest[place] = -np.inf  # never chosen twice
        if (i + 1) % 1000 == 0 or i + 1 == size:
            update(i + 1)
    return chosen


def _import_hnswlib():
    try:
        import hnswlib
    except ImportError as exc:
        from kad.errors import MissingDependencyError

        raise MissingDependencyError(
            'PatchKNNDetector(index="hnsw") needs hnswlib: pip install hnswlib') from exc
    return hnswlib
