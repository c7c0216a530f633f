"""Screening: fit once on normal images, score new ones, hand a person a ranked list.

The library side of ``kad fit``, ``kad score`` and ``kad threshold``: :func:`fit_model`,
:func:`screen` and :func:`set_threshold` each do one command's whole job and return a
record the command line renders. Every input is accounted for: each file handed to
:func:`screen` ends up in ``scores.csv`` either scored or with the reason it was not.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import KadError
from .pipeline import Pipeline, Scores

NORMAL_LABELS = {"0", "normal", "negative", "no", "false"}
ANOMALY_LABELS = {"1", "abnormal", "anomaly", "anomalous", "positive", "yes", "true"}

ProgressCallback = Callable[[int, int], None]

SCORED, UNREADABLE, SKIPPED = "scored", "unreadable", "skipped"


@dataclass
class ScoredImage:
    file: str
    score: float
    percentile: float
    flagged: bool
    label: int | None = None


@dataclass
class NotScored:
    """An input that was not scored: ``status`` is ``unreadable`` (it could not be decoded
    or is not usable) or ``skipped`` (not an image kad reads, a broken link, missing)."""

    file: str
    status: str
    reason: str


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[NotScored]]:
    """Image files named directly or found under folders (recursively, sorted), and every
    other input with the reason it is not one. Nothing is decoded."""
    from .datasets.base import list_image_files, skip_reason

    files: list[Path] = []
    others: list[NotScored] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images, skipped = list_image_files(path)
            files += images
            others += [NotScored(f, SKIPPED, why) for f, why in skipped]
        elif path.is_file():
            files.append(path)  # named explicitly: try it, a failure is reported per file
        else:
            why = skip_reason(path) if path.is_symlink() else None
            others.append(NotScored(str(path), SKIPPED,
                                    why or "no such file or folder; check the path"))
    return files, others


def read_labels(path: Path) -> dict[str, int]:
    """``image,label`` rows (label normal/abnormal or 0/1) as {key: 0|1}. Keys are the paths
    as written; :func:`match_labels` relates them to files. Read with the same reader as
    every labels CSV of kad (:func:`kad.datasets.base.read_table`)."""
    from .datasets.base import read_table
    from .errors import DatasetError

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"labels file {path} does not exist")
    labels = {}
    for line, row in read_table(path, ("image", "label")):
        value = row["label"].lower()
        if value in NORMAL_LABELS:
            labels[row["image"]] = 0
        elif value in ANOMALY_LABELS:
            labels[row["image"]] = 1
        else:
            raise DatasetError(
                f"{path}, line {line}: unknown label {row['label']!r}; use normal/abnormal "
                "or 0/1")
    return labels


def match_labels(files: list[Path], labels: dict[str, int]) -> np.ndarray:
    """Label per file (-1 where none): matched by relative path suffix, then by file name or
    stem."""
    by_key: dict[str, int] = {}
    for key, value in labels.items():
        norm = key.replace("\\", "/").strip("/")
        for variant in (norm, Path(norm).name, Path(norm).stem):
            by_key.setdefault(variant, value)
    out = np.full(len(files), -1)
    for i, file in enumerate(files):
        posix = file.as_posix()
        for key in (posix, file.name, file.stem):
            if key in by_key:
                out[i] = by_key[key]
                break
        else:
            for key, value in labels.items():
                if posix.endswith("/" + key.replace("\\", "/").strip("/")):
                    out[i] = value
                    break
    return out


def rank(pipeline: Pipeline, files: list[Path], result: Scores,
         labels: np.ndarray | None = None) -> list[ScoredImage]:
    """Readable images, most suspicious first."""
    ok = np.isfinite(result.scores)
    percentiles = pipeline.percentile(np.where(ok, result.scores, 0.0))
    flagged = pipeline.flag(np.where(ok, result.scores, -np.inf))
    rows = [
        ScoredImage(str(files[i]), float(result.scores[i]), float(percentiles[i]),
                    bool(flagged[i]),
                    None if labels is None or labels[i] < 0 else int(labels[i]))
        for i in np.flatnonzero(ok)
    ]
    return sorted(rows, key=lambda r: -r.score)


def write_scores_csv(path: Path, rows: list[ScoredImage], not_scored: list[NotScored]) -> Path:
    """One row per input: the scored images, most suspicious first, then every input that
    was not scored, with its status and the reason."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        labelled = any(r.label is not None for r in rows)
        writer.writerow(["file", "status", "score", "percentile", "flagged",
                         *(["label"] if labelled else []), "reason"])
        for r in rows:
            writer.writerow([r.file, SCORED, f"{r.score:.6g}", f"{r.percentile:.1f}",
                             "yes" if r.flagged else "no",
                             *([("" if r.label is None else r.label)] if labelled else []), ""])
        for other in not_scored:
            writer.writerow([other.file, other.status, "", "", "",
                             *([""] if labelled else []), other.reason])
    return path


