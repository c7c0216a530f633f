"""Screening: fit once on normal images, score new ones, hand a person a ranked list.

The library side of ``kad fit``, ``kad score`` and ``kad threshold``: :func:`fit_model`,
:func:`screen` and :func:`set_threshold` each do one command's whole job and return a
record the command line renders. Every input is accounted for: each file handed to
:func:`screen` ends up in ``scores.csv`` either scored or with the reason it was not.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kad.errors import KadError
from kad.features.extraction import Scores
from kad.screening.pipeline import Pipeline

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


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[NotScored]]:
    """Image files named directly or found under folders (recursively, sorted), and every
    other input with the reason it is not one. Nothing is decoded."""
    from kad.data.datasets.base import list_image_files, skip_reason

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
    p_values = pipeline.p_values(np.where(ok, result.scores, 0.0))
    rows = [
        ScoredImage(str(files[i]), float(result.scores[i]), float(percentiles[i]),
                    bool(flagged[i]),
                    None if labels is None or labels[i] < 0 else int(labels[i]),
                    None if p_values is None else float(p_values[i]))
        for i in np.flatnonzero(ok)
    ]
    return sorted(rows, key=lambda r: -r.score)


def write_scores_csv(path: Path, rows: list[ScoredImage], not_scored: list[NotScored]) -> Path:
    """One row per input: the scored images, most suspicious first, then every input that
    was not scored, with its status and the reason. The p-value is the conformal one
    (blank for a model without a calibration set)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        labelled = any(r.label is not None for r in rows)
        writer.writerow(["file", "status", "score", "p_value", "flagged",
                         *(["label"] if labelled else []), "reason"])
        for r in rows:
            p_value = "" if r.p_value is None else f"{r.p_value:.6g}"
            writer.writerow([r.file, SCORED, f"{r.score:.6g}", p_value,
                             "yes" if r.flagged else "no",
                             *([("" if r.label is None else r.label)] if labelled else []), ""])
        for other in not_scored:
            writer.writerow([other.file, other.status, "", "", "",
                             *([""] if labelled else []), other.reason])
    return path


# -- kad fit -------------------------------------------------------------------------------


@dataclass
class FitRun:
    """What :func:`fit_model` did: the fitted pipeline, where it was written, the split of
    the dataset (:class:`kad.screening.calibration.FitSplit`) and every image used for nothing, by
    id, with the reason."""

    pipeline: Pipeline
    path: Path
    split: object
    left_out: dict[str, str]

    @property
    def n_fitted(self) -> int:
        return int(self.pipeline.training["n_images"])


