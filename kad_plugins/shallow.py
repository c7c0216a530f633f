"""Detectors that work on feature vectors without deep training.

All of them also accept images (flattened to pixels), which gives the paper's raw-pixel
baselines. Scores follow kad's convention: higher is more anomalous.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from kad.detectors.base import BaseDetector

_ROWS = 64  # rows per matrix product in MahalanobisDetector._score


class IsolationForestDetector(BaseDetector):
    """Isolation Forest (Liu et al. 2008), scikit-learn defaults: the paper's method.

    Parameters other than ``contamination`` and ``random_state`` are scikit-learn's
    defaults (100 trees, ``max_samples="auto"``, all features per tree), as in the paper.
    The score is the negated ``score_samples``, so that higher is more anomalous.
    """

    input_kind = "features"
    quick_params = {"n_estimators": 20}

    def __init__(self, n_estimators=100, max_samples="auto", max_features=1.0,
                 random_state=0, n_jobs=None, contamination=0.1):
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_features = max_features
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        self.forest_ = IsolationForest(
            n_estimators=self.n_estimators, max_samples=self.max_samples,
            max_features=self.max_features, random_state=self.random_state,
            n_jobs=self.n_jobs,
        ).fit(X)

    def _score(self, X):
        return -self.forest_.score_samples(X)


class OneClassSVMDetector(BaseDetector):
    """One-class SVM (Schölkopf et al. 1999) on standardised features, RBF kernel.

    ``gamma="scale"`` (1 / (n_features · variance), which is 1 / n_features after
    standardising) and ``nu=0.1`` by default. The score is the negated decision function.
    """

    input_kind = "features"

    def __init__(self, kernel="rbf", gamma="scale", nu=0.1, contamination=0.1):
        self.kernel = kernel
        self.gamma = gamma
        self.nu = nu
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        self.scaler_ = StandardScaler().fit(X)
        z = self.scaler_.transform(X)
        self.gamma_ = self._resolve_gamma(z)
        # the resolved value, so that the SVM and the gradient use the same one
        self.svm_ = OneClassSVM(kernel=self.kernel, gamma=self.gamma_, nu=self.nu).fit(z)

    def _resolve_gamma(self, z) -> float:
        """The value ``gamma`` stands for on the standardised training data ``z``, as
        scikit-learn resolves it: ``"scale"`` is 1 / (n_features · variance) (1 where the
        variance is 0), ``"auto"`` 1 / n_features."""
        if self.gamma == "scale":
            variance = np.asarray(z, dtype=np.float64).var()
            return 1.0 / (z.shape[1] * variance) if variance != 0 else 1.0
        if self.gamma == "auto":
            return 1.0 / z.shape[1]
        return float(self.gamma)

    def _score(self, X):
        return -self.svm_.decision_function(self.scaler_.transform(X))

    def _score_gradient(self, X):
        """``-∇ Σᵢ αᵢ k(z, svᵢ)`` with ``z`` the standardised ``x``: for the RBF kernel
        ``2γ Σᵢ αᵢ k(z, svᵢ) (z - svᵢ) / σ``; for the linear one ``-Σᵢ αᵢ svᵢ / σ``. Other
        kernels: None (occlusion)."""
        z = self.scaler_.transform(X).astype(np.float64)
        sv = self.svm_.support_vectors_.astype(np.float64)
        alpha = self.svm_.dual_coef_.ravel().astype(np.float64)
        scale = np.asarray(self.scaler_.scale_, dtype=np.float64)
        if self.svm_.kernel == "linear":
            return np.broadcast_to(-(alpha @ sv) / scale, z.shape).copy()
        if self.svm_.kernel != "rbf":
            return None
        gamma = float(self.gamma_)
        sq = (z * z).sum(1)[:, None] - 2.0 * z @ sv.T + (sv * sv).sum(1)[None, :]
        weights = alpha[None, :] * np.exp(-gamma * np.maximum(sq, 0.0))  # (n, n_sv)
        grad_z = 2.0 * gamma * (weights.sum(1)[:, None] * z - weights @ sv)
        return grad_z / scale


class KNNDetector(BaseDetector):
    """Distance to the nearest normal training features (Bergman et al. 2020, DN2).

    ``method="mean"`` averages the distances to the ``n_neighbors`` nearest training
    vectors, ``"kth"`` takes the distance to the k-th. At fit time a training vector is not
    its own neighbour, so training scores are comparable with test scores.
    """

    input_kind = "features"
    RERANK = 16  # extra candidates whose distances are recomputed exactly

    def __init__(self, n_neighbors=2, method="mean", metric="euclidean", contamination=0.1):
        self.n_neighbors = n_neighbors
        self.method = method
        self.metric = metric
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        if self.method not in ("mean", "kth"):
            raise ValueError(f"method must be 'mean' or 'kth', got {self.method!r}")
        if len(X) < 2:
            raise ValueError(
                f"KNNDetector needs at least 2 training vectors (a vector is not its own "
                f"neighbour), got n_samples={len(X)}"
            )
        if not (isinstance(self.n_neighbors, int) and 1 <= self.n_neighbors < len(X)):
            raise ValueError(
                f"n_neighbors must be an integer in [1, {len(X) - 1}] for {len(X)} training "
                f"vectors, got {self.n_neighbors!r}"
            )
        # kad keeps the training vectors itself (the index shares the array): the exact
        # distances and the gradient read them
        self.train_ = X
        self.nn_ = NearestNeighbors(n_neighbors=self.n_neighbors, metric=self.metric).fit(X)

    def _reduce(self, dist):
        return dist.mean(axis=1) if self.method == "mean" else dist[:, -1]

    def _distances(self, X, n: int) -> np.ndarray:
        """Distances to the ``n`` nearest training vectors, sorted, the same for a row
        whatever else is in ``X``. scikit-learn's brute-force Euclidean search goes through
        matrix products whose rounding depends on how many rows come together; it only
        proposes ``n + RERANK`` candidates here, and their distances are recomputed row by
        row."""
        if self.metric not in ("euclidean", "l2"):
            return self.nn_.kneighbors(X, n_neighbors=n)[0]
        train = self.train_
        m = min(len(train), n + self.RERANK)
        index = self.nn_.kneighbors(X, n_neighbors=m, return_distance=False)
        out = np.empty((len(X), n))
        for start in range(0, len(X), 64):
            rows = slice(start, start + 64)
            diff = X[rows, None, :].astype(np.float64) - train[index[rows]]
            out[rows] = np.sort(np.sqrt(np.einsum("ijk,ijk->ij", diff, diff)), axis=1)[:, :n]
        return out

    def _score(self, X):
        return self._reduce(self._distances(X, self.n_neighbors))

    def _score_gradient(self, X):
        """For the Euclidean metric, the mean (``"mean"``) of the unit vectors from the
        ``n_neighbors`` nearest training vectors to ``x``, or the one from the k-th
        (``"kth"``); the score is differentiable wherever the neighbours do not change.
        Other metrics: None (occlusion)."""
        if self.metric not in ("euclidean", "l2"):
            return None
        X = X.astype(np.float64)
        dist, idx = self.nn_.kneighbors(X)
        train = self.train_
        if self.method == "kth":
            dist, idx = dist[:, -1:], idx[:, -1:]
        diff = X[:, None, :] - train[idx].astype(np.float64)  # (n, k, d)
        unit = diff / np.maximum(dist, 1e-12)[:, :, None]
        return unit.mean(axis=1)

    def _training_scores(self, X):
        # Each training vector is its own nearest neighbour: skip that match.
        return self._reduce(self._distances(X, self.n_neighbors + 1)[:, 1:])


class MahalanobisDetector(BaseDetector):
    """Mahalanobis distance to a Gaussian fitted to normal features (Rippel et al. 2020).

    The covariance is Ledoit-Wolf shrunk, which keeps it invertible when there are more
    feature dimensions than training images. The score is the squared distance
    ``(x - μ)ᵀ Σ⁻¹ (x - μ)``, the value of scikit-learn's ``mahalanobis``, computed with one
    matrix product instead of its pairwise-distance path, which is far slower in
    thousands of dimensions.
    """

    input_kind = "features"

    def __init__(self, contamination=0.1):
        self.contamination = contamination

    def _fit(self, X, y):  # noqa: ARG002 - y: BaseDetector's hook; unsupervised
        self.gaussian_ = LedoitWolf().fit(X.astype(np.float64))

    def _score(self, X):
        # The product runs on blocks of a fixed number of rows (the last one padded with
        # zeros): BLAS sums in an order that depends on the matrix shapes, so an image's
        # score would otherwise change in its last bits with the images scored beside it.
        centred = X.astype(np.float64) - self.gaussian_.location_
        scores = np.empty(len(centred))
        block = np.zeros((_ROWS, centred.shape[1]))
        for start in range(0, len(centred), _ROWS):
            part = centred[start:start + _ROWS]
            block[:len(part)] = part
            block[len(part):] = 0.0
            product = (block @ self.gaussian_.precision_)[:len(part)]
            scores[start:start + len(part)] = np.einsum("ij,ij->i", product, part)
        return scores

    def _score_gradient(self, X):
        """``2 Σ⁻¹ (x - μ)``."""
        centred = X.astype(np.float64) - self.gaussian_.location_
        return 2.0 * centred @ self.gaussian_.precision_
