"""Two minimal third-party detectors: the largest absolute z-score of a feature vector
(``zscore``, a detector of pooled features), and of a location of the block maps (``zmap``,
a detector of block maps).

Their learned attributes (``mean_``, ``scale_``: NumPy arrays) are saved by ``save`` as they
are; a detector that learns other kinds of values overrides ``get_fitted_state`` and
``set_fitted_state`` (see ``kad.detectors.base``).

A saved file records the detector's ``state_version`` (1, inherited): it loads with any
later release of this package or of kad as long as the class keeps that state version.
A release that changes what ``fit`` learns raises it, and may convert older files in
``upgrade_fitted_state``."""

import numpy as np

from kad import BaseDetector


class MaxZScoreDetector(BaseDetector):
    """Largest absolute z-score over the features (a third-party example plugin)."""

    input_kind = "features"

    def __init__(self, contamination=0.1):
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        self.mean_ = X.mean(axis=0)
        self.scale_ = X.std(axis=0) + 1e-6

    def _score(self, X):
        return np.abs((X - self.mean_) / self.scale_).max(axis=1)


class LocationZScoreDetector(BaseDetector):
    """A third-party detector of block maps: each location's largest absolute z-score,
    block by block against the training images' locations; the image's score is the
    largest location's.

    ``input_kind = "maps"`` asks a fitted pipeline for the blocks' maps stacked on the
    finest grid, ``(n, h, w, channels)`` (:class:`kad.BlockMaps`). The pipeline declares
    where each block's channels lie through :meth:`for_representation`; this detector keeps
    them as its ``block_channels`` parameter, so that a saved model holds them. Its
    heatmap (:meth:`explain_maps`) is the location scores, whose maximum is the score."""

    input_kind = "maps"

    def __init__(self, block_channels=None, contamination=0.1):
        self.block_channels = block_channels
        self.contamination = contamination

    def for_representation(self, representation):
        from sklearn.base import clone

        return clone(self).set_params(block_channels=tuple(representation.channels))

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        locations = X.reshape(-1, X.shape[-1])
        self.mean_ = locations.mean(axis=0)
        self.scale_ = locations.std(axis=0) + 1e-6

    def _locations(self, X):
        z = np.abs((X - self.mean_) / self.scale_)
        widths = self.block_channels or (X.shape[-1],)
        edges = np.cumsum([0, *widths])
        # each block's largest z-score, then the blocks added: no block drowns the others
        return sum(z[..., a:b].max(axis=-1) for a, b in zip(edges[:-1], edges[1:], strict=True))

    def _score(self, X):
        return self._locations(X).max(axis=(1, 2))

    def explain_maps(self, x):
        return self._locations(np.asarray(x)[None])[0]
