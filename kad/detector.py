"""The detector contract: scikit-learn's outlier-detector contract, checked by scikit-learn.

**Score direction, stated once for all of kad: a detector's ``anomaly_score`` is higher
for more anomalous inputs.** The fitted detector keeps the anomaly scores of its training
data in ``anomaly_scores_`` and flags inputs scored above ``threshold_``, the
``1 - contamination`` quantile of ``anomaly_scores_`` (``contamination`` is the expected
share of anomalies in the training data).

A detector is a scikit-learn outlier detector (``OutlierMixin``, estimator type
``"outlier_detector"``), with scikit-learn's conventions for the methods scikit-learn
defines:

* ``predict`` and ``fit_predict``: ``-1`` for anomalies, ``+1`` for normal inputs;
* ``score_samples``: ``-anomaly_score``, lower is more abnormal;
* ``decision_function``: ``threshold_ - anomaly_score``, negative for anomalies;
  ``offset_`` is ``-threshold_``, so ``decision_function = score_samples - offset_``.

``__init__`` only stores its keyword arguments, what is learned ends in ``_``, ``fit``
returns the detector, and using it before ``fit`` raises :class:`NotFittedError`. Inputs
are validated with scikit-learn's ``check_array``/``validate_data`` (sparse, complex, NaN
and infinite inputs are refused; ``n_features_in_`` and ``feature_names_in_`` are
recorded). Subclasses implement ``_fit`` and ``_score``. ``tests/test_sklearn_checks.py``
runs scikit-learn's estimator checks on every registered detector and lists each deviation
with its reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from .errors import KadError

InputKind = Literal["features", "images", "both"]

__all__ = ["BaseDetector", "NotFittedError", "load_detector", "InputKind"]


class BaseDetector(OutlierMixin, BaseEstimator):
    """Base class of every kad detector.

    Class attributes a plugin sets:

    ``input_kind``
        ``"features"`` (2-D arrays of feature vectors), ``"images"`` (4-D arrays
        ``(n, height, width, 3)`` with values in [0, 1]) or ``"both"``.
    """

    input_kind: ClassVar[InputKind] = "features"
    #: True for detectors that need labelled anomalies in ``fit(X, y)`` (the supervised
    #: upper bound); recipes mark their results as such.
    supervised: ClassVar[bool] = False
    #: Small settings under which the detector fits in seconds on the tests' small inputs;
    #: the contract tests use them. Never defaults.
    quick_params: ClassVar[dict] = {}

    def __init__(self, contamination: float = 0.1):
        self.contamination = contamination

    # -- what subclasses implement -------------------------------------------------
    def _fit(self, X: np.ndarray, y: np.ndarray | None) -> None:
        raise NotImplementedError

    def _score(self, X: np.ndarray) -> np.ndarray:
        """Anomaly scores of ``X``, higher meaning more anomalous."""
        raise NotImplementedError

    def _training_scores(self, X: np.ndarray) -> np.ndarray:
        """Anomaly scores of the training data, from which ``threshold_`` is set. Override
        where a training point must not count as its own evidence (nearest neighbours)."""
        return self._score(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # scikit-learn's checks feed 2-D arrays; image-only detectors cannot take them.
        tags.input_tags.two_d_array = self.input_kind != "images"
        tags.target_tags.required = bool(self.supervised)
        return tags

    # -- the public contract ---------------------------------------------------------
    def fit(self, X, y=None) -> BaseDetector:
        """Fit on ``X`` (mostly normal data). ``y`` is ignored by unsupervised detectors."""
        self._check_contamination()
        if self.supervised and y is None:
            raise ValueError(
                f"{type(self).__name__} is supervised: fit(X, y) needs labels y "
                "(1 = anomaly, 0 = normal)"
            )
        X = self._validate(X, reset=True)
        self._fit(X, y)
        scores = np.asarray(self._training_scores(X), dtype=np.float64)
        self.anomaly_scores_ = scores
        self.threshold_ = float(np.quantile(scores, 1.0 - self.contamination))
        return self

    def anomaly_score(self, X) -> np.ndarray:
        """One score per input; **higher means more anomalous**."""
        check_is_fitted(self, "threshold_")
        X = self._validate(X, reset=False)
        return np.asarray(self._score(X), dtype=np.float64)

    def predict(self, X) -> np.ndarray:
        """scikit-learn's labels: -1 for inputs scored above ``threshold_`` (anomalies),
        +1 for the others."""
        return np.where(self.anomaly_score(X) > self.threshold_, -1, 1)

    def fit_predict(self, X, y=None) -> np.ndarray:
        """``fit(X, y).predict(X)``: -1 for anomalies, +1 for the others. ``y`` is passed
        on to ``fit`` (supervised detectors need it)."""
        return self.fit(X, y).predict(X)

    def score_samples(self, X) -> np.ndarray:
        """scikit-learn's direction: ``-anomaly_score(X)``, lower is more abnormal."""
        return -self.anomaly_score(X)

    def decision_function(self, X) -> np.ndarray:
        """``threshold_ - anomaly_score(X)``: negative for anomalies, as in scikit-learn."""
        scores = self.anomaly_score(X)  # first: it refuses an unfitted detector
        return self.threshold_ - scores

    @property
    def offset_(self) -> float:
        """scikit-learn's name for ``-threshold_``:
        ``decision_function(X) == score_samples(X) - offset_``."""
        check_is_fitted(self, "threshold_")
        return -self.threshold_

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one file; :func:`load_detector` reads it back."""
        from .artifact import save_artifact

        check_is_fitted(self, "threshold_")
        return save_artifact(self, path, kind="detector")

    # -- helpers ---------------------------------------------------------------------
    def _check_contamination(self) -> None:
        c = self.contamination
        if not (isinstance(c, (int, float)) and 0.0 < c < 0.5):
            raise ValueError(
                f"contamination must be a number in (0, 0.5), got {c!r}; it is the expected "
                "share of anomalies in the training data"
            )

    def _validate(self, X, reset: bool) -> np.ndarray:
        """``X`` as a float32 array: 2-D feature vectors, or 4-D images for detectors that
        take them (flattened to pixels for feature detectors: the paper's raw-pixel
        baselines). Records ``n_features_in_`` and ``input_shape_`` when ``reset`` and
        checks new inputs against them otherwise."""
        name = type(self).__name__
        ndim = X.ndim if hasattr(X, "ndim") else np.asarray(X).ndim
        images = ndim == 4
        if images:
            X = check_array(X, dtype=np.float32, allow_nd=True, estimator=self,
                            input_name="X")
            if self.input_kind == "features":
                X, images = X.reshape(len(X), -1), False
        elif self.input_kind == "images":
            raise ValueError(
                f"{name} works on images (n, height, width, 3), got an input of shape "
                f"{np.shape(X)}; pass images, not feature vectors"
            )
        elif ndim == 3:
            raise ValueError(
                f"{name} expects a 2-D array of feature vectors or a 4-D array of images "
                f"(n, height, width, 3), got shape {np.shape(X)}; a single image needs a "
                "leading batch axis"
            )
        if not images:
            X = validate_data(self, X, reset=reset, dtype=np.float32)
        elif reset:
            self.n_features_in_ = int(np.prod(X.shape[1:]))
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        if reset:
            self.input_shape_ = tuple(X.shape[1:])
        elif tuple(X.shape[1:]) != self.input_shape_:
            raise ValueError(
                f"X has {int(np.prod(X.shape[1:]))} features, but {name} is expecting "
                f"{self.n_features_in_} features as input: it was fitted on inputs of shape "
                f"{self.input_shape_} and got inputs of shape {tuple(X.shape[1:])}"
            )
        return X


def load_detector(path: str | Path) -> BaseDetector:
    """Read a detector written by :meth:`BaseDetector.save`."""
    from .artifact import load_artifact

    obj = load_artifact(path, kind="detector")
    if not isinstance(obj, BaseDetector):
        raise KadError(f"{path} holds a {type(obj).__name__}, not a kad detector")
    return obj
