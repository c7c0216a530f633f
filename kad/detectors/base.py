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

Progress: long work reports to a :class:`kad.utils.progress.Progress` passed as a keyword
to the call it belongs to, ``fit(X, y=None, *, progress=None)`` and
``anomaly_score(X, *, progress=None)``, never through ``__init__`` (parameters stay plain
values, for ``clone`` and for saving). For the length of that call it is reachable as
``self._progress`` (a cache attribute, never saved, gone afterwards); a subclass reports
with ``with self._task("<name>", total) as update: ... update(done)``, which does nothing
without a progress. A detector never prints or draws.

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

A saved state records :attr:`BaseDetector.state_version` (1 unless the class says
otherwise). A file loads in any kad, and with any version of the plugin, whose detector
reads that state version; the kad and plugin versions that wrote it are recorded, not
compared. A detector whose learned state changes raises its ``state_version``, and may
convert files of the older one in :meth:`BaseDetector.upgrade_fitted_state`; any other
file is refused in one line naming the versions and what to do.

A loaded state is checked before its first use: :func:`load_detector` and
:func:`kad.screening.pipeline.load_pipeline` call :meth:`~BaseDetector.validate_fitted_state`
right after :meth:`~BaseDetector.set_fitted_state`. A file made only of allowed types can
still hold values no fit produces (a tree whose child indices point outside it, a training
matrix of the wrong width), which compiled code would read out of bounds. The default checks
what every detector has (``threshold_`` finite, ``n_features_in_`` and ``input_shape_``
consistent, ``anomaly_scores_`` and every floating-point array of the state finite); a
detector extends it (calling ``super()``) with what its own state must satisfy, and raises
:class:`DamagedStateError` (a :class:`ValueError`) saying what is wrong, with the values. A
third-party detector gets the same call: whatever it raises refuses the file in one line,
``PATH is damaged: <what>; refit the model``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from kad.errors import ArtifactError, PluginError, UnstorableError

if TYPE_CHECKING:
    from kad.utils.artifact import Artifact, Encoder
    from kad.utils.progress import Progress

InputKind = Literal["features", "images", "both", "maps"]

__all__ = ["BaseDetector", "DamagedStateError", "NotFittedError", "load_detector",
           "InputKind"]

_ABSENT = object()


class DamagedStateError(ValueError):
    """A loaded detector's state is not one its fit could have produced; raised by
    :meth:`BaseDetector.validate_fitted_state`, saying what is wrong with the values."""


def check_array_state(name: str, value: Any, *, ndim: int | None = None,
                      shape: tuple | None = None, finite: bool = True,
                      kinds: str = "biuf") -> np.ndarray:
    """``value`` as an array, after checking that it is a NumPy array of one of ``kinds``
    (bool, signed and unsigned ints, floats), of ``ndim`` dimensions and of ``shape``
    (None in it: any length), with finite values; raises :class:`DamagedStateError`
    naming ``name``. A helper for :meth:`BaseDetector.validate_fitted_state`."""
    if not isinstance(value, np.ndarray):
        raise DamagedStateError(f"{name} is a {type(value).__name__}, not an array")
    if value.dtype.kind not in kinds:
        raise DamagedStateError(f"{name} is an array of {value.dtype}, not of numbers")
    if ndim is not None and value.ndim != ndim:
        raise DamagedStateError(f"{name} has {value.ndim} dimensions, not {ndim} "
                                f"(shape {value.shape})")
    if shape is not None and (value.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(value.shape, shape,
                                                                   strict=True))):
        expected = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
        raise DamagedStateError(f"{name} has shape {value.shape}, not {expected}")
    if finite and value.dtype.kind == "f" and not np.isfinite(value).all():
        raise DamagedStateError(f"{name} holds {int((~np.isfinite(value)).sum())} "
                                "non-finite values")
    return value


