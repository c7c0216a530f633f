"""Shared machinery of kad's deep detectors (Keras 3 on the TensorFlow backend).

This module imports Keras at its top: it is only imported when a deep detector is first
used, never by ``import kad``. It provides

* :func:`seed_everything` -- ``keras.utils.set_random_seed`` at the start of every ``_fit``,
  so that the same ``random_state`` gives the same weights and the same scores;
* :func:`resize_images` -- images of any size to a network's square working size;
* :func:`split_validation` -- a held-out part of the (normal) training data for early
  stopping, disjoint from the part that is trained on;
* :class:`EpochProgress` -- a Keras callback reporting each finished epoch to a
  :class:`kad.utils.progress.Progress` (the ``progress`` of ``fit``; nothing is printed);
* :class:`DeepDetector` -- the intermediate base class: input preparation (resize images,
  standardise feature vectors), ``fit`` with early stopping and batched prediction; its
  Keras models are saved in Keras' own format and loaded in safe mode
  (:mod:`kad.utils.artifact`), its traced ``tf.function`` caches are left out;
* :func:`check_collapse` and :class:`CollapseWarning` -- constant scores after training
  are reported, never passed off as a working model.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from kad.detectors.base import BaseDetector
from kad.errors import MissingDependencyError
from kad.utils.deps import import_keras

keras = import_keras()
if keras.backend.backend() != "tensorflow":
    raise MissingDependencyError(
        f"kad's deep detectors need Keras on the TensorFlow backend, but KERAS_BACKEND is "
        f"{keras.backend.backend()!r}; unset it or set KERAS_BACKEND=tensorflow"
    )
import tensorflow as tf  # noqa: E402  (after import_keras, which quiets TensorFlow's logs)

__all__ = [
    "CollapseWarning",
    "DeepDetector",
    "EpochProgress",
    "check_collapse",
    "inference_copy",
    "keras",
    "resize_images",
    "seed_everything",
    "split_validation",
    "tf",
]


class CollapseWarning(RuntimeWarning):
    """A deep detector's training scores are (nearly) constant: the network collapsed and
    its scores carry no information."""


def seed_everything(random_state: int | None) -> None:
    """Seed Python, NumPy and TensorFlow (``keras.utils.set_random_seed``); ``None`` leaves
    the global generators alone (results then differ between runs)."""
    if random_state is not None:
        keras.utils.set_random_seed(int(random_state))


def resize_images(X: np.ndarray, size: int) -> np.ndarray:
    """``X`` (n, h, w, 3) in [0, 1] resized to (n, size, size, 3) float32.

    Uses :func:`kad.data.images.resize` (area when shrinking, bilinear when enlarging); the
    aspect ratio is not kept (kad's preprocessing already squares fundus images).
    """
    X = np.asarray(X, dtype=np.float32)
    if X.shape[1:3] == (size, size):
        return X
    from kad.data.images import resize

    out = np.empty((len(X), size, size, X.shape[3]), dtype=np.float32)
    for i, image in enumerate(X):
        out[i] = resize(image, size)
    return np.clip(out, 0.0, 1.0)


def split_validation(n: int, fraction: float, random_state: int | None,
                     min_train: int = 2, labels: np.ndarray | None = None):
    """``(train_idx, val_idx)``: a random, disjoint split of ``range(n)``.

    ``val_idx`` is empty when ``fraction`` is 0 or leaves fewer than one validation or
    ``min_train`` training samples. With ``labels``, the split is stratified (each class
    keeps its share, and a class with fewer than two samples stays in training).
    """
    if not (0.0 <= fraction < 1.0):
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction!r}")
    rng = np.random.default_rng(random_state)
    if labels is None:
        n_val = int(math.floor(n * fraction))
        if n_val < 1 or n - n_val < min_train:
            return np.arange(n), np.arange(0)
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(math.floor(len(idx) * fraction))
        if len(idx) < 2 or n_val < 1:
            train.append(idx)
            continue
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train_idx = np.sort(np.concatenate(train))
    val_idx = np.sort(np.concatenate(val)) if val else np.arange(0)
    if len(val) < len(np.unique(labels)):  # a class missing from validation: no early stop
        return np.arange(n), np.arange(0)
    return train_idx, val_idx


class EpochProgress(keras.callbacks.Callback):
    """Calls ``update(epochs done)`` at the end of every epoch: the task of a training,
    opened by :meth:`DeepDetector._fit_model` with a total of its epochs (early stopping
    ends it sooner)."""

    def __init__(self, update):
        super().__init__()
        self.update = update

    def on_epoch_end(self, epoch, logs=None):  # noqa: ARG002 - Keras's callback signature
        self.update(epoch + 1)


def inference_copy(model):
    """A copy of ``model`` with the same weights but no optimizer or compile state.

    Fitted detectors keep these copies: they save smaller, and reloading them does not
    warn about optimizer variables that cannot be restored.
    """
    copy = type(model).from_config(model.get_config())
    if not copy.built:
        copy.build(None)
    copy.set_weights(model.get_weights())
    return copy


def check_collapse(scores: np.ndarray, scale: float, what: str, tol: float = 1e-6) -> bool:
    """Warn with :class:`CollapseWarning` and return True when the training ``scores`` are
    constant up to ``tol`` relative to ``scale`` (the size scores are measured against)."""
    scores = np.asarray(scores, dtype=np.float64)
    spread = float(np.std(scores)) if scores.size else 0.0
    if not np.isfinite(spread) or spread <= tol * max(float(scale), 1e-12):
        warnings.warn(
            f"{what} collapsed: the standard deviation of its training scores is {spread:.3g} "
            f"(scale {float(scale):.3g}), so every input gets (nearly) the same score and the "
            "scores are meaningless. Train with a lower learning_rate, fewer epochs, "
            "autoencoder pretraining, or check the inputs for constant values",
            CollapseWarning,
            stacklevel=3,
        )
        return True
    return False


class DeepDetector(BaseDetector):
    """Intermediate base class of the Keras detectors.

    Subclasses set ``input_kind`` and implement ``_fit``/``_score``; they are expected to
    have the parameters ``epochs``, ``batch_size``, ``validation_fraction``, ``patience``
    and ``random_state``, and, when they take images, ``image_size`` (the network's working
    size; images of any size are resized to it). Each training reports its epochs to the
    ``progress`` given to ``fit``, as the task ``<description> epochs`` (total: the
    epochs asked for).

    ``verbose``, which once drew a bar, is a retired parameter: files saved with it load
    without it.

    Learned attributes (names ending in ``_``) are saved as arrays, plain values and Keras
    models (``.keras``, loaded with ``safe_mode=True``): a subclassed network must be
    registered with ``keras.saving.register_keras_serializable`` and have a ``get_config``.
    Attributes whose names start with ``_`` (such as traced ``tf.function`` caches in
    ``_tf_*``) are not saved, nor copied; they are rebuilt on first use after loading.
    """

    _display_name = "deep detector"
    retired_params = ("verbose",)

    # -- inputs ----------------------------------------------------------------------
    def _prepare(self, X: np.ndarray, fit: bool = False) -> np.ndarray:
        """Images resized to the working size; feature vectors standardised with the
        statistics of the training part (set when ``fit`` is True)."""
        if X.ndim == 4:
            return resize_images(X, int(self.image_size))
        if fit:
            mean = X.mean(axis=0, dtype=np.float64)
            std = X.std(axis=0, dtype=np.float64)
            std[std < 1e-8] = 1.0  # constant features stay at 0
            self.feature_mean_ = mean.astype(np.float32)
            self.feature_scale_ = std.astype(np.float32)
        return ((X - self.feature_mean_) / self.feature_scale_).astype(np.float32)

    def _split(self, n: int, labels: np.ndarray | None = None):
        return split_validation(n, float(self.validation_fraction), self.random_state,
                                labels=labels)

    # -- training --------------------------------------------------------------------
    def _callbacks(self, has_validation: bool, monitor: str = "val_loss",
                   early_stopping: bool = True) -> list:
        callbacks = []
        if early_stopping and has_validation and self.patience is not None:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor=monitor, patience=int(self.patience), restore_best_weights=True,
            ))
        return callbacks

    def _fit_model(self, model, x, y=None, validation_data=None, epochs=None,
                   description: str | None = None, early_stopping: bool = True,
                   shuffle: bool = True):
        """``model.fit`` with early stopping on ``validation_data``, reporting the task
        ``<description> epochs``; nothing happens for 0 epochs (an untrained baseline).
        Returns the history dict."""
        epochs = int(self.epochs if epochs is None else epochs)
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        if epochs == 0:
            return {}
        has_val = validation_data is not None
        kwargs = {}
        if not isinstance(x, keras.utils.PyDataset):
            kwargs["batch_size"] = int(self.batch_size)
            kwargs["shuffle"] = shuffle
        with self._task(f"{description or self._display_name} epochs", epochs) as update:
            callbacks = self._callbacks(has_val, early_stopping=early_stopping)
            history = model.fit(
                x, y, epochs=epochs, validation_data=validation_data, verbose=0,
                callbacks=[*callbacks, EpochProgress(update)], **kwargs,
            )
        return {k: [float(v) for v in vals] for k, vals in history.history.items()}

    def _predict(self, model, x, batch_size: int | None = None):
        """Inference-mode prediction in fixed-size batches (same inputs, same numbers)."""
        return model.predict(x, batch_size=int(batch_size or self.batch_size), verbose=0)

    # -- copying ---------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        return {k: v for k, v in state.items() if not k.startswith("_tf_")}
