"""``kad fit``, ``kad score`` and ``kad threshold``: the screening workflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._cli import (
    BackboneOpt,
    BatchSizeOpt,
    CacheDirOpt,
    DataDirOpt,
    DatasetOpt,
    ImageSizeOpt,
    PreprocessingOpt,
    WeightsOpt,
    err,
    handle_errors,
    load_dataset_option,
    out,
    progress_bar,
)

ModelArg = Annotated[Path, typer.Argument(help="A model file written by kad fit.")]
SensitivityOpt = Annotated[float | None, typer.Option(
    "--sensitivity", min=0.0, max=1.0,
    help="Set the threshold to flag this share of labelled anomalies.")]


def _fit_split(dataset, validation: float, seed: int):
    """Training normals, and labelled validation rows (held-out normals by patient plus every
    labelled anomaly), when the dataset has anomalies."""
    import numpy as np
    from sklearn.model_selection import GroupShuffleSplit

    anomaly = np.asarray(dataset.anomaly, dtype=bool)
    normal = np.flatnonzero(~anomaly)
    if not anomaly.any():
        return normal, None, None
    groups = np.asarray(dataset.patient if dataset.patient is not None else dataset.ids)
    cut = GroupShuffleSplit(n_splits=1, test_size=validation, random_state=seed)
    train, held = next(cut.split(normal, groups=groups[normal]))
    anomalies = np.flatnonzero(anomaly)
    clash = set(groups[normal[train]]) & set(groups[anomalies])
    train = np.array([i for i in train if groups[normal[i]] not in clash], dtype=int)
    rows = np.r_[normal[held], anomalies]
    labels = np.r_[np.zeros(len(held), int), np.ones(len(anomalies), int)]
    return normal[train], rows, labels


def fit(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Model file to write.")],
    dataset: DatasetOpt = "folder", data_dir: DataDirOpt = None,
    backbone: BackboneOpt = "inception_resnet_v2", weights: WeightsOpt = "imagenet",
    image_size: ImageSizeOpt = None, preprocessing: PreprocessingOpt = None,
    detector: Annotated[str, typer.Option(
        "--detector", help="Detector plugin, NAME[:key=value,...].")] = "iforest",
    representation: Annotated[str | None, typer.Option(
        "--representation", help="concat, block names, or picked (best block on labelled "
                                 "anomalies; the default when there are some).")] = None,
    sensitivity: SensitivityOpt = None,
    validation: Annotated[float, typer.Option(
        "--validation", min=0.05, max=0.9,
        help="Share of normal patients held out, with the labelled anomalies, to pick the "
             "block and set the threshold.")] = 0.25,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: BatchSizeOpt = 64, cache_dir: CacheDirOpt = None,
) -> None:
    """Fit the whole pipeline on normal images and save it as one file."""
    from .pipeline import fit_pipeline

    ds = load_dataset_option(dataset, data_dir)
    if ds.anomaly is None:
        raise typer.BadParameter(
            f"{ds.name} has no normal/abnormal labels; fit on a folder, dr or rop dataset")
    train, rows, labels = _fit_split(ds, validation, seed)
    if rows is not None:
        representation = representation or "picked"
        sensitivity = 0.95 if sensitivity is None else sensitivity
        err.print(f"{len(train)} normal images train; {int((labels == 0).sum())} held-out "
                  f"normal and {int(labels.sum())} abnormal images pick the block and set "
                  f"the threshold at sensitivity {sensitivity:.0%}")
    elif sensitivity is not None:
        raise typer.BadParameter("--sensitivity needs labelled anomalies (an abnormal/ folder); "
                                 "or use kad threshold later")
    with progress_bar("features") as update:
        pipeline = fit_pipeline(
            ds, backbone=backbone, weights=weights, image_size=image_size,
            preprocessing=preprocessing, representation=representation or "concat",
            detector=detector, train_rows=train, labelled_rows=rows, labels=labels,
            sensitivity=sensitivity, batch_size=batch_size, cache_dir=cache_dir,
            progress=update)
    pipeline.save(out_path)
    _show_threshold(pipeline)
    out.print(f"wrote {out_path}: {pipeline.backbone}, blocks "
              f"{', '.join(pipeline.blocks) if len(pipeline.blocks) < 6 else 'concat'}, "
              f"threshold {pipeline.threshold.value:.4g} ({pipeline.threshold.method})")


def _show_threshold(pipeline) -> None:
    details = pipeline.threshold.details
    if pipeline.threshold.method == "sensitivity":
        lo, hi = details["specificity_ci95"]
        out.print(f"threshold {pipeline.threshold.value:.4g}: sensitivity "
                  f"{details['sensitivity']:.1%} on {details['n_anomalous']} labelled anomalies, "
                  f"specificity {details['specificity']:.1%} (95% CI {lo:.1%}–{hi:.1%}) on "
                  f"{details['n_normal']} labelled normals")


def score(
    model: ModelArg,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for scores.csv and "
                                          "report.html.")] = Path("kad-scores"),
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="CSV image,label (normal/abnormal) for AUROC and the ROC curve.")] = None,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="The weights file, if it moved since fitting.")] = None,
) -> None:
    """Score images, most suspicious first: scores.csv and report.html."""
    from .datasets import FileSource
    from .pipeline import load_pipeline
    from .report import write_report
    from .screening import collect_images, match_labels, rank, read_labels, write_scores_csv

    pipeline = load_pipeline(model)
    files, skipped = collect_images(images)
    truth = match_labels(files, read_labels(labels)) if labels else None
    with progress_bar(f"scoring {len(files)} images") as update:
        result = pipeline.score(FileSource(files), ids=[str(f) for f in files],
                                progress=update, weights=weights)
    rows = rank(pipeline, files, result, truth)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_scores_csv(out_dir / "scores.csv", rows, result.failed)
    _, metrics = write_report(out_dir / "report.html", pipeline, rows, result.failed, skipped,
                              str(model))
    flagged = sum(r.flagged for r in rows)
    out.print(f"{len(rows)} images scored, {flagged} flagged; {len(result.failed)} unreadable")
    for file, why in list(result.failed.items())[:10]:
        err.print(f"[yellow]unreadable:[/] {file}: {why}", highlight=False)
    if metrics:
        out.print(f"AUROC {metrics['auroc']:.3f}; at the threshold sensitivity "
                  f"{metrics['sensitivity']:.1%}, specificity {metrics['specificity']:.1%}")
    out.print(f"wrote {out_dir / 'scores.csv'} and {out_dir / 'report.html'}")


def threshold(
    model: ModelArg,
    labels: Annotated[Path, typer.Option("--labels", help="CSV image,label; image paths "
                                         "relative to the CSV's folder or absolute.")],
    sensitivity: Annotated[float, typer.Option("--sensitivity", min=0.0, max=1.0)] = 0.95,
    out_path: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write the updated model here instead of over MODEL.")] = None,
    weights: Annotated[str | None, typer.Option("--weights")] = None,
) -> None:
    """Set the flagging threshold at a target sensitivity on a labelled validation set."""
    import numpy as np

    from .datasets import FileSource
    from .pipeline import load_pipeline, threshold_at_sensitivity
    from .screening import read_labels

    pipeline = load_pipeline(model)
    table = read_labels(labels)
    files = [p if p.is_absolute() else labels.parent / p for p in map(Path, table)]
    y = np.array(list(table.values()))
    with progress_bar(f"scoring {len(files)} labelled images") as update:
        result = pipeline.score(FileSource(files), progress=update, weights=weights)
    ok = np.isfinite(result.scores)
    if not ok.all():
        err.print(f"[yellow]{(~ok).sum()} labelled image(s) could not be read and are left "
                  "out[/]")
    scores = result.scores[ok]
    chosen = threshold_at_sensitivity(scores[y[ok] == 0], scores[y[ok] == 1], sensitivity)
    chosen.details["labels"] = str(labels)
    pipeline.threshold = chosen
    pipeline.save(out_path or model)
    _show_threshold(pipeline)
    out.print(f"wrote {out_path or model}")


def register(app: typer.Typer) -> None:
    for command in (fit, score, threshold):
        app.command(name=command.__name__)(handle_errors(command))
