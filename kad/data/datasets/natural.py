"""Natural-image benchmarks: digits, CIFAR-10, CIFAR-100 (20 superclasses) and SVHN.

Each comes with its official train/test split and class names in the official label order;
none defines normal and anomaly (the protocol makes each class the normal one in turn), so
``anomaly`` is ``None``. Without ``data_dir`` the standard sources are used (scikit-learn's
embedded digits, Keras' CIFAR downloads, the SVHN ``.mat`` files); with it, an image-folder
export ``train/<class>/*`` and ``test/<class>/*`` is read (for SVHN also a folder holding
``train_32x32.mat`` and ``test_32x32.mat``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kad.data.datasets._cifar100 import COARSE_CLASSES, FINE_CLASSES, FINE_TO_COARSE
from kad.data.datasets.base import (
    ArraySource,
    Dataset,
    FileSource,
    check_data_dir,
    list_image_files,
    relative_ids,
)
from kad.errors import DatasetError, MissingDependencyError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DIGIT_CLASSES",
    "SVHN_URL",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_svhn",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_CLASSES: tuple[str, ...] = COARSE_CLASSES
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
_SPLITS = ("train", "test")
_EXPORT_HINT = "an image-folder export (train/<class>/*, test/<class>/*)"


# -- built-in and downloaded arrays ------------------------------------------------------


def load_digits(data_dir: str | os.PathLike | None = None) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, split 2/3 train, 1/3 test
    (stratified, ``random_state=0``). Pixels 0..16 are scaled to 0..255."""
    if data_dir is not None:
        raise DatasetError(
            f"dataset 'digits' is built into scikit-learn and reads no folder; "
            f"drop --data-dir ({data_dir})"
        )
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    n = len(images)
    _, test_idx = train_test_split(np.arange(n), test_size=1 / 3, stratify=labels, random_state=0)
    split = np.full(n, "train", dtype="<U5")
    split[test_idx] = "test"
    return Dataset(
        name="digits",
        source=ArraySource(images, names=[f"digits[{i}]" for i in range(n)]),
        ids=[f"{i:04d}" for i in range(n)],
        target=np.asarray(DIGIT_CLASSES)[labels],
        split=split,
        kind="natural",
        class_order=DIGIT_CLASSES,
        options={"source": "sklearn", "test_size": "1/3", "random_state": 0},
    )


def _keras_load_data(name: str) -> tuple:
    """``keras.datasets.<name>.load_data()``; downloads on first use."""
    from kad.utils.deps import import_keras

    keras = import_keras()
    if name == "cifar10":
        return keras.datasets.cifar10.load_data()
    return keras.datasets.cifar100.load_data(label_mode="coarse")


def _svhn_download(split: str) -> str:
    """Path of the official ``<split>_32x32.mat``, downloaded into Keras' cache."""
    from kad.utils.deps import import_keras

    keras = import_keras()
    filename = f"{split}_32x32.mat"
    return keras.utils.get_file(filename, origin=SVHN_URL + filename, cache_subdir="datasets/svhn")


def _download(name: str, fetch: Callable[[], Any]) -> Any:
    hint = f"pass --data-dir (data_dir=...) with {_EXPORT_HINT}"
    if name == "svhn":
        hint += " or a folder holding train_32x32.mat and test_32x32.mat"
    try:
        return fetch()
    except MissingDependencyError as exc:
        raise DatasetError(f"cannot download dataset {name!r}: {exc}; or {hint}") from exc
    except Exception as exc:  # network, certificate, corrupt cache, ...
        raise DatasetError(
            f"dataset {name!r} could not be downloaded ({type(exc).__name__}: {exc}); "
            f"check the network connection, or {hint}"
        ) from exc


def _from_arrays(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: tuple[str, ...],
    source_kind: str,
) -> Dataset:
    (x_train, y_train), (x_test, y_test) = train, test
    x = np.concatenate([x_train, x_test])
    y = np.concatenate([np.ravel(y_train), np.ravel(y_test)]).astype(np.int64)
    n_train, n_test = len(x_train), len(x_test)
    positions = [*range(n_train), *range(n_test)]
    split = ["train"] * n_train + ["test"] * n_test
    return Dataset(
        name=name,
        source=ArraySource(x, names=[f"{s}[{i}]" for s, i in zip(split, positions, strict=True)]),
        ids=[f"{s}/{i:05d}" for s, i in zip(split, positions, strict=True)],
        target=np.asarray(classes)[y],
        split=split,
        kind="natural",
        class_order=classes,
        options={"source": source_kind},
    )


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 32, 32, 3), digits (N,))`` from an official SVHN ``.mat`` file."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        x, y = mat["X"], np.ravel(mat["y"]).astype(np.int64)
    except Exception as exc:
        raise DatasetError(
            f"cannot read SVHN file {path} ({type(exc).__name__}: {exc}); expected the "
            f"official {path.name} from {SVHN_URL}; delete it and download it again"
        ) from exc
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DatasetError(
            f"SVHN file {path} holds X of shape {x.shape} and {len(y)} labels; expected "
            f"X of shape (32, 32, 3, N) and N labels"
        )
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), np.where(y == 10, 0, y)