def _finite_arrays(value: Any, where: str) -> None:
    """Every floating-point array in ``value`` (arrays, lists, tuples, dicts) is finite."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise DamagedStateError(f"{where} holds {int((~np.isfinite(value)).sum())} "
                                    "non-finite values")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _finite_arrays(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _finite_arrays(item, f"{where}.{key}")


class BaseDetector(OutlierMixin, BaseEstimator):
    """Base class of every kad detector.

    Class attributes a plugin sets:

    ``input_kind``
        ``"features"`` (2-D arrays of feature vectors), ``"images"`` (4-D arrays
        ``(n, height, width, 3)`` with values in [0, 1]), ``"both"``, or ``"maps"``: the
        network's unpooled block maps stacked on the finest block's grid ``(n, h, w, c)``,
        for detectors that score locations (:class:`kad_plugins.patch_knn.PatchKNNDetector`).
        A fitted pipeline feeds a detector the representation this declares
        (:func:`kad.features.representation.representation_class`): pooled vectors for
        ``features`` and ``both``, block maps for ``maps``; a detector that needs to know
        where each block's channels lie reads it in :meth:`for_representation`.
    """

    input_kind: ClassVar[InputKind] = "features"
    #: True for detectors that need labelled anomalies in ``fit(X, y)`` (the supervised
    #: upper bound); recipes mark their results as such.
    supervised: ClassVar[bool] = False
    #: Small settings under which the detector fits in seconds on the tests' small inputs;
    #: the contract tests use them. Never defaults.
    quick_params: ClassVar[dict] = {}
    #: Type names (as ``skops`` writes them, ``module.Class``) that this detector's
    #: scikit-learn state needs beyond kad's allow-list
    #: (:func:`kad.utils.artifact.sklearn_trusted_types`); they are trusted when a file of this
    #: detector is loaded, the class being taken from the registry.
    trusted_types: ClassVar[tuple[str, ...]] = ()
    #: Parameters the detector had once and no longer takes: a saved file that records
    #: them still loads, without them (:func:`decode_detector` drops them).
    retired_params: ClassVar[tuple[str, ...]] = ()
    #: The version of what :meth:`get_fitted_state` returns, stored in every model file of
    #: the detector. A file loads in any kad whose detector has the same state version,
    #: whatever kad or plugin version wrote it. Raise it when the learned state changes
    #: (an attribute renamed, an array laid out differently); to keep reading files of an
    #: older version, convert them in :meth:`upgrade_fitted_state`.
    state_version: ClassVar[int] = 1

    def __init__(self, contamination: float = 0.1):
        self.contamination = contamination

    # -- what subclasses implement -------------------------------------------------
    def _fit(self, X: np.ndarray, y: np.ndarray | None) -> None:
        raise NotImplementedError

    def _score(self, X: np.ndarray) -> np.ndarray:
        """Anomaly scores of ``X``, higher meaning more anomalous."""
        raise NotImplementedError

    # the default of a hook
    def _score_gradient(self, X: np.ndarray) -> np.ndarray | None:  # noqa: ARG002
        """Gradient of the anomaly score with respect to each row of ``X`` (feature
        vectors), or None (the default) where the score is not a differentiable function of
        them; heatmaps then fall back to occlusion. See :meth:`score_gradient`."""
        return None

    def for_representation(self, representation) -> BaseDetector:
        """The detector to fit on ``representation`` (a
        :class:`kad.features.representation.Representation`: its blocks' names, channels
        and map sides, in order). The default is the detector itself; one that needs the
        layout returns a clone with it set as parameters (patch kNN sets
        ``block_channels``). Called by the pipeline before fitting, so that the layout is
        declared in one place."""
        del representation  # the default detector needs no layout
        return self

    @classmethod
    def draws_own_maps(cls) -> bool:
        """Whether the detector draws its own heatmaps (overrides :meth:`explain_maps`)."""
        return cls.explain_maps is not BaseDetector.explain_maps

    def explain_maps(self, x: np.ndarray) -> np.ndarray | None:
        """A detector's own heatmap of one image, or None (the default) to let
        :mod:`kad.screening.heatmaps` make it (gradient attribution where
        :meth:`score_gradient` exists, occlusion otherwise).

        ``x`` is the image's input exactly as :meth:`anomaly_score` receives it, without
        the batch axis: for a detector of block maps, its stacked maps ``(h, w, c)``.
        Return a ``(h', w')`` array of how much each region raises the score (any
        resolution; it is resized to the image).
        """
        del x  # no map of its own
        return None

    def score_maps(self, X, *, progress: Progress | None = None,
                   ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """``(scores, maps)`` of a batch in one call: ``scores`` as :meth:`anomaly_score`
        gives them, and one map per input as :meth:`explain_maps` gives it (None for a
        detector without a map of its own). :mod:`kad.screening.heatmaps` draws a
        detector's own maps through this.

        The inputs are checked as :meth:`anomaly_score` checks them, then handed to
        :meth:`_score_maps`, whose default is :meth:`_score` on the batch and
        :meth:`explain_maps` input by input, so a detector that overrides only
        :meth:`explain_maps` keeps working. A detector whose map and score come from the
        same work (patch kNN: the score is the map's maximum) overrides
        :meth:`_score_maps` to do that work once per batch; its scores must then equal
        :meth:`anomaly_score`'s and its maps :meth:`explain_maps`'s."""
        check_is_fitted(self, "threshold_")
        X = self._validate(X, reset=False)
        with self._reporting(progress):
            scores, maps = self._score_maps(X)
        return np.asarray(scores, dtype=np.float64), maps

    def _score_maps(self, X: np.ndarray) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """:meth:`score_maps` of checked inputs (see there)."""
        return self._score(X), [self.explain_maps(x) for x in X]

    def _training_scores(self, X: np.ndarray) -> np.ndarray:
        """Anomaly scores of the training data, from which ``threshold_`` is set. Override
        where a training point must not count as its own evidence (nearest neighbours)."""
        return self._score(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # scikit-learn's checks feed 2-D arrays; image-only detectors cannot take them.
        tags.input_tags.two_d_array = self.input_kind not in ("images", "maps")
        tags.target_tags.required = bool(self.supervised)
        return tags

    # -- progress ----------------------------------------------------------------------
    @contextmanager
    def _reporting(self, progress: Progress | None) -> Iterator[None]:
        """``progress`` as ``self._progress`` for the length of one call; the attribute is
        gone afterwards, so the detector's state is what it was."""
        outer = self.__dict__.get("_progress", _ABSENT)
        self._progress = progress if progress is not None else (
            None if outer is _ABSENT else outer)
        try:
            yield
        finally:
            if outer is _ABSENT:
                self.__dict__.pop("_progress", None)
            else:
                self._progress = outer

    def _task(self, name: str, total: int | None = None):
        """:func:`kad.utils.progress.task` on the progress of the current call (nothing
        is reported outside ``fit``/``anomaly_score``/``score_maps`` or without a
        progress)."""
        from kad.utils.progress import task

        return task(self.__dict__.get("_progress"), name, total)

    # -- the public contract ---------------------------------------------------------
    def fit(self, X, y=None, *, progress: Progress | None = None) -> BaseDetector:
        """Fit on ``X`` (mostly normal data). ``y`` is ignored by unsupervised detectors.
        Long fits report to ``progress`` (see the module docstring)."""
        with self._reporting(progress):
            return self._fit_reporting(X, y)

    def _fit_reporting(self, X, y) -> BaseDetector:
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
        self.anomaly_scores_ = scores
        self.threshold_ = float(np.quantile(scores, 1.0 - self.contamination))
        return self

    def anomaly_score(self, X, *, progress: Progress | None = None) -> np.ndarray:
        """One score per input; **higher means more anomalous**. Long scoring reports to
        ``progress`` (see the module docstring)."""
        check_is_fitted(self, "threshold_")
        X = self._validate(X, reset=False)
        with self._reporting(progress):
            return np.asarray(self._score(X), dtype=np.float64)

    def score_gradient(self, X) -> np.ndarray | None:
        """``(n, d)`` gradient of :meth:`anomaly_score` with respect to each feature vector
        (float64), or None where the detector's score is not differentiable in its features
        (Isolation Forest) or the detector does not say how; :mod:`kad.screening.heatmaps` uses it
        to
        attribute a score to image regions."""
        check_is_fitted(self, "threshold_")
        X = self._validate(X, reset=False)
        if X.ndim != 2:
            return None
        gradient = self._score_gradient(X)
        return None if gradient is None else np.asarray(gradient, dtype=np.float64)

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

    @classmethod
    def upgrade_fitted_state(cls, state: dict[str, Any], version: int) -> dict[str, Any] | None:
        """The fitted ``state`` of a file written at an older state ``version`` (below
        :attr:`state_version`), converted to what :meth:`set_fitted_state` takes now; None
        (the default) where the detector cannot read that version, and the file is refused
        with a line saying to refit it. The result is checked like any loaded state
        (:meth:`validate_fitted_state`)."""
        del state, version  # the default reads no older version
        return None

    def validate_fitted_state(self) -> None:
        """Check a loaded state before its first use (see the module docstring); raise
        :class:`DamagedStateError` saying what is wrong. The default checks ``threshold_``
        (a finite number), ``anomaly_scores_`` (finite, one dimension),
        ``n_features_in_`` (a positive int), ``input_shape_`` (positive ints whose product
        is ``n_features_in_``), ``reference_`` and ``feature_names_in_`` (one per feature)
        and that every floating-point array of :meth:`get_fitted_state` is finite. Extend it
        with what the detector's own state must satisfy, calling ``super()`` first."""
        threshold = getattr(self, "threshold_", None)
        if (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number))
                or not np.isfinite(threshold)):
            raise DamagedStateError(f"threshold_ is {threshold!r}, not a finite number")
        check_array_state("anomaly_scores_", getattr(self, "anomaly_scores_", None), ndim=1,
                          kinds="f")
        n = getattr(self, "n_features_in_", None)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise DamagedStateError(f"n_features_in_ is {n!r}, not a positive integer")
        shape = getattr(self, "input_shape_", None)
        if (not isinstance(shape, tuple) or not shape or len(shape) > 3
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                           and v >= 1 for v in shape)
                or int(np.prod(shape, dtype=object)) != int(n)):
            raise DamagedStateError(f"input_shape_ is {shape!r}, which does not hold the "
                                    f"{n} features of n_features_in_")
        if hasattr(self, "reference_"):
            check_array_state("reference_", self.reference_, shape=(int(n),), kinds="f")
        if hasattr(self, "feature_names_in_"):
            names = self.feature_names_in_
            if not isinstance(names, np.ndarray) or names.shape != (int(n),):
                raise DamagedStateError(f"feature_names_in_ does not name the {n} features")
        _finite_arrays(self.get_fitted_state(), "the fitted state")

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one file; :func:`load_detector` reads it back.

        Raises :class:`~kad.errors.UnstorableError` (a :class:`TypeError`) naming the
        attribute when part of the fitted state cannot be stored without pickle, and
        :class:`~kad.errors.PluginError` when the class is not registered under
        ``kad.detectors`` (loading needs its registry name)."""
        from kad.utils.artifact import Encoder, write_artifact

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
        elif self.input_kind == "maps":
            raise ValueError(
                f"{name} works on block maps (n, h, w, channels), got an input of shape "
                f"{np.shape(X)}; pass unpooled maps, not feature vectors"
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


def encode_detector(detector: BaseDetector, encoder: Encoder, where: str) -> dict:
    """The ``object.json`` record of a fitted detector: registry name, entry point, the
    distribution that provides it, parameters and fitted state."""
    from kad.registry import registered_as

    info = registered_as(type(detector))
    params = encoder.encode(detector.get_params(deep=False), f"{where}.params", plain=True)
    state = detector.get_fitted_state()
    if not isinstance(state, dict):
        raise UnstorableError(f"{type(detector).__name__}.get_fitted_state() returned a "
                              f"{type(state).__name__}; it must return a dict")
    return {
        "name": info.name, "entry_point": info.value,
        "distribution": info.distribution, "version": info.version,
        "state_version": int(type(detector).state_version),
        "params": params, "state": encoder.encode(state, f"{where}.state"),
    }


def _state_version(artifact: Artifact, record: dict, where: str) -> int:
    """The state version a detector record was written with; files written before state
    versions were recorded hold version 1 of every detector."""
    version = record.get("state_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise artifact.fail(f"{where}.state_version is {version!r}, not a positive integer; "
                            "the file is corrupt")
    return version


def _readable_state(artifact: Artifact, cls: type[BaseDetector], record: dict, state: dict,
                    saved: int) -> dict:
    """``state`` as ``cls`` reads it now: as it is at the same state version, upgraded by
    :meth:`BaseDetector.upgrade_fitted_state` from an older one; refused otherwise, in one
    line naming the versions and what to do."""
    current = int(cls.state_version)
    if saved == current:
        return state
    upgraded = None
    if saved < current:
        try:
            upgraded = cls.upgrade_fitted_state(state, saved)
        except Exception as exc:  # the plugin's own code: name the file
            raise artifact.fail(
                f"the detector {record['name']!r} could not upgrade its state from version "
                f"{saved} to {current} ({type(exc).__name__}: {exc}); refit the model with "
                "`kad fit`") from exc
    if upgraded is not None:
        if not isinstance(upgraded, dict):
            raise artifact.fail(f"the detector {record['name']!r} upgraded its state to a "
                                f"{type(upgraded).__name__}, not a dict")
        return upgraded
    from kad import __version__
    from kad.utils.artifact import written_by

    kad_saved = written_by(artifact.manifest)
    plugin = "" if record.get("distribution") == "kad" else (
        f", or install {record.get('distribution')}=={record.get('version')}")
    raise artifact.fail(
        f"the detector {record['name']!r} holds its learned state in version {saved} "
        f"(written by kad {kad_saved}), and this kad {__version__} reads version {current} "
        f"of it: refit the model with `kad fit`, or load it with kad {kad_saved}{plugin}")


def decode_detector(artifact: Artifact, record: Any, where: str) -> BaseDetector:
    """The detector of an :func:`encode_detector` record, its class taken from the registry
    by the recorded name. The plugin must come from the distribution it was saved from, and
    read the recorded state version (:attr:`BaseDetector.state_version`); the plugin's and
    kad's own versions are recorded but do not decide."""
    from kad.registry import DETECTORS, discover, load

    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise artifact.fail(f"{where} is not a detector record")
    name = record["name"]
    info = discover(DETECTORS).get(name)
    if info is None:
        raise artifact.fail(
            f"the detector plugin {name!r} ({record.get('distribution')} "
            f"{record.get('version')}) is not installed here; install it to load this file")
    saved_version = _state_version(artifact, record, where)
    if record.get("distribution") != info.distribution:
        raise artifact.fail(
            f"the detector {name!r} was saved from {record.get('entry_point')} "
            f"({record.get('distribution')} {record.get('version')}), but here {name!r} is "
            f"{info.value} ({info.distribution} {info.version}), another plugin: install "
            f"{record.get('distribution')}=={record.get('version')} or refit the model")
    try:
        cls = load(DETECTORS, name)
    except PluginError as exc:
        raise artifact.fail(str(exc)) from exc
    params = artifact.decode(record.get("params"), f"{where}.params", plain=True)
    state = artifact.decode(record.get("state"), f"{where}.state", trusted=cls.trusted_types)
    if not isinstance(params, dict) or not isinstance(state, dict):
        raise artifact.fail(f"{where} has malformed parameters or state")
    state = _readable_state(artifact, cls, record, state, saved_version)
    params = {k: v for k, v in params.items() if k not in cls.retired_params}
    try:
        detector = cls(**params)
        detector.set_fitted_state(state)
    except Exception as exc:  # the plugin's own code: whatever it raises, name the file
        raise artifact.fail(f"the detector {name!r} could not be rebuilt from the file "
                            f"({type(exc).__name__}: {exc})") from exc
    if not hasattr(detector, "threshold_"):
        raise ArtifactError(f"{artifact.path} is corrupt: its detector has no fitted "
                            "threshold_")
    try:
        detector.validate_fitted_state()
    except Exception as exc:  # the plugin's own check: whatever it raises, refuse the file
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        what = detail if isinstance(exc, DamagedStateError) else (
            f"its state fails the detector's check ({type(exc).__name__}: {detail})")
        raise ArtifactError(f"{artifact.path} is damaged: the {name!r} detector's {what}; "
                            "refit the model") from exc
    return detector


def load_detector(path: str | Path) -> BaseDetector:
    """Read a detector written by :meth:`BaseDetector.save`; nothing in the file can run
    code (see :mod:`kad.utils.artifact`)."""
    from kad.utils.artifact import open_artifact

    artifact = open_artifact(path, kind="detector")
    if not isinstance(artifact.tree, dict) or "detector" not in artifact.tree:
        raise ArtifactError(f"{path} is corrupt: it holds no detector")
    detector = decode_detector(artifact, artifact.tree["detector"], "detector")
    if not hasattr(detector, "threshold_"):
        raise ArtifactError(f"{path} is corrupt: its detector has no fitted threshold_")
    return detector