def fit_model(dataset, out_path: str | Path, *, backbone: str = "inception_resnet_v2",
              weights: str = "imagenet", image_size: int | str | Sequence[int] | None = None,
              preprocessing: str | None = None, detector: str | Sequence[str] = "knn",
              representation: str | None = None, sensitivity: float | None = None,
              fpr: float | None = None, calibration: float | None = None,
              validation: float | None = None, seed: int = 0, batch_size: int = 64,
              cache_dir: str | Path | None = None, keep_all_blocks: bool = False,
              runtime: str = "auto", progress: ProgressCallback | None = None,
              on_event=None) -> FitRun:
    """Fit the whole pipeline on the normal images of ``dataset`` and save it to
    ``out_path``. The dataset is divided by patient
    (:func:`kad.screening.calibration.plan_fit_split`)
    into images that fit the detector, normals that calibrate the conformal threshold
    (``fpr``), and, with labelled anomalies, images that pick the block and set a
    ``sensitivity`` threshold and images held out to measure the result. ``out_path`` and
    the cache folder are checked for writability before any work; the training images'
    cache entry then keeps only the blocks the model uses unless ``keep_all_blocks``.

    With labelled anomalies, several ``image_size`` values (``"224,448"``) and several
    ``detector`` specs (``"iforest,knn"``), the (input size, block or concatenation,
    detector) with the best AUROC on the selection images is picked first
    (:func:`kad.screening.selection.select`, a grid at each size), then fitted and calibrated as
    one."""
    from kad.detectors.base import uses_maps
    from kad.features.cache import cache_root, check_writable
    from kad.features.extract import extract_features
    from kad.screening.calibration import (
        DEFAULT_CALIBRATION,
        DEFAULT_FPR,
        DEFAULT_VALIDATION,
        min_calibration_size,
        plan_fit_split,
    )
    from kad.screening.pipeline import fit_pipeline
    from kad.screening.selection import (
        MultiSizeFeatures,
        candidate_grid,
        default_image_size,
        fresh_detector,
        parse_sizes,
        select,
    )
    from kad.utils.specs import split_specs

    if dataset.anomaly is None:
        raise KadError(f"{dataset.name} has no normal/abnormal labels; fit on a folder, dr or "
                       "rop dataset")
    if fpr is not None and sensitivity is not None:
        raise KadError("give --fpr or --sensitivity, not both: one threshold is set")
    labelled = bool(np.any(dataset.anomaly))
    if sensitivity is not None and not labelled:
        raise KadError("a sensitivity needs labelled anomalies (an abnormal/ folder); use "
                       "--fpr for a threshold set on normal images alone")
    if labelled:
        representation = representation or "picked"
        if fpr is None and sensitivity is None:
            sensitivity = 0.95
    sizes = parse_sizes(default_image_size(dataset, image_size)) or [None]
    specs = split_specs(detector) if isinstance(detector, str) else list(detector)
    choosing = len(sizes) > 1 or len(specs) > 1
    if choosing:
        from kad.registry import DETECTORS, load
        from kad.utils.specs import parse_spec

        on_maps = [s for s in specs if uses_maps(load(DETECTORS, parse_spec(s, "detector")
                                                      .name))]
        if on_maps:
            raise KadError(f"{', '.join(on_maps)} scores block maps and cannot be chosen "
                           "among detectors of pooled features; fit it on its own, at one "
                           "image size")
    if choosing and not (labelled and representation == "picked"):
        raise KadError(f"{len(sizes)} image sizes and {len(specs)} detectors but nothing to "
                       "choose with: add labelled anomalies (abnormal/), or give one of each")
    image_size = sizes[0]
    calibration = DEFAULT_CALIBRATION if calibration is None else calibration
    validation = DEFAULT_VALIDATION if validation is None else validation
    alpha = fpr if fpr is not None else (DEFAULT_FPR if sensitivity is None else None)
    if alpha is not None:  # before any work: is the calibration share large enough?
        n_cal = len(plan_fit_split(dataset, calibration, validation, seed).calibration)
        if n_cal < min_calibration_size(alpha):
            raise KadError(
                f"a false-positive rate of {alpha:g} needs at least "
                f"{min_calibration_size(alpha)} calibration images, but --calibration "
                f"{calibration:g} of {dataset.name} gives {n_cal}; raise --calibration, add "
                f"normal images, or ask for --fpr {1 / (n_cal + 1):.3g} or more")
    check_writable(out_path, is_file=True, what="--out file")
    check_writable(Path(cache_dir) if cache_dir else cache_root(), what="feature cache folder")
    by_size = {size: extract_features(dataset, backbone, weights, size, preprocessing,
                                      batch_size=batch_size, cache_dir=cache_dir,
                                      progress=progress, on_event=on_event, runtime=runtime)
               for size in sizes}
    multi = MultiSizeFeatures({f.meta["inputs"]["image_size"]: f for f in by_size.values()})
    split = plan_fit_split(dataset, calibration, validation, seed, valid=multi.valid)
    chosen = None
    if choosing:  # on the selection images only; calibration and assessment stay untouched
        chosen = select(multi, candidate_grid(multi, specs, across_sizes=False), split.train,
                        split.selection, split.selection_labels, seed=seed,
                        make_detector=fresh_detector)
        image_size, detector = chosen.picked.sizes[0], chosen.picked.detector
        representation = chosen.picked.block
    else:
        image_size, detector = multi.sizes[0], specs[0]
    features = multi.by_size[image_size]
    pipeline = fit_pipeline(
        dataset, backbone=backbone, weights=weights, image_size=image_size,
        preprocessing=preprocessing, representation=representation or "concat",
        detector=detector, split=split, sensitivity=sensitivity, fpr=fpr,
        batch_size=batch_size, cache_dir=cache_dir, features=features,
        keep_all_blocks=keep_all_blocks, runtime=runtime)
    if chosen is not None:
        pipeline.training["selection"].update(
            picked_candidate=chosen.picked.to_json(),
            picked_validation_auroc=chosen.validation_auroc,
            candidates=[c.to_json() for c in chosen.scores], failed=chosen.failed)
    path = pipeline.save(out_path)
    ids = dataset.ids
    left_out = {str(ids[i]): features.failed.get(str(ids[i]), why)
                for i, why in split.left_out.items()}
    return FitRun(pipeline, Path(path), split, left_out)


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
    heatmaps: object = None  # kad.screening.heatmaps.HeatmapRun, with heatmaps

    @property
    def n_inputs(self) -> int:
        return len(self.rows) + len(self.not_scored)

    def count(self, status: str) -> int:
        if status == SCORED:
            return len(self.rows)
        return sum(other.status == status for other in self.not_scored)