# -- image-folder exports ----------------------------------------------------------------


def _export_root(data_dir: Path, name: str) -> Path:
    """The folder holding ``train/`` and ``test/``: ``data_dir`` or its only such child."""

    def has_splits(folder: Path) -> bool:
        return all((folder / s).is_dir() for s in _SPLITS)

    if has_splits(data_dir):
        return data_dir
    children = sorted(c for c in data_dir.iterdir() if c.is_dir() and has_splits(c))
    if len(children) == 1:
        return children[0]
    if children:
        raise DatasetError(
            f"{data_dir} holds several dataset exports ({', '.join(c.name for c in children)})"
            f"; pass the one to use as --data-dir"
        )
    found = sorted(c.name for c in data_dir.iterdir())[:10]
    raise DatasetError(
        f"{data_dir} is not {_EXPORT_HINT} for dataset {name!r}: it needs train/ and test/ "
        f"subfolders (found: {', '.join(found) or 'nothing'})"
    )


def _load_export(
    name: str,
    data_dir: Path,
    folder_to_class: Mapping[str, str],
    class_order: tuple[str, ...],
    allowed_hint: str,
) -> Dataset:
    root = _export_root(data_dir, name)
    paths: list[Path] = []
    targets: list[str] = []
    splits: list[str] = []
    skipped: list[tuple[str, str]] = []
    for split in _SPLITS:
        split_dir = root / split
        entries = sorted(split_dir.iterdir())
        folders = [e for e in entries if e.is_dir()]
        unknown = [f.name for f in folders if f.name not in folder_to_class]
        if unknown:
            raise DatasetError(
                f"unknown class folder(s) in {split_dir} for dataset {name!r}: "
                f"{', '.join(unknown)}; class folders must be named {allowed_hint}"
            )
        skipped += [(str(e), "not in a class folder") for e in entries if not e.is_dir()]
        for folder in folders:
            images, others = list_image_files(folder)
            skipped += others
            paths += images
            targets += [folder_to_class[folder.name]] * len(images)
            splits += [split] * len(images)
        if not any(s == split for s in splits):
            raise DatasetError(
                f"no image files in {split_dir} for dataset {name!r}; expected "
                f"{split}/<class>/<image> files"
            )
    return Dataset(
        name=name,
        source=FileSource(paths),
        ids=relative_ids(paths, root),
        target=targets,
        split=splits,
        kind="natural",
        skipped=skipped,
        class_order=class_order,
        options={"source": "folder"},
    )


# -- the loaders -------------------------------------------------------------------------


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10: 50,000 train and 10,000 test images of 10 classes."""
    if data_dir is None:
        train, test = _download("cifar10", lambda: _keras_load_data("cifar10"))
        return _from_arrays("cifar10", train, test, CIFAR10_CLASSES, "keras")
    folder = check_data_dir(data_dir, "cifar10", _EXPORT_HINT)
    mapping = {c: c for c in CIFAR10_CLASSES}
    return _load_export(
        "cifar10", folder, mapping, CIFAR10_CLASSES,
        "after the 10 CIFAR-10 classes: " + ", ".join(CIFAR10_CLASSES),
    )  # fmt: skip


def load_cifar100(data_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-100 with its 20 coarse superclasses as targets. An image-folder export may
    use the 20 coarse or the 100 fine class names as folder names (fine map to coarse)."""
    if data_dir is None:
        train, test = _download("cifar100", lambda: _keras_load_data("cifar100"))
        return _from_arrays("cifar100", train, test, COARSE_CLASSES, "keras")
    folder = check_data_dir(data_dir, "cifar100", _EXPORT_HINT)
    mapping = {c: c for c in COARSE_CLASSES} | dict(FINE_TO_COARSE)
    return _load_export(
        "cifar100", folder, mapping, COARSE_CLASSES,
        f"after the 20 CIFAR-100 superclasses ({', '.join(COARSE_CLASSES)}) or the "
        f"100 fine classes ({', '.join(FINE_CLASSES[:3])}, ...)",
    )  # fmt: skip


def load_svhn(data_dir: str | os.PathLike | None = None) -> Dataset:
    """SVHN (cropped digits): 73,257 train and 26,032 test images; label 10 is digit 0."""
    if data_dir is None:
        mats = [_download("svhn", lambda s=s: _svhn_download(s)) for s in _SPLITS]
        return _from_arrays("svhn", *map(_read_svhn_mat, map(Path, mats)), DIGIT_CLASSES, "mat")
    folder = check_data_dir(data_dir, "svhn", _EXPORT_HINT + " or the two .mat files")
    mats = [folder / f"{s}_32x32.mat" for s in _SPLITS]
    if all(m.is_file() for m in mats):
        return _from_arrays("svhn", *map(_read_svhn_mat, mats), DIGIT_CLASSES, "mat")
    return _load_export(
        "svhn", folder, {c: c for c in DIGIT_CLASSES}, DIGIT_CLASSES, "0 to 9 after the digit"
    )
