"""Where images and their labels come from.

``load_dataset("NAME[:key=value,...]", data_dir=None, **options)`` returns a
:class:`Dataset`: stable item ids, targets (class names or grades), anomaly flags where
the dataset defines them, the official split and patient ids where known, and an
:class:`ImageSource` that decodes pixels on demand. Loading only lists and stats files,
and never imports TensorFlow unless a Keras dataset has to be downloaded.

==================  =====================================================================
name                source
==================  =====================================================================
``digits``          scikit-learn's embedded 8x8 digits (no download)
``cifar10``         Keras download, or an image-folder export ``train/<class>/*``, ``test/``
``cifar100``        the same, with the 20 coarse superclasses as classes
``svhn``            the official ``.mat`` files, or an image-folder export
``dr``              Kaggle Diabetic Retinopathy (``trainLabels.csv`` + images)
``rop``             ROP labels CSV; normal vs plus (pre-plus left out)
``rop-all-grades``  ROP labels CSV; normal vs pre-plus and plus
``folder``          ``normal/`` and ``abnormal/`` subfolders
==================  =====================================================================

These are the built-in ``kad.datasets`` entry points; a third-party distribution adds a
dataset the same way, with a loader ``(data_dir=None, **options) -> Dataset``.
"""

from __future__ import annotations

import os
from typing import Any

from kad.data.datasets.base import ArraySource, Dataset, DatasetOptionError, FileSource, ImageSource

__all__ = [
    "ArraySource",
    "Dataset",
    "DatasetOptionError",
    "FileSource",
    "ImageSource",
    "dataset_names",
    "load_dataset",
]


def dataset_names() -> list[str]:
    """The names :func:`load_dataset` accepts: every ``kad.datasets`` entry point."""
    from kad.registry import DATASET, names

    return names(DATASET)


def load_dataset(spec: str, data_dir: str | os.PathLike | None = None, **options: Any) -> Dataset:
    """Load the dataset ``spec`` names (``NAME[:key=value,...]``, e.g.
    ``"dr:anomaly_grades=(3,4)"``) from ``data_dir`` or its standard source. ``options``
    are more of the loader's keyword arguments and override the spec's."""
    from kad.registry import DATASET, create
    from kad.utils.specs import Spec, parse_spec

    parsed = parse_spec(spec, DATASET.what)
    return create(DATASET, Spec(parsed.name, {**parsed.options, **options}), data_dir=data_dir)
