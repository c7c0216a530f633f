"""``kad fit``, ``kad score`` and ``kad threshold``: the screening workflow.

Each command calls one function of :mod:`kad.screening` and renders its record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .commands import load_dataset
from .options import (
    BackboneOpt,
    BatchSizeOpt,
    CacheDirOpt,
    DataDirOpt,
    DatasetOpt,
    ImageSizeOpt,
    ModelArg,
    PreprocessingOpt,
    SeedOpt,
    WeightsOpt,
)
from .render import NOTHING_KEPT, handle_errors, progress_bar, say, skipped

SensitivityOpt = Annotated[float | None, typer.Option(
    "--sensitivity", min=0.0, max=1.0,
    help="Set the threshold to flag this share of labelled anomalies.")]
MODEL_FILE = ("A model file written by kad fit holds only JSON settings, NumPy arrays, "
              "scikit-learn objects of types kad allows and Keras networks loaded in safe "
              "mode, so loading it cannot run code.")
WeightsOverrideOpt = Annotated[str | None, typer.Option(
    "--weights", help="A weights file to use instead of the one whose path is recorded in "
                      "the model file (when it has moved); it must hold the same tensors.")]


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
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 64, cache_dir: CacheDirOpt = None,
) -> None:
    """Fit the whole pipeline on normal images and save it as one file."""
    from ..screening import fit_model

    ds = load_dataset(dataset, data_dir)
    with progress_bar(f"features of {ds.name}") as update:
        run = fit_model(ds, out_path, backbone=backbone, weights=weights,
                        image_size=image_size, preprocessing=preprocessing, detector=detector,
                        representation=representation, sensitivity=sensitivity,
                        validation=validation, seed=seed, batch_size=batch_size,
                        cache_dir=cache_dir, progress=update)
    skipped(run.left_out.items(), "normal image(s) were not fitted on and are")
    pipeline = run.pipeline
    line = f"fitted on {run.n_fitted} normal images"
    if run.n_labelled_anomalies:
        line += (f"; {run.n_held_out_normal} held-out normal and {run.n_labelled_anomalies} "
                 "abnormal images picked the block and set the threshold")
    say(line)
    _show_threshold(pipeline)
    blocks = ", ".join(pipeline.blocks) if len(pipeline.blocks) < 6 else "concat"
    say(f"wrote {run.path}: {pipeline.backbone}, blocks {blocks}, threshold "
        f"{pipeline.threshold.value:.4g} ({pipeline.threshold.method})")


def _show_threshold(pipeline) -> None:
    details = pipeline.threshold.details
    if pipeline.threshold.method == "sensitivity":
        lo, hi = details["specificity_ci95"]
        say(f"threshold {pipeline.threshold.value:.4g}: sensitivity "
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
    weights: WeightsOverrideOpt = None,
) -> None:
    """Score images, most suspicious first: scores.csv and report.html."""
    from ..screening import SCORED, SKIPPED, UNREADABLE, screen

    with progress_bar("scoring") as update:
        run = screen(model, images, out_dir, labels=labels, weights=weights, progress=update)
    flagged = sum(r.flagged for r in run.rows)
    say(f"{run.n_inputs} files: {run.count(SCORED)} scored ({flagged} flagged), "
        f"{run.count(UNREADABLE)} unreadable, {run.count(SKIPPED)} skipped")
    skipped(((o.file, f"{o.status}: {o.reason}") for o in run.not_scored), "file(s) were")
    if run.metrics:
        m = run.metrics
        say(f"AUROC {m['auroc']:.3f}; at the threshold sensitivity {m['sensitivity']:.1%}, "
            f"specificity {m['specificity']:.1%}")
    say(f"wrote {run.scores_csv} and {run.report}")


score.__doc__ = f"{score.__doc__}\n\n{MODEL_FILE}"


def threshold(
    model: ModelArg,
    labels: Annotated[Path, typer.Option("--labels", help="CSV image,label; image paths "
                                         "relative to the CSV's folder or absolute.")],
    sensitivity: Annotated[float, typer.Option("--sensitivity", min=0.0, max=1.0)] = 0.95,
    out_path: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write the updated model here instead of over MODEL.")] = None,
    weights: WeightsOverrideOpt = None,
) -> None:
    """Set the flagging threshold at a target sensitivity on a labelled validation set."""
    from ..screening import set_threshold

    with progress_bar("scoring labelled images") as update:
        run = set_threshold(model, labels, sensitivity=sensitivity, out_path=out_path,
                            weights=weights, progress=update)
    skipped(((o.file, o.reason) for o in run.not_used), "labelled image(s) could not be "
            "read and are")
    say(f"threshold set on {run.n_used} labelled images")
    _show_threshold(run.pipeline)
    say(f"wrote {run.path}")


def register(app: typer.Typer) -> None:
    app.command()(handle_errors(fit))
    app.command()(handle_errors(score, interrupted=NOTHING_KEPT))
    app.command()(handle_errors(threshold, interrupted=NOTHING_KEPT))
