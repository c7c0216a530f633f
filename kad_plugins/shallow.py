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

from kad.detectors.base import BaseDetector, DamagedStateError, check_array_state

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

    def validate_fitted_state(self):
        """Each tree's nodes point inside the tree, to later nodes (no cycles), split on
        features the tree has at finite thresholds, and its path lengths cover its nodes;
        each tree's features lie among the forest's."""
        super().validate_fitted_state()
        forest, n = self.forest_, int(self.n_features_in_)
        if not isinstance(forest, IsolationForest):
            raise DamagedStateError(f"forest_ is a {type(forest).__name__}, not an "
                                    "IsolationForest")
        if forest.n_features_in_ != n:
            raise DamagedStateError(f"forest_ was fitted on {forest.n_features_in_} features, "
                                    f"the detector on {n}")
        trees, features = forest.estimators_, forest.estimators_features_
        lengths, averages = forest._decision_path_lengths, forest._average_path_length_per_tree
        if not (len(trees) >= 1 and len(features) == len(lengths) == len(averages)
                == len(trees)):
            raise DamagedStateError(f"forest_ has {len(trees)} trees but {len(features)} "
                                    f"feature sets and {len(lengths)}/{len(averages)} path "
                                    "length tables")
        samples = forest.max_samples_
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) \
                or samples < 1:
            raise DamagedStateError(f"forest_.max_samples_ is {samples!r}")
        for t, (tree, used) in enumerate(zip(trees, features, strict=True)):
            where = f"forest_ tree {t}"
            used = check_array_state(f"{where}'s features", used, ndim=1, kinds="iu")
            if len(used) < 1 or used.min() < 0 or used.max() >= n:
                raise DamagedStateError(f"{where} uses features outside [0, {n})")
            self._validate_tree(tree.tree_, len(used), where)
            if getattr(tree, "n_features_in_", None) != len(used):
                raise DamagedStateError(f"{where} was fitted on {tree.n_features_in_} "
                                        f"features, not {len(used)}")
            for label, table in (("path lengths", lengths[t]),
                                 ("average path lengths", averages[t])):
                check_array_state(f"{where}'s {label}", table, shape=(tree.tree_.node_count,),
                                  kinds="iuf")

    @staticmethod
    def _validate_tree(tree, n_features: int, where: str) -> None:
        count = tree.node_count
        if not 1 <= count <= tree.capacity or tree.n_features != n_features:
            raise DamagedStateError(f"{where} has {count} nodes (capacity {tree.capacity}) "
                                    f"and {tree.n_features} features, expected "
                                    f"{n_features}")
        left, right = tree.children_left, tree.children_right
        feature, threshold = tree.feature, tree.threshold
        nodes = np.arange(count)
        leaf = left == -1
        if not np.array_equal(leaf, right == -1):
            raise DamagedStateError(f"{where} has nodes with a single child")
        inner = ~leaf
        for side, children in (("left", left), ("right", right)):
            bad = inner & ((children <= nodes) | (children >= count))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DamagedStateError(f"{where}'s node {i} has its {side} child at "
                                        f"{int(children[i])}, outside ({i}, {count})")
        if inner.any():
            f = feature[inner]
            if f.min() < 0 or f.max() >= n_features:
                raise DamagedStateError(f"{where} splits on features outside "
                                        f"[0, {n_features})")
            if not np.isfinite(threshold[inner]).all():
                raise DamagedStateError(f"{where} has non-finite split thresholds")
        if (tree.n_node_samples < 1).any():
            raise DamagedStateError(f"{where} has nodes of no samples")


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

    def validate_fitted_state(self):
        """The scaler and the support vectors are of the detector's width; the dual
        coefficients and support indices agree with the number of support vectors; the
        kernel is one libsvm computes on dense inputs."""
        super().validate_fitted_state()
        n = int(self.n_features_in_)
        validate_scaler(self.scaler_, n, "scaler_")
        svm = self.svm_
        if not isinstance(svm, OneClassSVM):
            raise DamagedStateError(f"svm_ is a {type(svm).__name__}, not a OneClassSVM")
        if svm.kernel not in ("linear", "poly", "rbf", "sigmoid") or svm._sparse:
            raise DamagedStateError(f"svm_ has the kernel {svm.kernel!r} "
                                    f"(sparse: {svm._sparse!r})")
        sv = check_array_state("svm_.support_vectors_", svm.support_vectors_,
                               shape=(None, n), kinds="f")
        m = len(sv)
        if m < 1:
            raise DamagedStateError("svm_ has no support vectors")
        # libsvm reads its class counts only for classifiers; a one-class model has two
        check_array_state("svm_._n_support", svm._n_support, shape=(2,), kinds="iu")
        for name in ("dual_coef_", "_dual_coef_"):
            check_array_state(f"svm_.{name}", getattr(svm, name), shape=(1, m), kinds="f")
        for name in ("intercept_", "_intercept_"):
            check_array_state(f"svm_.{name}", getattr(svm, name), shape=(1,), kinds="f")
        support = check_array_state("svm_.support_", svm.support_, shape=(m,), kinds="iu")
        fitted = svm.shape_fit_
        if (not isinstance(fitted, tuple) or len(fitted) != 2 or fitted[1] != n
                or support.min() < 0 or support.max() >= fitted[0]):
            raise DamagedStateError(f"svm_ was fitted on shape {fitted!r} with support "
                                    "indices outside it")
        for name in ("_probA", "_probB"):
            check_array_state(f"svm_.{name}", getattr(svm, name), shape=(0,), kinds="f")
        gamma = svm._gamma
        if not (isinstance(gamma, (float, np.floating)) and np.isfinite(gamma) and gamma > 0):
            raise DamagedStateError(f"svm_._gamma is {gamma!r}, not a positive number")
        if not (isinstance(svm.degree, (int, np.integer)) and 0 <= svm.degree <= 100
                and np.isfinite(svm.coef0)):
            raise DamagedStateError(f"svm_ has degree {svm.degree!r}, coef0 {svm.coef0!r}")

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

    def validate_fitted_state(self):
        """The training matrix is finite, of the detector's width, with more rows than
        ``n_neighbors``; a tree index over it is the one its rows build."""
        super().validate_fitted_state()
        validate_neighbors(self.nn_, int(self.n_features_in_), "nn_")
        k, rows = self.n_neighbors, self.nn_.n_samples_fit_
        if not (isinstance(k, (int, np.integer)) and 1 <= k < rows):
            raise DamagedStateError(f"n_neighbors is {k!r} for {rows} training vectors")
        if self.method not in ("mean", "kth"):
            raise DamagedStateError(f"method is {self.method!r}")


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

    def validate_fitted_state(self):
        """The mean, covariance and precision are finite and of the detector's width."""
        super().validate_fitted_state()
        n = int(self.n_features_in_)
        gaussian = self.gaussian_
        if not isinstance(gaussian, LedoitWolf):
            raise DamagedStateError(f"gaussian_ is a {type(gaussian).__name__}, not a "
                                    "LedoitWolf")
        check_array_state("gaussian_.location_", gaussian.location_, shape=(n,), kinds="f")
        for name in ("covariance_", "precision_"):
            check_array_state(f"gaussian_.{name}", getattr(gaussian, name, None),
                              shape=(n, n), kinds="f")

    def _score_gradient(self, X):
        """``2 Σ⁻¹ (x - μ)``."""
        centred = X.astype(np.float64) - self.gaussian_.location_
        return 2.0 * centred @ self.gaussian_.precision_


