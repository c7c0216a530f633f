"""Choosing the input size, the representation and the detector from evidence.

The paper fixes the network input size, uses every block concatenated and an Isolation
Forest, and, with a few labelled anomalies (its Table 2), picks the best block. This module
generalises that pick to a grid of *candidates*, each an (input size, representation,
detector) triple:

* :class:`MultiSizeFeatures` holds one feature-cache entry per input size (the cache format
  is unchanged: a list of sizes is a loop over entries, see :func:`extract_sizes`). A
  representation names blocks at a size, ``block@448``, ``concat@224``, and can concatenate
  across sizes, ``concat@224,concat@448``. A name without ``@size`` is at the first size.
* :func:`candidate_grid` spells the documented grid: for every size, every block alone and
  the concatenation of all blocks; with several sizes, the concatenation across all sizes;
  each with every detector.
* :func:`select` fits every candidate on normal training rows and ranks it by AUROC on a
  labelled validation set. It is given training and validation rows only, so the rows a
  caller keeps for testing cannot influence the choice (nested selection: the recipes pass
  rows from the training folds only). The first candidate with the highest validation
  AUROC wins, so ties go to the smaller size and the grid's order.

Without labelled anomalies there is nothing to pick with: :data:`UNSUPERVISED_DEFAULT`
holds the choice the benchmark (``benchmarks/evidence.py``) supports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kad.data.preprocessing import preprocessing_at
from kad.errors import KadError
from kad.features.extraction import FUNDUS_INPUT_SIZE
from kad.utils.progress import Progress, task

__all__ = [
    "UNSUPERVISED_DEFAULT",
    "Candidate",
    "CandidateScore",
    "MultiSizeFeatures",
    "Selection",
    "SplitSelection",
    "candidate_grid",
    "extract_sizes",
    "fresh_detector",
    "nested_selection",
    "parse_sizes",
    "preprocessing_at",
    "select",
    "summarise_candidates",
    "validation_set",
]

CONCAT = "concat"

#: What kad fits when there are no labelled anomalies to pick with: kNN (mean distance to
#: the 2 nearest training images) on every block concatenated; fundus photographs at 448 px.
#: Measured with ``benchmarks/evidence.py`` (MobileNetV2-0.35, ImageNet): kNN beats the
#: Isolation Forest on Kaggle DR (grade 0 vs 4, 5 patient folds) by 9.0 points at 224 px and
#: 3.1 at 448 px, and on CIFAR-10 by 4.0 and 4.9; fundus photographs gain 4.3 points at
#: 448 px over 224 px (kNN), natural images lose 5.7. See the README's "The paper's
#: experiments".
UNSUPERVISED_DEFAULT = {"detector": "knn", "representation": CONCAT,
                        "image_size": {"fundus": FUNDUS_INPUT_SIZE}}


def parse_sizes(value: int | str | Sequence[int] | None) -> list[int] | None:
    """Input sizes as a list: ``"224,448"``, ``[224, 448]``, ``224`` or ``None`` (the
    backbone's native size). Duplicates are dropped, the order is kept."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (int, np.integer)):
        parts = [value]
    else:
        parts = list(value)
    sizes: list[int] = []
    for part in parts:
        try:
            size = int(part)
        except (TypeError, ValueError):
            raise KadError(f"image size {part!r} is not a whole number of pixels; "
                           "give sizes like 224,448") from None
        if size < 32:
            raise KadError(f"image size {size} is below 32 px; give sizes like 224,448")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise KadError(f"no image size in {value!r}; give sizes like 224,448")
    return sizes


class MultiSizeFeatures:
    """Features of one dataset at several input sizes: one :class:`~kad.features.cache.FeatureSet`
    per size, every one over the same images in the same order."""

    def __init__(self, by_size: Mapping[int, object]):
        if not by_size:
            raise KadError("no feature set given: extract at least one input size")
        self.by_size = dict(by_size)
        self.sizes = list(self.by_size)
        first = self.by_size[self.sizes[0]]
        for size, features in self.by_size.items():
            if list(features.ids) != list(first.ids):
                raise KadError(f"the features at {size} px are not over the same images as "
                               f"those at {self.sizes[0]} px; extract them from one dataset")

    def __len__(self) -> int:
        return len(self.by_size[self.sizes[0]])

    @property
    def ids(self) -> list[str]:
        return list(self.by_size[self.sizes[0]].ids)

    def blocks(self, size: int | None = None) -> list[str]:
        return list(self.by_size[self.sizes[0] if size is None else size].blocks)

    @property
    def valid(self) -> np.ndarray:
        """Rows readable at every size."""
        return np.logical_and.reduce([np.asarray(f.valid, bool) for f in self.by_size.values()])

    @property
    def failed(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for features in self.by_size.values():
            out.update(features.failed)
        return out

    def resolve(self, representation: str | Sequence[str] = CONCAT) -> list[tuple[int, str]]:
        """``(size, block)`` pairs for a representation (see the module docstring)."""
        items = ([r.strip() for r in representation.split(",") if r.strip()]
                 if isinstance(representation, str) else list(representation))
        if not items:
            raise KadError("empty representation: name 'concat' or at least one block")
        pairs: list[tuple[int, str]] = []
        for item in items:
            name, at, size_text = item.partition("@")
            size = self.sizes[0]
            if at:
                try:
                    size = int(size_text)
                except ValueError:
                    raise KadError(f"{item!r}: the size after '@' must be a number of pixels, "
                                   f"e.g. {name}@{self.sizes[0]}") from None
            if size not in self.by_size:
                raise KadError(f"{item!r} asks for features at {size} px, but only "
                               f"{', '.join(map(str, self.sizes))} px were extracted; add "
                               f"{size} to --image-size")
            features = self.by_size[size]
            pairs += [(size, b) for b in features.resolve(name)]
        return pairs

    def matrix(self, representation: str | Sequence[str] = CONCAT,
               rows: np.ndarray | None = None) -> np.ndarray:
        """Features of ``rows`` for a representation, blocks concatenated in its order."""
        pairs = self.resolve(representation)
        parts, run = [], []
        for i, (size, block) in enumerate(pairs):  # consecutive blocks of one size: one read
            run.append(block)
            if i + 1 == len(pairs) or pairs[i + 1][0] != size:
                parts.append(self.by_size[size].matrix(run, rows))
                run = []
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def extract_sizes(dataset, backbone="inception_resnet_v2", weights="imagenet",
                  sizes: int | str | Sequence[int] | None = None,
                  preprocessing: str | Mapping[int, str] | None = None, *,
                  batch_size: int = 64, cache_dir: str | Path | None = None,
                  progress: Progress | None = None,
                  extract: Callable | None = None) -> MultiSizeFeatures:
    """Features at every size of ``sizes``, one cache entry each: a size already cached is
    read, not extracted again. ``preprocessing`` is one spec for every size or a mapping
    ``{size: spec}``; ``size=input`` in a spec follows each size (:func:`preprocessing_at`:
    ``fundus:size=input`` preprocesses fundus photographs at the network's resolution
    instead of 256 px). ``extract`` defaults to
    :func:`kad.features.extract.extract_features`, reporting each extraction to
    ``progress``."""
    from kad.features.backbones import get_backbone
    from kad.features.extraction import default_input_size

    bb = get_backbone(backbone) if isinstance(backbone, str) else backbone
    wanted = parse_sizes(sizes) or [bb.input_size(default_input_size(dataset, bb))]
    if extract is None:
        from kad.features.extract import extract_features

        def extract(ds, backbone, weights, size, prep):
            return extract_features(ds, backbone, weights, size, prep, batch_size=batch_size,
                                    cache_dir=cache_dir, progress=progress)
    by_size = {}
    for size in wanted:
        prep = preprocessing.get(size) if isinstance(preprocessing, Mapping) else preprocessing
        prep = preprocessing_at(prep, size)
        by_size[size] = extract(dataset, bb, weights, size, prep)
    return MultiSizeFeatures(by_size)


@dataclass(frozen=True)
class Candidate:
    """One (input size, representation, detector) triple. ``representation`` is spelled
    with its sizes (``concat@224``, ``block_13_add@448``, ``concat@224,concat@448``)."""

    representation: str
    detector: str

    @property
    def sizes(self) -> tuple[int, ...]:
        found: list[int] = []
        for item in self.representation.split(","):
            size = int(item.partition("@")[2])
            if size not in found:
                found.append(size)
        return tuple(found)

    @property
    def size(self) -> str:
        """``"224"``, or ``"224+448"`` for a representation across sizes."""
        return "+".join(map(str, self.sizes))

    @property
    def block(self) -> str:
        """The representation without its sizes: a block name or ``concat``."""
        names = list(dict.fromkeys(i.partition("@")[0] for i in self.representation.split(",")))
        return ",".join(names)

    @property
    def label(self) -> str:
        return f"{self.size} px / {self.block} / {self.detector}"

    def to_json(self) -> dict:
        return {"size": self.size, "sizes": list(self.sizes), "block": self.block,
                "representation": self.representation, "detector": self.detector,
                "label": self.label}


def candidate_grid(features: MultiSizeFeatures, detectors: Iterable[str], *,
                   blocks: bool = True, concat: bool = True,
                   across_sizes: bool = True) -> list[Candidate]:
    """The grid :func:`select` searches, in this order: for each size (as extracted), each
    block alone (``blocks``) in network order, then every block concatenated (``concat``);
    then, with several sizes, every block at every size concatenated (``across_sizes``).
    Each representation goes with every detector, in the order given."""
    detectors = list(detectors)
    if not detectors:
        raise KadError("no detector to choose from: name at least one, e.g. iforest,knn")
    reps: list[str] = []
    for size in features.sizes:
        if blocks:
            reps += [f"{b}@{size}" for b in features.blocks(size)]
        if concat:
            reps.append(f"{CONCAT}@{size}")
    if across_sizes and concat and len(features.sizes) > 1:
        reps.append(",".join(f"{CONCAT}@{s}" for s in features.sizes))
    if not reps:
        raise KadError("an empty grid: allow single blocks, the concatenation or both")
    return [Candidate(rep, det) for rep in reps for det in detectors]


@dataclass
class CandidateScore:
    """How one candidate did. ``test`` (AUROC, AUPRC, recall at the detector's threshold,
    scoring seconds) is filled in by a caller that evaluates on a test set afterwards;
    :func:`select` never sets or reads it."""

    candidate: Candidate
    validation_auroc: float
    fit_seconds: float
    test: dict | None = None

    @property
    def test_auroc(self) -> float | None:
        return None if self.test is None else self.test["auroc"]

    def to_json(self) -> dict:
        return {**self.candidate.to_json(), "validation_auroc": self.validation_auroc,
                "test_auroc": self.test_auroc, "test": self.test,
                "fit_seconds": self.fit_seconds}


@dataclass
class Selection:
    """The outcome of :func:`select`: the picked candidate and every candidate's score."""

    picked: Candidate
    validation_auroc: float
    scores: list[CandidateScore]
    n_train: int
    n_validation_normal: int
    n_validation_anomalies: int
    failed: dict[str, str] = field(default_factory=dict)  # candidate label -> why it failed

    def score_of(self, candidate: Candidate) -> CandidateScore:
        return next(s for s in self.scores if s.candidate == candidate)

    def best_of(self, keep: Callable[[Candidate], bool]) -> CandidateScore:
        """The best validation AUROC among the candidates ``keep`` accepts: the pick a
        smaller grid would have made from the same fits (first of equals)."""
        kept = [s for s in self.scores if keep(s.candidate)]
        if not kept:
            raise KadError("no scored candidate matches")
        return max(kept, key=lambda s: s.validation_auroc)

    def to_json(self) -> dict:
        return {"picked": self.picked.to_json(), "validation_auroc": self.validation_auroc,
                "n_train": self.n_train, "n_validation_normal": self.n_validation_normal,
                "n_validation_anomalies": self.n_validation_anomalies,
                "candidates": [s.to_json() for s in self.scores], "failed": self.failed}


def fresh_detector(spec, seed: int = 0):
    """A new detector from a spec (or an unfitted prototype), seeded where it takes one."""
    from sklearn.base import clone

    from kad.registry import get_detector
    from kad.utils.specs import parse_spec

    if not isinstance(spec, str):
        return clone(spec)
    detector = get_detector(spec)
    if ("random_state" in detector.get_params()
            and "random_state" not in parse_spec(spec, "detector").options):
        detector.set_params(random_state=seed)
    return detector


def select(features: MultiSizeFeatures, candidates: Sequence[Candidate],
           train_rows: np.ndarray, val_rows: np.ndarray, val_y: np.ndarray, *,
           seed: int = 0, make_detector: Callable[[str, int], object] | None = None,
           inspect: Callable[[Candidate, object], None] | None = None,
           progress: Progress | None = None) -> Selection:
    """Fit every candidate on the normal ``train_rows`` and pick the one with the best AUROC
    on ``val_rows`` (labels ``val_y``, 1 = anomaly). Only these rows are read.

    ``make_detector(spec, seed)`` builds a fresh detector (default :func:`fresh_detector`).
    ``inspect(candidate, fitted)`` is called after each candidate is scored, so a caller can
    evaluate the fitted detector elsewhere (the recipes score their test set there) without
    this function ever seeing those rows. A candidate whose detector cannot be fitted on
    these rows (e.g. too few of them) is recorded in ``failed`` and skipped.
    ``progress`` gets the task ``candidates`` (candidates done of all).
    """
    from kad.utils.metrics import evaluate

    train_rows, val_rows = np.asarray(train_rows), np.asarray(val_rows)
    val_y = np.asarray(val_y, dtype=int)
    if len(val_rows) != len(val_y):
        raise KadError(f"{len(val_rows)} validation rows but {len(val_y)} labels")
    if set(np.unique(val_y)) != {0, 1}:
        raise KadError("picking needs labelled validation images of both kinds: normal (0) "
                       "and anomalous (1)")
    if np.intersect1d(train_rows, val_rows).size:
        raise KadError("validation rows must not be among the training rows")
    if not candidates:
        raise KadError("no candidate to pick from")
    make = make_detector or fresh_detector
    scores: list[CandidateScore] = []
    failed: dict[str, str] = {}
    matrices: dict[tuple[str, str], np.ndarray] = {}
    with task(progress, "candidates", len(candidates)) as update:
        for done, candidate in enumerate(candidates, 1):
            rep = candidate.representation
            if not matrices or next(iter(matrices))[0] != rep:  # the grid groups detectors
                matrices = {(rep, "train"): features.matrix(rep, train_rows),
                            (rep, "val"): features.matrix(rep, val_rows)}
            detector = make(candidate.detector, seed)
            start = time.perf_counter()
            try:
                detector.fit(matrices[(rep, "train")])
            except ValueError as exc:
                failed[candidate.label] = str(exc)
                update(done)
                continue
            fit_seconds = time.perf_counter() - start
            auroc = evaluate(val_y, detector.anomaly_score(matrices[(rep, "val")]))["auroc"]
            scores.append(CandidateScore(candidate, float(auroc), fit_seconds))
            if inspect is not None:
                inspect(candidate, detector)
            update(done)
    if not scores:
        raise KadError("no candidate could be fitted: " + "; ".join(
            f"{k}: {v}" for k, v in list(failed.items())[:3]))
    best = max(scores, key=lambda s: s.validation_auroc)  # first of equals: grid order
    return Selection(best.candidate, best.validation_auroc, scores, len(train_rows),
                     int((val_y == 0).sum()), int(val_y.sum()), failed)


@dataclass
class SplitSelection:
    """One outer split of a nested selection: the pick made without the split's test rows,
    then every candidate's test AUROC (filled in after fitting, for reporting) and the
    picked candidate's test metrics."""

    split: str
    seed: int
    fold: int | None
    normal_class: str | None
    selection: Selection
    test: dict  # the picked candidate on the test rows: auroc, auprc, recall
    n_test: int
    n_test_anomalies: int

    @property
    def picked(self) -> Candidate:
        return self.selection.picked

    def to_json(self) -> dict:
        return {"split": self.split, "seed": self.seed, "fold": self.fold,
                "normal_class": self.normal_class, "picked": self.picked.to_json(),
                "validation_auroc": self.selection.validation_auroc,
                "test_auroc": self.test["auroc"], "test": self.test,
                "n_test": self.n_test, "n_test_anomalies": self.n_test_anomalies}


def validation_set(split, n_anomalies: int) -> tuple[np.ndarray, np.ndarray]:
    """The labelled validation rows of a split (as in the paper's Table 2): its held-out
    normal images and ``n_anomalies`` (at most those available) of its spare anomalies,
    drawn with the split's seed. None of them is in the split's test set."""
    n_val = min(int(n_anomalies), len(split.spare_anomalies))
    rng = np.random.default_rng(split.seed)
    anomalies = rng.choice(split.spare_anomalies, size=n_val, replace=False)
    rows = np.concatenate([split.val_normal, anomalies]).astype(int)
    labels = np.r_[np.zeros(len(split.val_normal)), np.ones(n_val)].astype(int)
    return rows, labels


def nested_selection(features: MultiSizeFeatures, splits: Sequence, candidates: Sequence[Candidate],
                     n_anomalies: int, *, make_detector: Callable | None = None,
                     progress: Progress | None = None,
                     ) -> list[SplitSelection]:
    """For every split (a :class:`kad.data.protocols.Split`): pick a candidate with
    :func:`select` on the split's training normals and validation set only, then score the
    split's test rows with every fitted candidate. The test rows are read after each fit,
    outside :func:`select`, and never change which candidate is picked. ``progress`` gets
    the task ``splits`` and, within each, :func:`select`'s ``candidates``."""
    results = []
    with task(progress, "splits", len(splits)) as update:
        for index, split in enumerate(splits, 1):
            results.append(_select_in_split(features, split, candidates, n_anomalies,
                                            make_detector, progress))
            update(index)
    return results


def _select_in_split(features: MultiSizeFeatures, split, candidates: Sequence[Candidate],
                     n_anomalies: int, make_detector: Callable | None,
                     progress: Progress | None) -> SplitSelection:
    """One split of :func:`nested_selection`."""
    from kad.utils.metrics import evaluate

    val_rows, val_y = validation_set(split, n_anomalies)
    test_y = np.asarray(split.test_y, dtype=int)
    test_scores: dict[Candidate, tuple[np.ndarray, float, float]] = {}
    cache: dict[str, np.ndarray] = {}

    def score_test(candidate, detector):
        rep = candidate.representation
        if rep not in cache:
            cache.clear()
            cache[rep] = features.matrix(rep, split.test)
        start = time.perf_counter()
        scores = detector.anomaly_score(cache[rep])
        test_scores[candidate] = (scores, detector.threshold_, time.perf_counter() - start)

    selection = select(features, candidates, split.train, val_rows, val_y, seed=split.seed,
                       make_detector=make_detector, inspect=score_test, progress=progress)
    for score in selection.scores:
        scores, threshold, seconds = test_scores[score.candidate]
        score.test = {**evaluate(test_y, scores, scores > threshold), "score_seconds": seconds}
    return SplitSelection(
        split.name, split.seed, split.fold, split.normal_class, selection,
        selection.score_of(selection.picked).test, len(split.test), int(test_y.sum()))


def summarise_candidates(results: Sequence[SplitSelection]) -> list[dict]:
    """Mean and std over splits of every candidate's validation and test AUROC, in grid
    order, with how often it was picked."""
    from kad.utils.metrics import mean_std

    rows: dict[Candidate, dict] = {}
    for result in results:
        for score in result.selection.scores:
            row = rows.setdefault(score.candidate, {"val": [], "test": [], "fit": []})
            row["val"].append(score.validation_auroc)
            row["test"].append(score.test_auroc)
            row["fit"].append(score.fit_seconds)
    table = []
    for candidate, row in rows.items():
        val_mean, val_std = mean_std(row["val"])
        test_mean, test_std = mean_std(row["test"])
        table.append({**candidate.to_json(), "val_auroc": val_mean, "val_auroc_std": val_std,
                      "test_auroc": test_mean, "test_auroc_std": test_std,
                      "fit_seconds": float(np.mean(row["fit"])), "n_splits": len(row["test"]),
                      "times_picked": sum(r.picked == candidate for r in results),
                      "val_auroc_per_split": row["val"], "test_auroc_per_split": row["test"]})
    return table


@dataclass
class BlockChoice:
    """The picked block, every block's validation AUROC, and the fitted detectors."""

    block: str
    validation_auroc: dict[str, float]
    detectors: dict = field(default_factory=dict, repr=False)
    fit_seconds: dict[str, float] = field(default_factory=dict)


def pick_block(features, train_rows, rows, labels, prototype,
               blocks: list[str] | None = None, fit=None,
               progress: Progress | None = None) -> BlockChoice:
    """The paper's Table 2 pick: the single block of ``features`` (a
    :class:`~kad.features.cache.FeatureSet`) whose detector, fitted on ``train_rows``, ranks the
    labelled ``rows`` best (AUROC against ``labels``, 1 = anomaly). It is :func:`select`
    over one candidate per block, so every pick in kad is made by one loop.

    ``prototype`` is an unfitted detector, cloned per block, unless ``fit(block, x_train)``
    builds and fits one. ``progress`` gets :func:`select`'s task ``candidates``, one per
    block.
    """
    from sklearn.base import clone

    size = int(features.meta["inputs"]["image_size"]) if hasattr(features, "meta") else 0
    multi = MultiSizeFeatures({size: features})
    todo = list(blocks or features.blocks)
    candidates = [Candidate(f"{block}@{size}", block) for block in todo]
    choice = BlockChoice("", {})

    class _Fit:  # the detector select() fits: the caller's, for the candidate's block
        def __init__(self, block):
            self.block = block
            self.fitted = None

        def fit(self, x):
            start = time.perf_counter()
            self.fitted = fit(self.block, x) if fit else clone(prototype).fit(x)
            choice.fit_seconds[self.block] = time.perf_counter() - start
            return self

        def anomaly_score(self, x):
            return self.fitted.anomaly_score(x)

    def keep(candidate, fitted):
        choice.detectors[candidate.detector] = fitted.fitted

    try:
        found = select(multi, candidates, train_rows, rows, labels,
                       # select's make_detector(block, seed)
                       make_detector=lambda block, seed: _Fit(block), inspect=keep,  # noqa: ARG005
                       progress=progress)
    except KadError as exc:
        raise KadError(f"picking a block: {exc}") from exc
    choice.block = found.picked.detector
    choice.validation_auroc = {s.candidate.detector: s.validation_auroc for s in found.scores}
    return choice
