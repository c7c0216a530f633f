"""What a screening run produces: a row per input, scored or not, and the scores file.

Every input is accounted for: each file handed to :func:`kad.screening.workflow.screen`
ends up either as a :class:`ScoredImage` or as a :class:`NotScored` with the reason, and
:func:`write_scores_csv` writes them all.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kad.errors import KadError
from kad.features.extraction import Scores
from kad.screening.pipeline import Pipeline

NORMAL_LABELS = {"0", "normal", "negative", "no", "false"}
ANOMALY_LABELS = {"1", "abnormal", "anomaly", "anomalous", "positive", "yes", "true"}

SCORED, UNREADABLE, SKIPPED = "scored", "unreadable", "skipped"


@dataclass
class ScoredImage:
    file: str
    score: float
    percentile: float
    flagged: bool
    label: int | None = None
    # conformal p-value against the calibration normals; None for a model fitted without
    # a calibration set
    p_value: float | None = None


@dataclass
class NotScored:
    """An input that was not scored: ``status`` is ``unreadable`` (it could not be decoded
    or is not usable) or ``skipped`` (not an image kad reads, a broken link, missing)."""

    file: str
    status: str
    reason: str


def collect_images(inputs: Sequence[str | Path], exclude: str | Path | None = None,
                   ) -> tuple[list[Path], list[NotScored]]:
    """Image files named directly or found under folders (recursively, sorted), and every
    other input with the reason it is not one; a file given twice is scored once, the
    second listed as skipped. Nothing is decoded. What the folders hold
    under ``exclude`` (``kad score``'s --out folder, when it lies among them) is left
    out, listed once as that folder: its pictures are kad's, not images to score."""
    import os

    from kad.data.datasets.base import list_image_files, skip_reason

    out = None if exclude is None else Path(os.path.abspath(exclude))

    def ours(file) -> bool:
        return out is not None and Path(os.path.abspath(file)).is_relative_to(out)

    files: list[Path] = []
    others: list[NotScored] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images, skipped = list_image_files(path)
            found = len(images) + len(skipped)
            images = [f for f in images if not ours(f)]
            skipped = [(f, why) for f, why in skipped if not ours(f)]
            if len(images) + len(skipped) < found and not any(o.file == str(exclude)
                                                              for o in others):
                others.append(NotScored(str(exclude), SKIPPED, "the --out folder: kad "
                                        "score's own output is not scored"))
            files += images
            others += [NotScored(f, SKIPPED, why) for f, why in skipped]
        elif path.is_file():
            files.append(path)  # named explicitly: try it, a failure is reported per file
        else:
            why = skip_reason(path) if path.is_symlink() else None
            others.append(NotScored(str(path), SKIPPED,
                                    why or "no such file or folder; check the path"))
    unique: dict[str, Path] = {}  # a file given twice (a folder and a name in it) scores once
    for file in files:
        first = unique.setdefault(os.path.abspath(file), file)
        if first is not file:
            alias = "" if str(first) == str(file) else f", as {first}"
            others.append(NotScored(str(file), SKIPPED,
                                    f"given more than once: scored once{alias}"))
    return list(unique.values()), others


def no_images(inputs: Sequence[str | Path], others: Sequence[NotScored],
              what: str = "image files") -> KadError:
    """The error for ``inputs`` in which :func:`collect_images` found no image: each input
    that is not one with its reason, or that the folders are empty."""
    from kad.data.datasets.base import first_few

    given = ", ".join(map(str, inputs))
    if not others:  # folders with nothing in them
        return KadError(f"no {what} in {given}: "
                        f"{'it is an empty folder' if len(inputs) == 1 else 'empty folders'}; "
                        f"give {what} or folders that hold them")
    return KadError(f"no {what} in {given}: "
                    + first_few(f"{Path(o.file).name} ({o.reason})" for o in others))


def read_labels(path: Path) -> dict[str, int]:
    """``image,label`` rows (label normal/abnormal or 0/1) as {key: 0|1}. Keys are the paths
    as written; :func:`match_labels` relates them to files. Read with the same reader as
    every labels CSV of kad (:func:`kad.data.datasets.base.read_table`)."""
    from kad.data.datasets.base import read_table
    from kad.errors import DatasetError

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


def match_labels(files: list[Path], labels: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    """``(label per file (-1 where none), the keys of labels that label no file)``: a file
    is matched by its relative path's suffix, then by its name or stem; the keys left over,
    in the labels file's order, are rows of a labels CSV that label nothing given."""
    by_key: dict[str, tuple[int, str]] = {}
    for key, value in labels.items():
        norm = key.replace("\\", "/").strip("/")
        for variant in (norm, Path(norm).name, Path(norm).stem):
            by_key.setdefault(variant, (value, key))
    out = np.full(len(files), -1)
    used: set[str] = set()
    for i, file in enumerate(files):
        posix = file.as_posix()
        for key in (posix, file.name, file.stem):
            if key in by_key:
                out[i], source = by_key[key]
                used.add(source)
                break
        else:
            for key, value in labels.items():
                if posix.endswith("/" + key.replace("\\", "/").strip("/")):
                    out[i] = value
                    used.add(key)
                    break
    return out, [key for key in labels if key not in used]


def rank(pipeline: Pipeline, files: list[Path], result: Scores,
         labels: np.ndarray | None = None) -> list[ScoredImage]:
    """Readable images, most suspicious first."""
    ok = np.isfinite(result.scores)
    percentiles = pipeline.percentile(np.where(ok, result.scores, 0.0))
    flagged = pipeline.flag(np.where(ok, result.scores, -np.inf))
    p_values = pipeline.p_values(np.where(ok, result.scores, 0.0))
    rows = [
        ScoredImage(str(files[i]), float(result.scores[i]), float(percentiles[i]),
                    bool(flagged[i]),
                    None if labels is None or labels[i] < 0 else int(labels[i]),
                    None if p_values is None else float(p_values[i]))
        for i in np.flatnonzero(ok)
    ]
    return sorted(rows, key=lambda r: -r.score)


#: The columns of ``scores.csv``, in order; ``label`` only when some image has one.
SCORES_COLUMNS = ("file", "status", "score", "p_value", "flagged", "label", "reason")


def score_record(row: ScoredImage | NotScored) -> dict:
    """The fields of ``row``'s line in ``scores.csv`` (:data:`SCORES_COLUMNS`) as plain
    values: numbers, booleans, strings, and None where the cell is blank. ``scores.csv``
    is written from these, and ``kad serve`` answers with them."""
    if isinstance(row, NotScored):
        return {"file": str(row.file), "status": row.status, "score": None, "p_value": None,
                "flagged": None, "label": None, "reason": row.reason}
    return {"file": row.file, "status": SCORED, "score": row.score, "p_value": row.p_value,
            "flagged": row.flagged, "label": row.label, "reason": None}


def _csv_value(value) -> str:
    from kad.utils.files import csv_cell

    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return csv_cell(str(value)) if isinstance(value, str) else str(value)


def write_scores_csv(path: Path, rows: list[ScoredImage], not_scored: list[NotScored]) -> Path:
    """One row per input: the scored images, most suspicious first, then every input that
    was not scored, with its status and the reason (:func:`score_record`). The p-value is
    the conformal one (blank for a model without a calibration set). Written aside and
    renamed when complete (:func:`kad.utils.files.atomic_write`); a file name or reason a
    spreadsheet would read as a formula is escaped with a leading ``'``
    (:func:`kad.utils.files.csv_cell`)."""
    from kad.utils.files import atomic_write

    with atomic_write(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        labelled = any(r.label is not None for r in rows)
        columns = [c for c in SCORES_COLUMNS if c != "label" or labelled]
        writer.writerow(columns)
        for row in [*rows, *not_scored]:
            record = score_record(row)
            writer.writerow([_csv_value(record[c]) for c in columns])
    return path


def display_names(files: Sequence[str | Path],
                  inputs: Sequence[str | Path] | None = None) -> dict[str, str]:
    """Each file's name as a person reads it in the report: its path relative to the
    folder of ``inputs`` (what was given on the command line) that holds it
    (``sub1/x.jpeg``), or the path as given for a file named directly. Without ``inputs``,
    relative to the folder all files share. Where two names still coincide (the same
    relative path under two folders given), both keep the path as given. Keyed by
    ``str(file)``."""
    import os

    files = [Path(f) for f in files]
    if inputs is None:
        parents = [f.parent.as_posix() for f in files]
        same_kind = len({p.startswith("/") for p in parents}) == 1  # all absolute or not
        inputs = [os.path.commonpath(parents)] if parents and same_kind else []
    folders = [Path(i) for i in inputs]
    names: dict[str, str] = {}
    for f in files:
        name = f.as_posix()
        for folder in folders:
            if f != folder and f.is_relative_to(folder):
                name = f.relative_to(folder).as_posix()
                break
        names[str(f)] = name
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {key: (Path(key).as_posix() if counts[name] > 1 else name)
            for key, name in names.items()}
