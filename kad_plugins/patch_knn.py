"""Patch kNN: an image is as anomalous as its most unusual location.

Every other feature detector scores the spatial mean of a block's map, so a lesion a few
pixels wide, which changes a handful of the map's locations, barely moves its score. This
detector keeps the locations apart, as PatchCore does (Roth et al. 2022, "Towards total
recall in industrial anomaly detection"): it remembers the features of normal locations
and scores each location of a new image by its distance to the nearest of them.
"""

from __future__ import annotations

import numpy as np

from kad.detectors.base import BaseDetector, DamagedStateError, check_array_state

_ROWS = 1024  # query locations per distance matrix


class PatchKNNDetector(BaseDetector):
    """Distance of each location to the nearest normal locations; the score is the largest.

    ``fit`` takes the unpooled block maps of normal images, ``(n, h, w, c)``: kad's
    pipeline passes the maps of its blocks stacked on the finest grid
    (:class:`kad.features.representation.BlockMaps`) and sets ``block_channels`` to each
    block's number of channels, in order (:meth:`for_representation`; None: all channels
    are one block). The detector keeps a memory
    bank of at most ``bank_size`` location vectors, drawn uniformly at random with
    ``random_state`` (PatchCore draws a greedy coreset instead; uniform draws keep fitting
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

    Its heatmap is its own (:meth:`explain_maps`): the location anomalies, whose maximum
    *is* the score; ordinary locations are near or below zero.

    A training image's locations in the bank are not their own neighbours: its training
    distances are measured against the bank without them, so that the standardisation and
    ``threshold_`` rest on distances comparable with new images'. Each image is scored on
    its own, so its score never depends on the images that come with it. The cost per
    image is one distance matrix of ``h·w`` by ``bank_size`` in ``c`` dimensions.

    The pass over the training images in ``fit`` and the scoring of images report, image
    by image, to the ``progress`` given to ``fit`` and ``anomaly_score``.
    """

    input_kind = "maps"
    quick_params = {"bank_size": 2000}
    #: ``verbose`` drew a bar; fitting reports to ``fit``'s ``progress`` instead
    retired_params = ("verbose",)

    def __init__(self, n_neighbors=1, bank_size=50000, block_channels=None, max_dims=128,
                 random_state=0, contamination=0.1):
        self.n_neighbors = n_neighbors
        self.bank_size = bank_size
        self.block_channels = block_channels
        self.max_dims = max_dims
        self.random_state = random_state
        self.contamination = contamination

    @staticmethod
    def _slices(widths) -> list[slice]:
        edges = np.cumsum([0, *widths])
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def _project(self, maps: np.ndarray) -> np.ndarray:
        """``maps`` (..., c) with each block of more than ``max_dims`` channels projected
        onto its ``max_dims`` random Gaussian directions (``projections_``)."""
        parts = []
        for channels, projection in zip(self._slices(self.input_widths_), self.projections_,
                                        strict=True):
            part = maps[..., channels]
            parts.append(part if projection is None else part @ projection.T)
        return np.concatenate(parts, axis=-1).astype(np.float32)

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
        # Wide blocks are projected onto max_dims random directions, which keeps distances
        # within a few percent (Johnson-Lindenstrauss) at a fraction of the cost and size.
        self.input_widths_ = tuple(widths)
        self.projections_ = [
            None if width <= self.max_dims else GaussianRandomProjection(
                int(self.max_dims),
                random_state=None if self.random_state is None else self.random_state + b,
            ).fit(np.zeros((1, width))).components_.astype(np.float32)
            for b, width in enumerate(widths)]
        self.dims_ = tuple(min(width, int(self.max_dims)) for width in widths)
        X = self._project(X)
        c = X.shape[-1]
        locations = X.reshape(-1, c)
        size = min(int(self.bank_size), len(locations))
        keep = np.sort(np.random.default_rng(self.random_state).choice(
            len(locations), size, replace=False))
        self.bank_ = np.ascontiguousarray(locations[keep], dtype=np.float32)
        self.bank_image_ = (keep // (h * w)).astype(np.int64)
        others = size - int(np.bincount(self.bank_image_).max())
        if n < 2 or not (isinstance(self.n_neighbors, (int, np.integer))
                         and 1 <= self.n_neighbors <= others):
            raise ValueError(
                f"PatchKNNDetector needs at least 2 training images and n_neighbors in "
                f"[1, {others}] (the bank vectors of the other images), got n_samples={n}, "
                f"n_neighbors={self.n_neighbors!r}")
        # every training image against the others' bank vectors, block by block: the
        # longest part of fitting, reported to fit's progress
        distances = np.empty((n, len(self.dims_), h, w))
        with self._task("patch kNN: training images against the bank", n) as update:
            for i in range(n):
                distances[i] = self._distances(X[i], exclude=self.bank_image_ == i)
                update(i + 1)
        per_block = distances.transpose(1, 0, 2, 3).reshape(distances.shape[1], -1)
        self.centre_ = np.median(per_block, axis=1)
        spread = np.median(np.abs(per_block - self.centre_[:, None]), axis=1)
        self.spread_ = np.where(spread > 0, spread, 1.0)
        self._training = distances

    def distances(self, maps: np.ndarray) -> np.ndarray:
        """``(blocks, h, w)``: for every block, each location's mean distance to its
        ``n_neighbors`` nearest bank locations, for one image's map ``(h, w, c)``."""
        return self._distances(self._project(maps))

    def _distances(self, maps: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """:meth:`distances` of a map already projected, skipping the bank rows where
        ``exclude`` (a boolean mask over the bank) is true.

        Squared distances are ``|x|² - 2 x·b + |b|²``, one float32 matrix product per
        ``_ROWS`` locations; the nearest vectors found that way have their distances
        recomputed exactly in float64, so that cancellation cannot blur small ones."""
        h, w, _ = maps.shape
        queries = np.ascontiguousarray(maps.reshape(h * w, -1), dtype=np.float32)
        k = int(self.n_neighbors)
        blocks = self._slices(self.dims_)
        out = np.empty((len(blocks), len(queries)))
        for b, channels in enumerate(blocks):
            bank = np.ascontiguousarray(self.bank_[:, channels])
            half_norms = 0.5 * np.einsum("ij,ij->i", bank, bank)
            if exclude is not None:
                half_norms = np.where(exclude, np.inf, half_norms).astype(np.float32)
            part = np.ascontiguousarray(queries[:, channels])
            for start in range(0, len(queries), _ROWS):
                x = part[start:start + _ROWS]
                # |b|²/2 - x·b orders the bank vectors as |x - b|² does
                key = half_norms[None, :] - x @ bank.T
                near = (key.argmin(axis=1)[:, None] if k == 1
                        else np.argpartition(key, k - 1, axis=1)[:, :k])
                diff = x[:, None, :].astype(np.float64) - bank[near]
                out[b, start:start + _ROWS] = np.sqrt(
                    np.einsum("ijk,ijk->ij", diff, diff)).mean(axis=1)
        return out.reshape(len(blocks), h, w)

    def _anomaly(self, distances: np.ndarray) -> np.ndarray:
        """Location anomalies ``(h, w)`` from per-block distances ``(blocks, h, w)``."""
        return ((distances - self.centre_[:, None, None])
                / self.spread_[:, None, None]).sum(axis=0)

    def location_scores(self, maps: np.ndarray) -> np.ndarray:
        """``(h, w)`` anomaly of every location of one image's map ``(h, w, c)``: its
        per-block distances, standardised and added (see the class docstring)."""
        return self._anomaly(self.distances(maps))

    def _score(self, X):
        scores = np.empty(len(X))
        with self._task("patch kNN: scoring images", len(X)) as update:
            for i, x in enumerate(X):
                scores[i] = self.location_scores(x).max()
                update(i + 1)
        return scores

    def _training_scores(self, X):  # noqa: ARG002 - the hook's signature; computed by _fit
        training, self._training = self._training, None  # computed by _fit, without
        return np.array([self._anomaly(d).max() for d in training])  # own-image matches

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
        for b, (width, dim, projection) in enumerate(zip(widths, dims, self.projections_,
                                                         strict=True)):
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