def validate_scaler(scaler, n: int, name: str) -> None:
    """A fitted :class:`StandardScaler` of ``n`` features with finite, positive scales."""
    if not isinstance(scaler, StandardScaler) or scaler.n_features_in_ != n:
        raise DamagedStateError(f"{name} is not a scaler of {n} features")
    for attribute in ("mean_", "scale_", "var_"):
        value = getattr(scaler, attribute, None)
        if value is not None:
            check_array_state(f"{name}.{attribute}", value, shape=(n,), kinds="f")
    if scaler.scale_ is not None and (scaler.scale_ <= 0).any():
        raise DamagedStateError(f"{name}.scale_ has non-positive scales")


def validate_neighbors(nn, n: int, name: str) -> None:
    """A fitted :class:`NearestNeighbors` over a finite ``(rows, n)`` matrix whose tree
    index, if any, is the one those rows build (the tree's arrays are compared with a
    rebuilt one: compiled code follows its indices unchecked)."""
    if not isinstance(nn, NearestNeighbors):
        raise DamagedStateError(f"{name} is a {type(nn).__name__}, not a NearestNeighbors")
    train = check_array_state(f"{name}'s training matrix", nn._fit_X, shape=(None, n),
                              kinds="f")
    if nn.n_features_in_ != n or nn.n_samples_fit_ != len(train) or len(train) < 2:
        raise DamagedStateError(f"{name} holds {len(train)} training vectors of {n} features "
                                f"but records {nn.n_samples_fit_!r} of "
                                f"{nn.n_features_in_!r}")
    method = nn._fit_method
    if method not in ("brute", "kd_tree", "ball_tree"):
        raise DamagedStateError(f"{name} searches by {method!r}")
    if method == "brute":
        if getattr(nn, "_tree", None) is not None:
            raise DamagedStateError(f"{name} searches by brute force but holds a tree")
        return
    tree = nn._tree
    from sklearn.neighbors import BallTree, KDTree

    cls = KDTree if method == "kd_tree" else BallTree
    if type(tree) is not cls:
        raise DamagedStateError(f"{name} searches by {method} but holds a "
                                f"{type(tree).__name__}")
    rebuilt = cls(train, leaf_size=nn.leaf_size, metric=nn.effective_metric_,
                  **(nn.effective_metric_params_ or {}))
    # data, indices, nodes, bounds, leaf size, levels, nodes count (not the call counters)
    stored, expected = tree.__getstate__()[:7], rebuilt.__getstate__()[:7]
    same = all(
        np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype
        and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(stored, expected, strict=True))
    state = tree.__getstate__()
    if not same or state[12] is not None or type(state[11]) is not type(
            rebuilt.__getstate__()[11]):
        raise DamagedStateError(f"{name}'s {method} index does not match its training vectors")
