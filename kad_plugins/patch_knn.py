"""Patch kNN: an image is as anomalous as its most unusual location.

Every other feature detector scores the spatial mean of a block's map, so a lesion a few
pixels wide, which changes a handful of the map's locations, barely moves its score. This
detector keeps the locations apart, as PatchCore does (Roth et al. 2022, "Towards total
recall in industrial anomaly detection"): it remembers the features of normal locations
and scores each location of a new image by its distance to the nearest of them.
"""

from __future__ import annotations

import numpy as np

from kad.detector import BaseDetector

_ROWS = 1024  # query locations per distance matrix


class PatchKNNDetector(BaseDetector):
    """Distance of each location to the nearest normal locations; the score is the largest.

    ``fit`` takes the unpooled block maps of normal images, ``(n, h, w, c)`` (kad's
    pipeline passes the maps of the chosen blocks, coarser ones upsampled to the finest:
    :func:`kad.pipeline.stack_maps`). It keeps a memory bank of at most ``bank_size``
    of their location vectors, drawn uniformly at random with ``random_state`` (PatchCore
    draws a greedy coreset instead; uniform draws keep fitting linear in the number of
    images). A location's anomaly is the mean Euclidean distance to its ``n_neighbors``
    nearest bank vectors, and an image's score is the maximum over its locations.

    Its heatmap is its own (:meth:`explain_maps`): the map of location anomalies above an
    ordinary location's, whose maximum is the score less that constant, so the map shows
    exactly where the score comes from.

    A training image's locations in the bank are not their own neighbours: its training
    score is measured against the bank without them, so that ``threshold_`` is set on
    scores comparable with new images'. Each image is scored on its own, so its score
    never depends on the images that come with it. The cost per image is one distance
    matrix of ``h·w`` by ``bank_size`` in ``c`` dimensions.
    """

    input_kind = "maps"
    quick_params = {"bank_size": 2000}

    def __init__(self, n_neighbors=1, bank_size=50000, random_state=0, contamination=0.1):
        self.n_neighbors = n_neighbors
        self.bank_size = bank_size
        self.random_state = random_state
        self.contamination = contamination

    def _fit(self, X, y):
        n, h, w, c = X.shape
        if not (isinstance(self.bank_size, (int, np.integer)) and self.bank_size >= 1):
            raise ValueError(f"bank_size must be a positive integer, got {self.bank_size!r}")
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

    def location_scores(self, maps: np.ndarray, exclude: np.ndarray | None = None,
                        ) -> np.ndarray:
        """``(h, w)`` anomaly of every location of one image's map ``(h, w, c)``: the mean
        distance to its ``n_neighbors`` nearest bank vectors, skipping the bank rows where
        ``exclude`` (a boolean mask over the bank) is true.

        Squared distances are ``|x|² - 2 x·b + |b|²``, one float32 matrix product per
        ``_ROWS`` locations (the nearest vectors found that way, their distances then
        recomputed exactly in float64, so that cancellation cannot blur small ones)."""
        h, w, c = maps.shape
        queries = np.ascontiguousarray(maps.reshape(-1, c), dtype=np.float32)
        bank = self.bank_
        half_norms = 0.5 * np.einsum("ij,ij->i", bank, bank)
        if exclude is not None:
            half_norms = np.where(exclude, np.inf, half_norms).astype(np.float32)
        k = int(self.n_neighbors)
        out = np.empty(len(queries))
        for start in range(0, len(queries), _ROWS):
            x = queries[start:start + _ROWS]
            # ranks bank vectors by |b|²/2 - x·b, which orders them as |x - b|² does
            key = half_norms[None, :] - x @ bank.T
            near = (key.argmin(axis=1)[:, None] if k == 1
                    else np.argpartition(key, k - 1, axis=1)[:, :k])
            diff = x[:, None, :].astype(np.float64) - bank[near]
            out[start:start + _ROWS] = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff)).mean(1)
        return out.reshape(h, w)

    def _score(self, X):
        return np.array([self.location_scores(x).max() for x in X])

    def _training_scores(self, X):
        maps = [self.location_scores(x, exclude=self.bank_image_ == i)
                for i, x in enumerate(X)]
        # what an ordinary location scores: the median over the training images' locations
        self.typical_location_ = float(np.median(np.concatenate([m.ravel() for m in maps])))
        return np.array([m.max() for m in maps])

    def explain_maps(self, maps):
        """How much each location of one image raises the score above an ordinary
        location's: :meth:`location_scores` on the grid of ``maps`` (the block maps,
        stacked as in fitting) minus ``typical_location_``, the median location score of
        the training images. The map's maximum is the score minus that constant; ordinary
        regions are near or below zero and are not drawn."""
        from kad.pipeline import stack_maps

        stacked = stack_maps([np.asarray(m)[None] for m in maps])[0]
        return (self.location_scores(stacked) - self.typical_location_).astype(np.float32)
