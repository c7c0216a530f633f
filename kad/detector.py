"""The detector contract.

**Score direction, stated once for all of kad: a detector's ``anomaly_score`` is higher
for more anomalous inputs.** scikit-learn's ``score_samples`` runs the other way (lower is
more abnormal); the wrappers in ``kad_plugins`` flip its sign, and the contract tests check
that planted outliers receive the highest scores.

A detector follows scikit-learn's estimator rules: ``__init__`` only stores its keyword
arguments, what is learned ends in ``_``, ``fit`` returns the detector, and using it before
``fit`` raises :class:`NotFittedError`. Subclasses implement ``_fit`` and ``_score``; the
base class validates inputs and derives ``threshold_`` and ``labels_`` from
``contamination``, the expected share of anomalies in the training data.

Saving (:meth:`BaseDetector.save`, :func:`load_detector`) never pickles. A saved detector
is its registry name (the ``kad.detectors`` entry point), its ``get_params()`` and its
fitted state: :meth:`BaseDetector.get_fitted_state`, by default every attribute whose name
ends in ``_`` (and does not start with ``_``). Each value must be one a kad model file can
hold: None, bool, int, float, str, NumPy arrays and scalars (numeric or string dtypes),
scikit-learn objects made only of allowed types, Keras models, and tuples, lists and dicts
(string keys) of these. Attributes starting with ``_`` are caches and are not saved; they
must be rebuilt on first use. A third-party detector whose learned state is something else
(a network of another framework, say) overrides :meth:`~BaseDetector.get_fitted_state` to
return it as arrays and plain values and :meth:`~BaseDetector.set_fitted_state` to rebuild
it; a value that cannot be stored is refused by ``save``, naming the attribute and its type.
Loading takes the class from the registry by the recorded name, never from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from .errors import ArtifactError, PluginError, UnstorableError

if TYPE_CHECKING:
    from .artifact import Artifact, Encoder

InputKind = Literal["features", "images", "both"]

__all__ = ["BaseDetector", "NotFittedError", "load_detector", "InputKind"]


class BaseDetector(BaseEstimator):
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
    #: Small settings under which the detector fits in seconds; used by the contract tests
    #: and by quick runs, never as defaults.
    quick_params: ClassVar[dict] = {}
    #: Type names (as ``skops`` writes them, ``module.Class``) that this detector's
    #: scikit-learn state needs beyond kad's allow-list
    #: (:func:`kad.artifact.sklearn_trusted_types`); they are trusted when a file of this
    #: detector is loaded, the class being taken from the registry.
    trusted_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, contamination: float = 0.1):
        self.contamination = contamination

    # -- what subclasses implement -------------------------------------------------
    def _fit(self, X: np.ndarray, y: np.ndarray | None) -> None:
        raise NotImplementedError

    def _score(self, X: np.ndarray) -> np.ndarray:
        """Anomaly scores of ``X``, higher meaning more anomalous."""
        raise NotImplementedError

    def _score_gradient(self, X: np.ndarray) -> np.ndarray | None:
        """Gradient of the anomaly score with respect to each row of ``X`` (feature
        vectors), or None (the default) where the score is not a differentiable function of
        them; heatmaps then fall back to occlusion. See :meth:`score_gradient`."""
        return None

    def explain_maps(self, maps: list[np.ndarray]) -> np.ndarray | None:
        """A detector's own heatmap of one image, or None (the default) to let
        :mod:`kad.heatmaps` make it (gradient attribution where :meth:`score_gradient`
        exists, occlusion otherwise).

        ``maps`` are the unpooled block maps ``(h, w, c)`` of the image, in the order whose
        spatial means, concatenated, are the feature vector the detector scores. Return a
        ``(h', w')`` array of how much each region raises the score (any resolution; it is
        resized to the image).
        """
        return None

    def _training_scores(self, X: np.ndarray) -> np.ndarray:
        """Scores of the training data, from which ``threshold_`` is set. Override where a
        training point must not count as its own evidence (nearest neighbours)."""
        return self._score(X)

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
        if X.ndim == 2:
            # The typical normal feature vector: heatmaps explain a score against it.
            self.reference_ = X.mean(axis=0, dtype=np.float64)
        self._fit(X, y)
        scores = np.asarray(self._training_scores(X), dtype=np.float64)
        self.decision_scores_ = scores
        self.threshold_ = float(np.quantile(scores, 1.0 - self.contamination))
        self.labels_ = (scores > self.threshold_).astype(int)
        return self

    def anomaly_score(self, X) -> np.ndarray:
        """One score per input; **higher means more anomalous**."""
        check_is_fitted(self, "threshold_")
        X = self._validate(X, reset=False)
        return np.asarray(self._score(X), dtype=np.float64)

    def score_gradient(self, X) -> np.ndarray | None:
        """``(n, d)`` gradient of :meth:`anomaly_score` with respect to each feature vector
        (float64), or None where the detector's score is not differentiable in its features
        (Isolation Forest) or the detector does not say how; :mod:`kad.heatmaps` uses it to
        attribute a score to image regions."""
        check_is_fitted(self, "threshold_")
        X = self._validate(X, reset=False)
        if X.ndim != 2:
            return None
        gradient = self._score_gradient(X)
        return None if gradient is None else np.asarray(gradient, dtype=np.float64)

    def predict(self, X) -> np.ndarray:
        """1 for inputs scored above ``threshold_`` (anomalies), 0 otherwise."""
        return (self.anomaly_score(X) > self.threshold_).astype(int)

    def get_fitted_state(self) -> dict[str, Any]:
        """What ``fit`` learned, as :meth:`save` stores it: by default every attribute whose
        name ends in ``_`` and does not start with ``_``. Override (with
        :meth:`set_fitted_state`) to store something else; see the module docstring."""
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def set_fitted_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_fitted_state` returned, on a detector built with the
        saved parameters; by default each item becomes an attribute, and only names of
        learned attributes (ending in ``_``, not starting with ``_``) are accepted."""
        for name in state:
            if not (name.isidentifier() and name.endswith("_") and not name.startswith("_")):
                raise ValueError(f"{name!r} is not the name of a learned attribute (those end "
                                 "in '_' and do not start with '_')")
        for name, value in state.items():
            setattr(self, name, value)

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one file; :func:`load_detector` reads it back.

        Raises :class:`~kad.errors.UnstorableError` (a :class:`TypeError`) naming the
        attribute when part of the fitted state cannot be stored without pickle, and
        :class:`~kad.errors.PluginError` when the class is not registered under
        ``kad.detectors`` (loading needs its registry name)."""
        from .artifact import Encoder, write_artifact

        check_is_fitted(self, "threshold_")
        encoder = Encoder(trusted=tuple(type(self).trusted_types))
        tree = {"detector": encode_detector(self, encoder, "detector")}
        return write_artifact(path, "detector", tree, encoder.members)

    # -- helpers ---------------------------------------------------------------------
    def _check_contamination(self) -> None:
        c = self.contamination
        if not (isinstance(c, (int, float)) and 0.0 < c < 0.5):
            raise ValueError(
                f"contamination must be a number in (0, 0.5), got {c!r}; it is the expected "
                "share of anomalies in the training data"
            )

    def _validate(self, X, reset: bool) -> np.ndarray:
        X = np.asarray(X)
        if X.dtype == object or not np.issubdtype(X.dtype, np.number):
            raise ValueError(f"{type(self).__name__} needs numeric input, got dtype {X.dtype}")
        kind = self.input_kind
        if X.ndim == 2 and kind == "images":
            raise ValueError(
                f"{type(self).__name__} works on images (n, height, width, 3), "
                f"got feature vectors of shape {X.shape}"
            )
        if X.ndim == 4 and kind == "features":
            # Flattened pixels: the paper's raw-pixel baselines.
            X = X.reshape(len(X), -1)
        if X.ndim not in (2, 4):
            raise ValueError(
                f"{type(self).__name__} expects a 2-D array of feature vectors or a 4-D "
                f"array of images, got shape {X.shape}"
            )
        if len(X) == 0:
            raise ValueError(f"{type(self).__name__} got an empty input of shape {X.shape}")
        X = X.astype(np.float32, copy=False)
        if not np.isfinite(X).all():
            raise ValueError(f"{type(self).__name__} got NaN or infinite values in its input")
        if reset:
            self.n_features_in_ = int(np.prod(X.shape[1:]))
            self.input_shape_ = tuple(X.shape[1:])
        else:
            check_is_fitted(self, "n_features_in_")
            if tuple(X.shape[1:]) != self.input_shape_:
                raise ValueError(
                    f"{type(self).__name__} was fitted on inputs of shape {self.input_shape_}, "
                    f"got {tuple(X.shape[1:])}"
                )
        return X


def encode_detector(detector: BaseDetector, encoder: Encoder, where: str) -> dict:
    """The ``object.json`` record of a fitted detector: registry name, entry point, the
    distribution that provides it, parameters and fitted state."""
    from .registry import registered_as

    info = registered_as(type(detector))
    params = encoder.encode(detector.get_params(deep=False), f"{where}.params", plain=True)
    state = detector.get_fitted_state()
    if not isinstance(state, dict):
        raise UnstorableError(f"{type(detector).__name__}.get_fitted_state() returned a "
                              f"{type(state).__name__}; it must return a dict")
    return {
        "name": info.name, "entry_point": info.value,
        "distribution": info.distribution, "version": info.version,
        "params": params, "state": encoder.encode(state, f"{where}.state"),
    }


def decode_detector(artifact: Artifact, record: Any, where: str) -> BaseDetector:
    """The detector of an :func:`encode_detector` record, its class taken from the registry
    by the recorded name; the plugin must be the one it was saved with."""
    from .registry import DETECTORS, discover, load

    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise artifact.fail(f"{where} is not a detector record")
    name = record["name"]
    info = discover(DETECTORS).get(name)
    if info is None:
        raise artifact.fail(
            f"the detector plugin {name!r} ({record.get('distribution')} "
            f"{record.get('version')}) is not installed here; install it to load this file")
    saved = (record.get("entry_point"), record.get("distribution"), record.get("version"))
    if saved != (info.value, info.distribution, info.version):
        raise artifact.fail(
            f"the detector {name!r} was saved from {saved[0]} ({saved[1]} {saved[2]}), but "
            f"here it is {info.value} ({info.distribution} {info.version}); scores could "
            f"differ, so it is refused: install {saved[1]}=={saved[2]} or refit")
    try:
        cls = load(DETECTORS, name)
    except PluginError as exc:
        raise artifact.fail(str(exc)) from exc
    params = artifact.decode(record.get("params"), f"{where}.params", plain=True)
    state = artifact.decode(record.get("state"), f"{where}.state", trusted=cls.trusted_types)
    if not isinstance(params, dict) or not isinstance(state, dict):
        raise artifact.fail(f"{where} has malformed parameters or state")
    try:
        detector = cls(**params)
        detector.set_fitted_state(state)
    except Exception as exc:  # the plugin's own code: whatever it raises, name the file
        raise artifact.fail(f"the detector {name!r} could not be rebuilt from the file "
                            f"({type(exc).__name__}: {exc})") from exc
    return detector


def load_detector(path: str | Path) -> BaseDetector:
    """Read a detector written by :meth:`BaseDetector.save`; nothing in the file can run
    code (see :mod:`kad.artifact`)."""
    from .artifact import open_artifact

    artifact = open_artifact(path, kind="detector")
    if not isinstance(artifact.tree, dict) or "detector" not in artifact.tree:
        raise ArtifactError(f"{path} is corrupt: it holds no detector")
    detector = decode_detector(artifact, artifact.tree["detector"], "detector")
    if not hasattr(detector, "threshold_"):
        raise ArtifactError(f"{path} is corrupt: its detector has no fitted threshold_")
    return detector
