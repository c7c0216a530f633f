"""The paper's protocols: one class as normal in turn; patient-level folds; mixing."""

from __future__ import annotations

import numpy as np
import pytest

from kad.data.datasets import ArraySource, Dataset, load_dataset
from kad.data.protocols import mix_anomalies, splits, subsample
from kad.errors import KadError


def _medical(n_patients=40, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    patient = np.repeat([f"p{i}" for i in range(n_patients)], 2)
    anomaly = np.zeros(len(patient), dtype=bool)
    anomaly[rng.choice(len(patient), 16, replace=False)] = True
    n = len(patient)
    return Dataset(
        name="synthetic", source=ArraySource(np.zeros((n, 4, 4, 3), np.uint8)),
        ids=np.array([f"{p}_{i % 2}" for i, p in enumerate(patient)]),
        target=np.where(anomaly, "4", "0"), anomaly=anomaly, split=None, patient=patient,
        kind="fundus", fingerprint="x", skipped=[], excluded={},
    )


def test_one_class_in_turn_with_a_quarter_kept_for_validation():
    digits = load_dataset("digits")
    runs = splits(digits)
    assert [s.normal_class for s in runs] == digits.classes
    for split in runs:
        own = (digits.target == split.normal_class) & (digits.split == "train")
        assert set(split.train) | set(split.val_normal) == set(np.flatnonzero(own))
        assert abs(len(split.val_normal) / own.sum() - 0.25) < 0.02
        assert set(split.test) == set(np.flatnonzero(digits.split == "test"))
        assert abs(split.test_y.mean() - 0.9) < 0.02  # (K-1)/K anomalies
        assert not set(split.spare_anomalies) & set(split.test)


def test_patient_folds_never_split_a_patient_and_test_each_image_once_per_seed():
    data = _medical()
    runs = splits(data, seeds=2, folds=4)
    assert len(runs) == 8
    for seed in (0, 1):
        tested = np.concatenate([s.test for s in runs if s.seed == seed])
        assert sorted(tested) == list(range(len(data)))
    for split in runs:
        train_patients = set(data.patient[np.r_[split.train, split.val_normal]])
        assert not train_patients & set(data.patient[split.test])
        assert not data.anomaly[split.train].any()
        assert split.test_y.sum() >= 1
        np.testing.assert_array_equal(split.test_y, data.anomaly[split.test])
    assert not np.array_equal(runs[0].test, runs[4].test), "seeds must give other folds"


def test_mixing_anomalies_reaches_the_ratio_and_never_uses_test_images():
    split = splits(_medical(n_patients=200), seeds=1, folds=2)[0]
    rows, mixed = mix_anomalies(split, 0.05, seed=0)
    assert abs(len(mixed) / len(rows) - 0.05) < 0.01
    assert not set(mixed) & set(split.test)
    with pytest.raises(KadError, match="needs .* anomalies"):
        mix_anomalies(split, 0.5, seed=0)


def test_subsample_caps_each_class_and_split():
    digits = load_dataset("digits")
    index = subsample(digits, 7)
    keys = {(t, s) for t, s in zip(digits.target[index], digits.split[index], strict=True)}
    assert len(index) == 7 * len(keys) == 140
    np.testing.assert_array_equal(index, subsample(digits, 7))


def test_too_few_anomalies_for_the_folds_is_a_clear_error():
    data = _medical()
    valid = ~data.anomaly
    valid[np.flatnonzero(data.anomaly)[:2]] = True
    with pytest.raises(KadError, match="2 readable anomalies"):
        splits(data, folds=5, valid=valid)
