"""A minimal third-party detector: the largest absolute z-score of a feature vector.

Its learned attributes (``mean_``, ``scale_``: NumPy arrays) are saved by ``save`` as they
are; a detector that learns other kinds of values overrides ``get_fitted_state`` and
``set_fitted_state`` (see ``kad.detectors.base``)."""

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