# -- kad fit -------------------------------------------------------------------------------


@dataclass
class FitSplit:
    """Which images of a dataset do what in :func:`fit_model`. ``train`` fits the detector;
    ``labelled`` rows (held-out normals and labelled anomalies, ``labels`` 1 = anomaly)
    pick the block and set the threshold; ``left_out`` names normal images used for
    neither, with the reason."""

    train: np.ndarray
    labelled: np.ndarray | None = None
    labels: np.ndarray | None = None
    left_out: dict[str, str] = field(default_factory=dict)


def split_for_fit(dataset, validation: float, seed: int) -> FitSplit:
    """Training normals, and, when the dataset has anomalies, a share ``validation`` of the
    normal patients held out with every labelled anomaly. Patients stay on one side: a
    patient with an abnormal image never trains."""
    from sklearn.model_selection import GroupShuffleSplit

    anomaly = np.asarray(dataset.anomaly, dtype=bool)
    normal = np.flatnonzero(~anomaly)
    if not anomaly.any():
        return FitSplit(normal)
    groups = np.asarray(dataset.patient if dataset.patient is not None else dataset.ids)
    cut = GroupShuffleSplit(n_splits=1, test_size=validation, random_state=seed)
    train, held = next(cut.split(normal, groups=groups[normal]))
    anomalies = np.flatnonzero(anomaly)
    clash = set(groups[anomalies])
    keep = np.array([groups[normal[i]] not in clash for i in train], dtype=bool)
    left_out = {str(dataset.ids[normal[i]]): f"patient {groups[normal[i]]} also has abnormal "
                "images, which are held out for validation"
                for i in train[~keep]}
    labels = np.r_[np.zeros(len(held), int), np.ones(len(anomalies), int)]
    return FitSplit(normal[train[keep]], np.r_[normal[held], anomalies], labels, left_out)


@dataclass
class FitRun:
    """What :func:`fit_model` did: the fitted pipeline, where it was written, how many
    normal images it was fitted on, and every normal image left out, with the reason."""

    pipeline: Pipeline
    path: Path
    n_fitted: int
    n_held_out_normal: int
    n_labelled_anomalies: int
    left_out: dict[str, str]


