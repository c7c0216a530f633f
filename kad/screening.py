"""Screening: fit once on normal images, score new ones, hand a person a ranked list.

The library side of ``kad fit``, ``kad score`` and ``kad threshold``: collecting image
files, reading a labels CSV, scoring a folder as a stream, and the ranked records that
``scores.csv`` and ``report.html`` are written from.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError, KadError
from .images import is_image_file
from .pipeline import Pipeline, Scores

NORMAL_LABELS = {"0", "normal", "negative", "no", "false"}
ANOMALY_LABELS = {"1", "abnormal", "anomaly", "anomalous", "positive", "yes", "true"}


@dataclass
class ScoredImage:
    file: str
    score: float
    percentile: float
    flagged: bool
    label: int | None = None


def collect_images(inputs: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files named directly or found under folders (recursively, sorted), and the
    files that were skipped with the reason."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if is_image_file(child):
                    files.append(child)
                elif not child.name.startswith("."):
                    skipped.append((str(child), "not an image file"))
        elif path.is_file():
            files.append(path)  # named explicitly: try it, a failure is reported per file
        else:
            raise KadError(f"no such file or folder: {path}")
    if not files:
        raise KadError(f"no image files found in {', '.join(map(str, inputs))}")
    return files, skipped


def read_labels(path: Path) -> dict[str, int]:
    """``image,label`` rows (label normal/abnormal or 0/1) as {key: 0|1}. Keys are the paths
    as written; :func:`match_labels` relates them to files."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"labels file {path} does not exist")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "image" not in columns or "label" not in columns:
            raise DatasetError(f"{path} needs columns image,label; found {reader.fieldnames}")
        labels = {}
        for number, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            value = row["label"].lower()
            if value in NORMAL_LABELS:
                labels[row["image"]] = 0
            elif value in ANOMALY_LABELS:
                labels[row["image"]] = 1
            else:
                raise DatasetError(
                    f"{path}, row {number}: unknown label {row['label']!r}; use normal/abnormal "
                    "or 0/1"
                )
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


def write_scores_csv(path: Path, rows: list[ScoredImage], failed: dict[str, str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        header = ["file", "score", "percentile", "flagged"]
        labelled = any(r.label is not None for r in rows)
        writer.writerow(header + (["label"] if labelled else []) + ["error"])
        for r in rows:
            line = [r.file, f"{r.score:.6g}", f"{r.percentile:.1f}", "yes" if r.flagged else "no"]
            if labelled:
                line.append("" if r.label is None else r.label)
            writer.writerow(line + [""])
        for file, reason in failed.items():
            writer.writerow([file, "", "", ""] + ([""] if labelled else []) + [reason])
    return path


def labelled_metrics(rows: list[ScoredImage], threshold: float) -> dict | None:
    """AUROC, and sensitivity/specificity at the threshold, where labels of both kinds exist."""
    from .metrics import evaluate

    labelled = [r for r in rows if r.label is not None]
    y = np.array([r.label for r in labelled])
    if len(labelled) == 0 or len(np.unique(y)) < 2:
        return None
    scores = np.array([r.score for r in labelled])
    flagged = scores > threshold
    metrics = evaluate(y, scores, flagged)
    metrics.update(
        sensitivity=float(flagged[y == 1].mean()), specificity=float((~flagged[y == 0]).mean()),
        n_normal=int((y == 0).sum()), n_anomalous=int((y == 1).sum()),
    )
    return metrics
