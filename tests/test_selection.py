"""Choosing (input size, representation, detector) from evidence: the grid, the nested pick
(test rows never influence it), and features at several sizes, each cached once."""

from __future__ import annotations

import numpy as np
import pytest

from kad.data.protocols import Split
from kad.errors import KadError
from kad.features.cache import EntryWriter
from kad.screening.selection import (
    Candidate,
    MultiSizeFeatures,
    candidate_grid,
    nested_selection,
    parse_sizes,
    select,
    summarise_candidates,
)

N_NORMAL, N_ANOMALY = 90, 30
DETECTORS = ["iforest:n_estimators=20", "knn", "mahalanobis"]


def _entry(root, name, blocks: dict[str, np.ndarray]):
    n = len(next(iter(blocks.values())))
    meta = {"key": name, "inputs": {"backbone": "synthetic"}, "dataset": "synthetic",
            "ids": [f"img{i}" for i in range(n)]}
    writer = EntryWriter(root / name, list(blocks), [a.shape[1] for a in blocks.values()], n,
                         meta)
    writer.write(0, [np.asarray(a, np.float32) for a in blocks.values()], {})
    return writer.commit()


def _arrays(seed=0):
    """Blocks a (4-d) and b (3-d) at 32 and 64 px; anomalies differ only in b at 64 px."""
    rng = np.random.default_rng(seed)
    n = N_NORMAL + N_ANOMALY
    arrays = {size: {"a": rng.normal(size=(n, 4)), "b": rng.normal(size=(n, 3))}
              for size in (32, 64)}
    arrays[64]["b"][N_NORMAL:] += 3.0
    return arrays


def _features(root, arrays, tag=""):
    return MultiSizeFeatures({size: _entry(root, f"s{size}{tag}", blocks)
                              for size, blocks in arrays.items()})


class Spy:
    """A feature set that records which rows were read."""

    def __init__(self, inner):
        self.inner, self.read = inner, set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def matrix(self, representation="concat", rows=None):
        self.read.update(range(len(self.inner)) if rows is None else np.asarray(rows).tolist())
        return self.inner.matrix(representation, rows)


TRAIN = np.arange(0, 60)
VAL = np.r_[np.arange(60, 75), np.arange(90, 100)]
VAL_Y = np.r_[np.zeros(15), np.ones(10)].astype(int)
TEST = np.r_[np.arange(75, 90), np.arange(100, 120)]


def test_sizes_parse_from_text_or_lists_without_duplicates():
    assert parse_sizes("224,448") == [224, 448]
    assert parse_sizes([448, 224, 448]) == [448, 224]
    assert parse_sizes(299) == [299] and parse_sizes(None) is None
    with pytest.raises(KadError, match="'big' is not a whole number"):
        parse_sizes("224,big")
    with pytest.raises(KadError, match="16 is below 32"):
        parse_sizes("16")


def test_representations_name_blocks_at_a_size_and_concatenate_across_sizes(tmp_path):
    arrays = _arrays()
    features = _features(tmp_path, arrays)
    assert features.resolve("b@64,concat@32") == [(64, "b"), (32, "a"), (32, "b")]
    assert features.resolve("a") == [(32, "a")]  # no size: the first one
    rows = np.array([3, 100, 7])
    got = features.matrix("b@64,a@32", rows)
    np.testing.assert_allclose(got, np.c_[arrays[64]["b"][rows], arrays[32]["a"][rows]],
                               rtol=1e-6)
    with pytest.raises(KadError, match="'b@128' asks for features at 128 px.*add 128"):
        features.resolve("b@128")
    with pytest.raises(KadError, match="unknown block 'c'"):
        features.resolve("c@64")


def test_the_grid_is_every_block_and_concat_per_size_then_across_sizes(tmp_path):
    features = _features(tmp_path, _arrays())
    grid = candidate_grid(features, ["iforest", "knn"])
    reps = list(dict.fromkeys(c.representation for c in grid))
    assert reps == ["a@32", "b@32", "concat@32", "a@64", "b@64", "concat@64",
                    "concat@32,concat@64"]
    assert len(grid) == 2 * len(reps) and grid[0] == Candidate("a@32", "iforest")
    across = grid[-1]
    assert across.sizes == (32, 64) and across.size == "32+64" and across.block == "concat"
    only_concat = candidate_grid(features, ["knn"], blocks=False, across_sizes=False)
    assert [c.representation for c in only_concat] == ["concat@32", "concat@64"]


def test_select_picks_the_informative_size_and_block_reading_no_other_rows(tmp_path):
    spy = Spy(_features(tmp_path, _arrays()))
    grid = candidate_grid(spy, DETECTORS)
    selection = select(spy, grid, TRAIN, VAL, VAL_Y)
    assert "64" in selection.picked.size and "b" in selection.picked.representation
    assert selection.validation_auroc > 0.9
    assert len(selection.scores) == len(grid)
    assert selection.validation_auroc == max(s.validation_auroc for s in selection.scores)
    uninformative = selection.score_of(Candidate("a@32", "knn")).validation_auroc
    assert uninformative < 0.8
    assert spy.read == set(TRAIN) | set(VAL)  # the test rows were never read


