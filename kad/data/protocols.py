"""The paper's evaluation protocols, as index splits over a :class:`~kad.data.datasets.Dataset`.

Natural images (an official train/test split, no fixed normal class): each class in turn is
normal; its training images minus 25% kept for validation train the detector; the official
test set is the test set, every other class an anomaly (ratio (K-1)/K).

Medical and folder datasets (a fixed normal/anomaly labelling): 5-fold cross-validation by
patient, repeated over seeds. Folds are drawn over *all* images with
``StratifiedGroupKFold`` (groups = patients, so the two eyes of a patient never land on both
sides; stratified so each fold gets its share of anomalies). Fold *k*'s images form the test
set; the normal images of the other folds train; the anomalies of the other folds are never
in the test set, so they can serve as labelled validation anomalies (Table 2) or be mixed
into training (Table 3) without leaking.

Every split also carries a validation part (normal images held out of training, and the
anomalies available for validation), which the recipes use or ignore.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from kad.errors import KadError


@dataclass(frozen=True)
class Split:
    """Row indices into a dataset for one run of a protocol."""

    name: str              # e.g. "airplane" or "seed 0 / fold 3"
    seed: int
    fold: int | None
    train: np.ndarray      # normal images to fit on
    val_normal: np.ndarray  # normal images held out of training
    spare_anomalies: np.ndarray  # anomalies never in this split's test set
    test: np.ndarray
    test_y: np.ndarray     # 1 = anomaly
    normal_class: str | None = None


def is_natural(dataset) -> bool:
    return dataset.anomaly is None


def check_protocol(dataset, folds: int = 5) -> None:
    """Refuse, as soon as the dataset is loaded, one that its protocol cannot evaluate: a
    medical dataset needs anomalies (at least one per fold) and as many patients as
    folds; a natural one needs its train/test split."""
    if is_natural(dataset):
        if dataset.split is None:
            raise KadError(f"dataset {dataset.name} has neither anomaly labels nor a "
                           "train/test split, so no protocol can evaluate a detector on it")
        return
    n_anomalies = int(np.sum(dataset.anomaly))
    if n_anomalies == 0:
        raise KadError(f"{dataset.name} has no anomalous images: the recipes test detectors "
                       "on anomalies; add some (an abnormal/ folder, or other grades with "
                       "anomaly_grades=...)")
    if n_anomalies < folds:
        raise KadError(f"{dataset.name} has {n_anomalies} anomalous images; {folds}-fold "
                       "cross-validation needs at least one per fold (lower --folds)")


def splits(dataset, seeds: int | list[int] = 1, folds: int = 5,
           valid: np.ndarray | None = None, classes: list[str] | None = None) -> list[Split]:
    """The splits of the protocol that fits ``dataset`` (see the module docstring).

    ``valid`` masks out images that could not be read; ``classes`` restricts the natural
    protocol to some normal classes.
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise KadError("at least one seed is needed")
    mask = np.ones(len(dataset), dtype=bool) if valid is None else np.asarray(valid, bool)
    if is_natural(dataset):
        return list(_one_class_splits(dataset, seed_list, mask, classes))
    return list(_patient_folds(dataset, seed_list, folds, mask))


def _one_class_splits(dataset, seeds, mask, classes) -> Iterator[Split]:
    if dataset.split is None:
        raise KadError(f"dataset {dataset.name} has neither anomaly labels nor a train/test split")
    target, split = np.asarray(dataset.target), np.asarray(dataset.split)
    chosen = classes or dataset.classes
    unknown = sorted(set(chosen) - set(dataset.classes))
    if unknown:
        raise KadError(f"unknown class(es) {unknown} for {dataset.name}; classes: "
                       f"{', '.join(dataset.classes)}")
    test = np.flatnonzero((split == "test") & mask)
    for cls in chosen:
        own = np.flatnonzero((split == "train") & (target == cls) & mask)
        others = np.flatnonzero((split == "train") & (target != cls) & mask)
        if len(own) < 4:
            raise KadError(f"class {cls!r} of {dataset.name} has only {len(own)} training images")
        for seed in seeds:
            train, val = train_test_split(own, test_size=0.25, random_state=seed)
            yield Split(
                name=cls if len(seeds) == 1 else f"{cls} / seed {seed}", seed=seed, fold=None,
                train=np.sort(train), val_normal=np.sort(val), spare_anomalies=others,
                test=test, test_y=(target[test] != cls).astype(int), normal_class=cls,
            )


def _patient_folds(dataset, seeds, n_folds, mask) -> Iterator[Split]:
    anomaly = np.asarray(dataset.anomaly, dtype=int)
    groups = (np.asarray(dataset.patient) if dataset.patient is not None
              else np.asarray(dataset.ids))
    index = np.flatnonzero(mask)
    n_anomalies = int(anomaly[index].sum())
    if n_anomalies < n_folds:
        raise KadError(
            f"{dataset.name} has {n_anomalies} readable anomalies; {n_folds}-fold "
            "cross-validation needs at least one per fold (lower --folds)"
        )
    if len(np.unique(groups[index])) < n_folds:
        raise KadError(f"{dataset.name} has fewer patients than folds ({n_folds})")
    for seed in seeds:
        cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for fold, (rest, held) in enumerate(cv.split(index, anomaly[index], groups[index])):
            rest, held = index[rest], index[held]
            normal_rest = rest[anomaly[rest] == 0]
            train, val = train_test_split(normal_rest, test_size=0.25, random_state=seed)
            yield Split(
                name=f"seed {seed} / fold {fold}", seed=seed, fold=fold,
                train=np.sort(train), val_normal=np.sort(val),
                spare_anomalies=rest[anomaly[rest] == 1], test=held, test_y=anomaly[held],
            )


def subsample(dataset, limit: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``limit`` images per class and split (natural datasets) or per
    label (medical ones), drawn with ``seed``: the ``--limit`` of quick runs."""
    rng = np.random.default_rng(seed)
    if is_natural(dataset):
        keys = np.char.add(np.asarray(dataset.target, dtype=str),
                           np.asarray(dataset.split if dataset.split is not None
                                      else ["all"] * len(dataset), dtype=str))
    else:
        keys = np.asarray(dataset.anomaly, dtype=str)
    chosen = []
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        if len(members) > limit:
            members = rng.choice(members, size=limit, replace=False)
        chosen.append(members)
    return np.sort(np.concatenate(chosen))


def mix_anomalies(split: Split, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training indices with anomalies mixed in at ``ratio`` of the training set (Table 3),
    and the anomalies used. They come from ``spare_anomalies`` and so are never tested on."""
    if not 0.0 <= ratio < 1.0:
        raise KadError(f"anomaly ratio must be in [0, 1), got {ratio}")
    n_train = len(split.train)
    wanted = int(round(ratio * n_train / (1.0 - ratio)))
    if wanted > len(split.spare_anomalies):
        raise KadError(
            f"ratio {ratio:.0%} needs {wanted} anomalies in training but only "
            f"{len(split.spare_anomalies)} are outside the test set of {split.name}"
        )
    rng = np.random.default_rng(seed)
    mixed = rng.choice(split.spare_anomalies, size=wanted, replace=False)
    return np.sort(np.concatenate([split.train, mixed])), np.sort(mixed)
