"""Exceptions raised by kad. Every message says what was wrong, with the value, and what
to do about it."""


class KadError(Exception):
    """Base class of kad's errors; the CLI prints these as one line and exits with 1."""


class PluginError(KadError):
    """A plugin (detector or backbone) is unknown, broken or of the wrong kind."""


class SpecError(KadError, ValueError):
    """A ``NAME[:key=value,...]`` specification could not be parsed."""


class DatasetError(KadError):
    """A dataset is missing, empty or malformed."""


class ImageReadError(KadError):
    """An image file could not be decoded."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class WeightsError(KadError):
    """Pretrained weights are unavailable or do not fit the network."""


class ArtifactError(KadError):
    """A saved detector or pipeline is corrupt, unsafe, or of a file format or detector
    state version this kad does not read."""


class UnstorableError(ArtifactError, TypeError):
    """Part of a fitted detector or pipeline cannot be stored in a kad model file (which
    holds plain data only); raised when saving, naming the value and its type."""


class MissingDependencyError(KadError, ImportError):
    """An optional dependency is needed for this operation."""
