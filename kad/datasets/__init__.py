"""Where images and their labels come from.

``load_dataset(name, data_dir=None, **options)`` returns a :class:`Dataset`: stable item
ids, targets (class names or grades), anomaly flags where the dataset defines them, the
official split and patient ids where known, and an :class:`ImageSource` that decodes
pixels on demand. Loading only lists and stats files, and never imports TensorFlow
unless a Keras dataset has to be downloaded.

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
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable
from typing import Any

from ..errors import DatasetError
from .base import ArraySource, Dataset, DatasetOptionError, FileSource, ImageSource
from .medical import load_dr, load_folder, load_rop, load_rop_all_grades
from .natural import load_cifar10, load_cifar100, load_digits, load_svhn

__all__ = [
    "DATASETS",
    "ArraySource",
    "Dataset",
    "DatasetOptionError",
    "FileSource",
    "ImageSource",
    "dataset_names",
    "load_dataset",
]

#: Every dataset by name: a function ``(data_dir=None, **options) -> Dataset``.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "dr": load_dr,
    "rop": load_rop,
    "rop-all-grades": load_rop_all_grades,
    "folder": load_folder,
}


def dataset_names() -> list[str]:
    """The names :func:`load_dataset` accepts."""
    return list(DATASETS)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options: Any) -> Dataset:
    """Load dataset ``name`` (see :data:`DATASETS`) from ``data_dir`` or its standard
    source. ``options`` are the loader's keyword arguments, e.g. ``anomaly_grades="3,4"``
    for ``dr`` or ``kind="natural"`` for ``folder``."""
    loader = DATASETS.get(name)
    if loader is None:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DatasetError(f"unknown dataset {name!r}; {hint}available: {', '.join(DATASETS)}")
    accepted = [p for p in inspect.signature(loader).parameters if p != "data_dir"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetOptionError(
            f"dataset {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(accepted) or 'none'}"
        )
    return loader(data_dir, **options)
