"""Deferred imports of the heavy, optional deep-learning stack."""

from __future__ import annotations

import os

from .errors import MissingDependencyError

_TF_HINT = "install it with: pip install 'kad[tf]'"


def import_keras():
    """Return the ``keras`` module (Keras 3 on TensorFlow), or raise a clear error."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        import keras
    except ImportError as exc:  # TensorFlow or Keras missing
        raise MissingDependencyError(
            f"this needs Keras 3 with TensorFlow ({exc}); {_TF_HINT}"
        ) from exc
    if not keras.__version__.startswith("3."):
        raise MissingDependencyError(
            f"kad needs Keras 3, found keras {keras.__version__}; {_TF_HINT}"
        )
    return keras


def has_keras() -> bool:
    try:
        import_keras()
    except MissingDependencyError:
        return False
    return True
