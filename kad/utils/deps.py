"""Deferred imports of the heavy, optional deep-learning stack."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

from kad.errors import MissingDependencyError

_TF_HINT = "install it with: pip install 'kad[tf]'"


@contextmanager
def _quiet_native_stderr():
    """TensorFlow's C++ side logs to file descriptor 2 while it loads (CUDA probing, oneDNN
    notices) before any log level applies. Hold that output back, and replay it only if
    the import fails."""
    if "tensorflow" in sys.modules:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_keras():
    """Return the ``keras`` module (Keras 3 on TensorFlow), or raise a clear error."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        with _quiet_native_stderr():
            import keras

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.config.list_physical_devices()  # device probing logs here too
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