def test_nested_selection_ignores_the_test_fold_entirely(tmp_path):
    """Poisoning the test rows' features (anomalies made obvious in block a at 32 px, which
    is noise elsewhere) changes the reported test AUROCs but not one validation AUROC or
    the pick."""
    arrays = _arrays()
    poisoned = {size: {b: a.copy() for b, a in blocks.items()} for size, blocks in
                arrays.items()}
    poisoned[32]["a"][TEST[TEST >= N_NORMAL]] += 50.0
    split = Split(name="fold 0", seed=0, fold=0, train=TRAIN, val_normal=np.arange(60, 75),
                  spare_anomalies=np.arange(90, 100), test=TEST,
                  test_y=(TEST >= N_NORMAL).astype(int))
    clean = _features(tmp_path, arrays)
    grid = candidate_grid(clean, DETECTORS)
    (a,) = nested_selection(clean, [split], grid, n_anomalies=10)
    (b,) = nested_selection(_features(tmp_path, poisoned, "-poisoned"), [split], grid, 10)
    assert a.picked == b.picked
    assert ([s.validation_auroc for s in a.selection.scores]
            == [s.validation_auroc for s in b.selection.scores])
    on_a = Candidate("a@32", "knn")
    assert a.selection.score_of(on_a).test_auroc < 0.8
    assert b.selection.score_of(on_a).test_auroc == 1.0
    assert a.test["auroc"] == a.selection.score_of(a.picked).test_auroc > 0.9
    table = summarise_candidates([a])
    assert [r["representation"] for r in table] == [c.representation for c in grid]
    assert sum(r["times_picked"] for r in table) == 1


def test_select_refuses_validation_rows_among_training_rows(tmp_path):
    features = _features(tmp_path, _arrays())
    grid = candidate_grid(features, ["knn"])
    with pytest.raises(KadError, match="validation rows must not be among the training"):
        select(features, grid, TRAIN, np.r_[VAL[:-1], 0], VAL_Y)
    with pytest.raises(KadError, match="both kinds"):
        select(features, grid, TRAIN, VAL, np.zeros(len(VAL), int))


def test_a_candidate_that_cannot_fit_is_named_and_the_others_still_compete(tmp_path):
    features = _features(tmp_path, _arrays())
    grid = candidate_grid(features, ["knn:n_neighbors=100", "knn"], across_sizes=False)
    selection = select(features, grid, TRAIN, VAL, VAL_Y)
    assert selection.picked.detector == "knn"
    assert "n_neighbors must be an integer in [1, 59]" in selection.failed[
        "32 px / a / knn:n_neighbors=100"]


def test_fundus_size_input_works_at_each_network_size_end_to_end(tmp_path):
    """fundus:size=input preprocesses at the network's size (448 px) instead of shrinking to
    256 px first; each size gets its own cache key."""
    import cv2

    from kad.data.datasets import load_dataset
    from kad.data.preprocessing import Fundus, preprocessing_at
    from kad.features.extract import load_preprocessed, plan_extraction
    from kad.screening.selection import extract_sizes

    assert preprocessing_at("fundus:size=input,blur=0.02", 448) == "fundus:blur=0.02,size=448"
    assert preprocessing_at("fundus:size=input", None) == "fundus"
    rng = np.random.default_rng(0)
    for sub in ("normal", "abnormal"):
        (tmp_path / sub).mkdir()
        image = np.zeros((600, 600, 3), np.uint8)
        cv2.circle(image, (300, 300), 280, (90, 60, 40), -1)
        image[rng.random((600, 600)) < 0.05] = 255  # fine detail a 256 px pass would blur
        cv2.imwrite(str(tmp_path / sub / "eye.png"), image)
    dataset = load_dataset("folder", tmp_path, kind="fundus")
    plans = {size: plan_extraction(dataset, "mobilenet_v2:alpha=0.35", "none", size,
                                   "fundus:size=input") for size in (224, 448)}
    assert plans[448].preprocessing == Fundus(size=448)
    assert plans[224].preprocessing == Fundus(size=224) and plans[224].key != plans[448].key
    seen = load_preprocessed(dataset.source, 0, plans[448].preprocessing, 448)
    np.testing.assert_array_equal(seen, Fundus(size=448)(dataset.source.load(0)))
    shrunk = load_preprocessed(dataset.source, 0, Fundus(), 448)
    assert np.abs(np.diff(seen, axis=1)).mean() > 1.2 * np.abs(np.diff(shrunk, axis=1)).mean()
    asked = []
    extract_sizes(dataset, "mobilenet_v2:alpha=0.35", "none", [224, 448], "fundus:size=input",
                  extract=lambda ds, bb, w, size, prep: asked.append((size, prep)) or _Fake())
    assert asked == [(224, "fundus:size=224"), (448, "fundus:size=448")]


class _Fake:
    ids = ["eye"]


def test_fundus_photographs_default_to_448_px_and_other_images_to_the_native_size():
    from types import SimpleNamespace

    from kad.features.backbones import get_backbone
    from kad.features.extraction import default_input_size

    irv2 = get_backbone("inception_resnet_v2")
    assert default_input_size(SimpleNamespace(kind="fundus"), irv2) == 448
    assert default_input_size(SimpleNamespace(kind="natural"), irv2) == 299


def test_the_recipes_grid_asks_the_same_rule_for_the_input_size():
    """Table 1 on the 8x8 digits runs at 80 px, as every other command does, not at the
    backbone's native 299 px (14 times the network work)."""
    from types import SimpleNamespace

    from kad.features.backbones import get_backbone
    from kad.screening.selection import extract_sizes

    digits = SimpleNamespace(kind="natural", source=SimpleNamespace(array=np.zeros((3, 8, 8))))
    asked = []
    extract_sizes(digits, get_backbone("inception_resnet_v2"), "none", None,
                  extract=lambda ds, bb, w, size, prep: asked.append(size) or _Fake())
    assert asked == [80]