def fit_model(dataset, out_path: str | Path, *, backbone: str = "inception_resnet_v2",
              weights: str = "imagenet", image_size: int | None = None,
              preprocessing: str | None = None, detector: str = "iforest",
              representation: str | None = None, sensitivity: float | None = None,
              validation: float = 0.25, seed: int = 0, batch_size: int = 64,
              cache_dir: str | Path | None = None,
              progress: ProgressCallback | None = None) -> FitRun:
    """Fit the whole pipeline on the normal images of ``dataset`` and save it to
    ``out_path`` (see :func:`kad.pipeline.fit_pipeline`)."""
    from .features import extract_features
    from .pipeline import fit_pipeline

    if dataset.anomaly is None:
        raise KadError(f"{dataset.name} has no normal/abnormal labels; fit on a folder, dr or "
                       "rop dataset")
    split = split_for_fit(dataset, validation, seed)
    labelled = split.labelled is not None
    if labelled:
        representation = representation or "picked"
        sensitivity = 0.95 if sensitivity is None else sensitivity
    elif sensitivity is not None:
        raise KadError("a sensitivity needs labelled anomalies (an abnormal/ folder); or set it "
                       "later with kad threshold")
    features = extract_features(dataset, backbone, weights, image_size, preprocessing,
                                batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    left_out = dict(split.left_out)
    for i in split.train:
        reason = features.failed.get(str(dataset.ids[i]))
        if reason is not None:
            left_out[str(dataset.ids[i])] = reason
    pipeline = fit_pipeline(
        dataset, backbone=backbone, weights=weights, image_size=image_size,
        preprocessing=preprocessing, representation=representation or "concat",
        detector=detector, train_rows=split.train, labelled_rows=split.labelled,
        labels=split.labels, sensitivity=sensitivity, batch_size=batch_size,
        cache_dir=cache_dir, features=features)
    path = pipeline.save(out_path)
    labels = split.labels if labelled else np.zeros(0, int)
    return FitRun(pipeline, Path(path), int(pipeline.training["n_images"]),
                  int((labels == 0).sum()), int(labels.sum()), left_out)


# -- kad score -----------------------------------------------------------------------------


@dataclass
class ScreeningRun:
    """What :func:`screen` did. ``rows`` are the scored images, most suspicious first;
    ``not_scored`` every other input with its status and reason: together, every input."""

    rows: list[ScoredImage]
    not_scored: list[NotScored]
    scores_csv: Path
    report: Path
    metrics: dict | None

    @property
    def n_inputs(self) -> int:
        return len(self.rows) + len(self.not_scored)

    def count(self, status: str) -> int:
        if status == SCORED:
            return len(self.rows)
        return sum(other.status == status for other in self.not_scored)


def screen(model: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, *,
           labels: str | Path | None = None, weights: str | None = None,
           progress: ProgressCallback | None = None) -> ScreeningRun:
    """Score every image under ``inputs`` with the model file ``model`` and write
    ``scores.csv`` and ``report.html`` to ``out_dir``."""
    from .datasets import FileSource
    from .pipeline import load_pipeline
    from .report import write_report

    pipeline = load_pipeline(model)
    out_dir = Path(out_dir)
    files, not_scored = collect_images(inputs)
    if not files:
        from .datasets.base import first_few

        raise KadError(f"no image files in {', '.join(map(str, inputs))}: "
                       + first_few(f"{Path(o.file).name} ({o.reason})" for o in not_scored))
    truth = match_labels(files, read_labels(Path(labels))) if labels else None
    result = pipeline.score(FileSource(files), ids=[str(f) for f in files],
                            progress=progress, weights=weights)
    rows = rank(pipeline, files, result, truth)
    not_scored = [NotScored(f, UNREADABLE, why) for f, why in result.failed.items()] + not_scored
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_scores_csv(out_dir / "scores.csv", rows, not_scored)
    report, metrics = write_report(out_dir / "report.html", pipeline, rows,
                                   {o.file: o.reason for o in not_scored if o.status == UNREADABLE},
                                   [(o.file, o.reason) for o in not_scored
                                    if o.status != UNREADABLE], str(model))
    return ScreeningRun(rows, not_scored, csv_path, report, metrics)


# -- kad threshold -------------------------------------------------------------------------


@dataclass
class ThresholdRun:
    """What :func:`set_threshold` did: the updated pipeline, where it was written, how many
    labelled images set the threshold, and the labelled files that could not be used."""

    pipeline: Pipeline
    path: Path
    n_used: int
    not_used: list[NotScored]


def set_threshold(model: str | Path, labels: str | Path, *, sensitivity: float = 0.95,
                  out_path: str | Path | None = None, weights: str | None = None,
                  progress: ProgressCallback | None = None) -> ThresholdRun:
    """Move the threshold of ``model`` to ``sensitivity`` on a labelled validation CSV
    (``image,label``; paths relative to the CSV's folder or absolute) and save it."""
    from .datasets import FileSource
    from .pipeline import load_pipeline, threshold_at_sensitivity

    pipeline = load_pipeline(model)
    labels = Path(labels)
    table = read_labels(labels)
    files = [p if p.is_absolute() else labels.parent / p for p in map(Path, table)]
    y = np.array(list(table.values()))
    result = pipeline.score(FileSource(files), ids=[str(f) for f in files], progress=progress,
                            weights=weights)
    ok = np.isfinite(result.scores)
    scores = result.scores[ok]
    chosen = threshold_at_sensitivity(scores[y[ok] == 0], scores[y[ok] == 1], sensitivity)
    chosen.details["labels"] = str(labels)
    pipeline.threshold = chosen
    path = pipeline.save(out_path or model)
    not_used = [NotScored(f, UNREADABLE, why) for f, why in result.failed.items()]
    return ThresholdRun(pipeline, Path(path), int(ok.sum()), not_used)