def screen(model: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, *,
           labels: str | Path | None = None, weights: str | None = None,
           engine: str = "local", ray_address: str | None = None,
           heatmaps: bool = False, heatmap_method: str = "auto", grid: int = 8,
           steps: int = 16, runtime: str | None = None,
           progress: ProgressCallback | None = None) -> ScreeningRun:
    """Score every image under ``inputs`` with the model file ``model`` and write
    ``scores.csv`` and ``report.html`` to ``out_dir`` (checked for writability first).
    ``engine="ray"`` scores on a Ray cluster (:func:`kad.features.ray_engine.score_with_ray`).
    With ``heatmaps``, every scored image's heatmap overlays go to ``out_dir/heatmaps``
    and the report shows them (:func:`kad.screening.heatmaps.write_heatmaps`)."""
    from kad.data.datasets import FileSource
    from kad.features.cache import check_writable
    from kad.screening.pipeline import load_pipeline
    from kad.screening.report import write_report

    if engine not in ("local", "ray"):
        raise KadError(f"unknown engine {engine!r}: use local or ray")
    if heatmaps and engine != "local":
        raise KadError("heatmaps are drawn by the local engine; drop --engine ray or "
                       "--heatmaps")
    pipeline = load_pipeline(model)
    if engine == "ray":  # before any work
        from kad.features.ray_engine import check_scorable

        check_scorable(pipeline)
    out_dir = check_writable(Path(out_dir), what="--out folder")
    files, not_scored = collect_images(inputs)
    if not files:
        from kad.data.datasets.base import first_few

        raise KadError(f"no image files in {', '.join(map(str, inputs))}: "
                       + first_few(f"{Path(o.file).name} ({o.reason})" for o in not_scored))
    truth = match_labels(files, read_labels(Path(labels))) if labels else None
    ids = [str(f) for f in files]
    drawn = None
    if heatmaps:
        from kad.screening.heatmaps import write_heatmaps

        drawn = write_heatmaps(pipeline, FileSource(files), ids, out_dir / "heatmaps",
                               method=heatmap_method, grid=grid, steps=steps, weights=weights,
                               runtime=runtime, progress=progress)
        result = drawn.scores
    elif engine == "ray":
        from kad.features.ray_engine import score_with_ray

        result = score_with_ray(pipeline, FileSource(files), ids, address=ray_address,
                                weights=weights, runtime=runtime, progress=progress)
    else:
        result = pipeline.score(FileSource(files), ids=ids, progress=progress, weights=weights,
                                runtime=runtime)
    rows = rank(pipeline, files, result, truth)
    not_scored = [NotScored(f, UNREADABLE, why) for f, why in result.failed.items()] + not_scored
    csv_path = write_scores_csv(out_dir / "scores.csv", rows, not_scored)
    report, metrics = write_report(out_dir / "report.html", pipeline, rows,
                                   {o.file: o.reason for o in not_scored if o.status == UNREADABLE},
                                   [(o.file, o.reason) for o in not_scored
                                    if o.status != UNREADABLE], str(model),
                                   heatmaps=drawn.files if drawn else None)
    return ScreeningRun(rows, not_scored, csv_path, report, metrics, drawn)


# -- kad threshold -------------------------------------------------------------------------


@dataclass
class ThresholdRun:
    """What :func:`set_threshold` did: the updated pipeline, where it was written, how many
    labelled images set the threshold, and the labelled files that could not be used."""

    pipeline: Pipeline
    path: Path
    n_used: int
    not_used: list[NotScored]


def set_threshold(model: str | Path, labels: str | Path | None = None, *,
                  sensitivity: float | None = None, fpr: float | None = None,
                  out_path: str | Path | None = None, weights: str | None = None,
                  progress: ProgressCallback | None = None) -> ThresholdRun:
    """Move the threshold of ``model`` without refitting, and save it: to a false-positive
    rate ``fpr`` on its calibration normals (conformal), or to ``sensitivity`` on a labelled
    validation CSV (``image,label``; paths relative to the CSV's folder or absolute; 0.95
    when only ``labels`` is given)."""
    from kad.data.datasets import FileSource
    from kad.features.cache import check_writable
    from kad.screening.calibration import threshold_at_fpr
    from kad.screening.pipeline import load_pipeline, threshold_at_sensitivity

    if labels is not None and fpr is None and sensitivity is None:
        sensitivity = 0.95
    if (fpr is None) == (sensitivity is None):
        raise KadError("give --fpr ALPHA (no labels needed) or --labels CSV (with "
                       "--sensitivity, 0.95 by default), not both")
    if sensitivity is not None and labels is None:
        raise KadError("--sensitivity needs --labels, a CSV image,label of labelled images")
    pipeline = load_pipeline(model)
    check_writable(Path(out_path or model), is_file=True, what="model file to write")
    if fpr is not None:
        pipeline.threshold = threshold_at_fpr(pipeline, fpr)
        path = pipeline.save(out_path or model)
        return ThresholdRun(pipeline, Path(path), int(pipeline.calibration["n"]), [])
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
