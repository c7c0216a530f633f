"""``kad fit``, ``kad score`` and ``kad threshold``: the screening workflow.

Each command calls one function of :mod:`kad.screening.workflow` and renders its record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kad.cli.commands import load_dataset
from kad.cli.options import (
    BackboneOpt,
    BatchSizeOpt,
    CacheDirOpt,
    DataDirOpt,
    DatasetOpt,
    EngineOpt,
    ImageSizesOpt,
    ModelArg,
    PreprocessingOpt,
    RayAddressOpt,
    RuntimeOpt,
    SeedOpt,
    WeightsOpt,
)
from kad.cli.render import (
    MODEL_NOT_WRITTEN,
    NOTHING_KEPT,
    SCORES_NOT_WRITTEN,
    RichProgress,
    handle_errors,
    note,
    say,
    skipped,
)

HeatmapMethodOpt = Annotated[str, typer.Option(
    "--heatmap-method", help="auto (the model's lesion maps model where it has one, else "
                             "the detector's own map, else the gradient through the "
                             "pooling, else occlusion), gradient, occlusion or detector (the "
                             "model's own).")]
GridOpt = Annotated[int, typer.Option("--grid", min=2, help="Occlusion grid (cells a side).")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1,
                                       help="Integrated-gradient steps of the gradient maps.")]
SensitivityOpt = Annotated[float | None, typer.Option(
    "--sensitivity", min=0.0, max=1.0,
    help="Set the threshold to flag this share of labelled anomalies.")]
MODEL_FILE = ("A model file written by kad fit holds only JSON settings, NumPy arrays, "
              "scikit-learn objects of types kad allows and Keras networks loaded in safe "
              "mode, so loading it cannot run code.")
WeightsOverrideOpt = Annotated[str | None, typer.Option(
    "--weights", help="A weights file to use instead of the one whose path is recorded in "
                      "the model file (when it has moved); it must hold the same tensors.")]
ModelRuntimeOpt = Annotated[str | None, typer.Option(
    "--runtime", help="Where the network runs, heatmaps included: auto, keras or openvino "
                      "(default: the runtime the model was fitted with).")]


OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace the --out file if it exists (refused otherwise).")]
FprOpt = Annotated[float | None, typer.Option(
    "--fpr", min=0.0, max=1.0,
    help="Set the threshold so that a healthy image is flagged with probability at most "
         "this (conformal, on the calibration normals; no labelled anomalies needed).")]


def fit(
    out_path: Annotated[Path, typer.Option(
        "--out", "-o", help="Model file to write (an existing one only with --overwrite).")],
    dataset: DatasetOpt = "folder", data_dir: DataDirOpt = None,
    backbone: BackboneOpt = "inception_resnet_v2", weights: WeightsOpt = "imagenet",
    image_size: ImageSizesOpt = None, preprocessing: PreprocessingOpt = None,
    detector: Annotated[str, typer.Option(
        "--detector", help="Detector plugin, NAME[:key=value,...] (default knn: the best "
                           "without labels, see benchmarks/evidence.py); with labelled "
                           "anomalies, several (iforest,knn) to pick from.")] = "knn",
    representation: Annotated[str | None, typer.Option(
        "--representation", help="concat, block names, or picked (best block on labelled "
                                 "anomalies; the default when there are some).")] = None,
    fpr: FprOpt = None,
    sensitivity: SensitivityOpt = None,
    calibration: Annotated[float, typer.Option(
        "--calibration", min=0.0, max=0.9,
        help="Share of normal patients kept aside to calibrate the threshold and the "
             "p-values; never used to fit or pick a block.")] = 0.2,
    selection: Annotated[float, typer.Option(
        "--selection", min=0.0, max=0.9,
        help="Share of normal patients held out, with the labelled anomalies, to pick the "
             "block, set a sensitivity threshold and measure the result.")] = 0.25,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 64, cache_dir: CacheDirOpt = None,
    runtime: RuntimeOpt = "auto",
    precision: Annotated[str, typer.Option(
        "--precision", help="float32 (default) or int8: the network quantized by NNCF on "
                            "the training images, on OpenVINO (pip install 'kad\\[int8]'); "
                            "the model then scores with that network.")] = "float32",
    patient_pattern: Annotated[str | None, typer.Option(
        "--patient-pattern", metavar="REGEX",
        help="Patient ids from the file names of a folder dataset, instead of "
             "patients.csv: the first group of this regular expression, else its whole "
             "match (e.g. '^(\\d+)_' for the digits before the first underscore).")] = None,
    keep_all_blocks: Annotated[bool, typer.Option(
        "--keep-all-blocks", help="Keep every block of the training images in the feature "
                                  "cache (by default only the blocks the model uses).")] = False,
    heatmap_scale: Annotated[bool, typer.Option(
        "--heatmap-scale/--no-heatmap-scale",
        help="Make the heatmaps of up to 64 calibration normals, so that report heatmaps "
             "share a colour scale anchored on healthy images (--no-heatmap-scale saves "
             "their cost; reports then scale on their own maps).")] = True,
    maps: Annotated[str, typer.Option(
        "--maps", metavar="DETECTOR",
        help="Also fit a lesion maps model on the same images and store it in the model "
             "file: a detector that draws its own maps (NAME[:key=value,...]), whose maps "
             "kad score --heatmaps then draws while the model gives every score. auto: "
             "patchknn:sampling=coreset,bank_size=10000 for fundus photographs (the best "
             "lesion maps measured, benchmarks/lesions.py), none for other images or a "
             "detector that draws its own maps; none: no maps model.")] = "auto",
    maps_size: Annotated[int | None, typer.Option(
        "--maps-size", min=32, help="The lesion maps model's input size in pixels "
                                    "(default: twice the model's).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fit the whole pipeline on normal images and save it as one file."""
    from kad.screening.calibration import fit_summary
    from kad.screening.workflow import fit_model

    ds = load_dataset(dataset, data_dir, patient_pattern)
    run = fit_model(ds, out_path, backbone=backbone, weights=weights,
                    image_size=image_size, preprocessing=preprocessing, detector=detector,
                    representation=representation, fpr=fpr, sensitivity=sensitivity,
                    calibration=calibration, selection=selection, seed=seed,
                    batch_size=batch_size, cache_dir=cache_dir,
                    keep_all_blocks=keep_all_blocks, runtime=runtime,
                    heatmap_scale=heatmap_scale, progress=RichProgress(), overwrite=overwrite,
                    precision=precision, maps=maps, maps_size=maps_size)
    skipped(run.left_out.items(), "image(s) were used for nothing")
    parts = run.split.describe()
    selection, assessment = parts["selection"], parts["assessment"]
    if selection["anomalous"]:  # the summary below says how many trained and calibrate
        say(f"{selection['normal']} normal and {selection['anomalous']} abnormal images pick "
            f"the block; {assessment['normal']} normal and {assessment['anomalous']} "
            "abnormal are held out to measure the result")
    picked = run.pipeline.training["selection"].get("picked_candidate")
    if picked:
        say(f"picked {picked['label']} (AUROC "
            f"{run.pipeline.training['selection']['picked_selection_auroc']:.3f} on the "
            "selection images)")
    for text in fit_summary(run.pipeline).lines():  # the split's notes among them
        say(text)
    pipeline = run.pipeline
    note(f"runtime: {pipeline.runtime}" + (
        f", int8 (calibrated on {pipeline.quantization['images']} training images)"
        if pipeline.quantization else ""))
    if pipeline.maps is not None:
        drawn = pipeline.maps
        say(f"lesion maps: {type(drawn.detector).__name__} at {drawn.image_size} px on "
            f"{', '.join(drawn.blocks)}, fitted on the same {drawn.training['n_images']} "
            "images; kad score --heatmaps draws its maps (--maps none fits without it)")
    blocks = ", ".join(pipeline.blocks) if len(pipeline.blocks) < 6 else "concat"
    say(f"{'replaced' if run.replaced else 'wrote'} {run.path}: {pipeline.backbone}, "
        f"blocks {blocks}, threshold {pipeline.threshold.value:.4g} ({pipeline.threshold.method})")
    pruned = pipeline.training.get("pruned")
    if pruned and pruned["removed_blocks"]:
        note(f"the feature cache keeps only the model's blocks: {pruned['removed_blocks']} "
             f"blocks removed, {pruned['freed_bytes'] / 2**20:.1f} MiB freed "
             "(--keep-all-blocks keeps them)")


def score(
    model: ModelArg,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for scores.csv and report.html (an earlier run's are "
                            "replaced, all together at the end; one run at a time).")] = Path(
        "kad-scores"),
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="CSV image,label (normal/abnormal) for AUROC and the ROC curve.")] = None,
    weights: WeightsOverrideOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    heatmaps: Annotated[bool, typer.Option(
        "--heatmaps", help="Also draw, for every scored image, where the score comes from: "
                           "overlays in OUT/heatmaps/ and in the report, and each "
                           "map itself as a float32 .npy array with a .json sidecar "
                           "saying where it lies on the photograph. A model with a lesion "
                           "maps model (kad fit --maps) draws them with it, unless "
                           "--heatmap-method names a method.")] = False,
    maps_from: Annotated[Path | None, typer.Option(
        "--maps-from", metavar="MAPS.kad",
        help="With --heatmaps: draw the heatmaps with this other model file (e.g. a patch "
             "kNN model at a higher resolution) while MODEL alone gives the scores, "
             "p-values and flags; the report's colour scale is then this model's. It uses "
             "its own recorded weights (--weights is MODEL's).")] = None,
    heatmap_method: HeatmapMethodOpt = "auto",
    grid: GridOpt = 8,
    steps: StepsOpt = 16,
    runtime: ModelRuntimeOpt = None,
) -> None:
    """Score images, most suspicious first: scores.csv and report.html."""
    from kad.screening.workflow import SCORED, SKIPPED, UNREADABLE, screen

    run = screen(model, images, out_dir, labels=labels, weights=weights, engine=engine,
                 ray_address=ray_address, heatmaps=heatmaps, heatmap_method=heatmap_method,
                 grid=grid, steps=steps, runtime=runtime, maps_from=maps_from,
                 progress=RichProgress())
    flagged = sum(r.flagged for r in run.rows)
    say(f"{run.n_inputs} files: {run.count(SCORED)} scored ({flagged} flagged), "
        f"{run.count(UNREADABLE)} unreadable, {run.count(SKIPPED)} skipped")
    skipped(((o.file, f"{o.status}: {o.reason}") for o in run.not_scored),
            "file(s) were not scored")
    if labels is not None:
        say(_labelled_line(run.rows, run.metrics))
        if run.unmatched_labels:
            from kad.data.datasets.base import first_few

            note(f"{len(run.unmatched_labels)} row(s) of {labels} label none of the images "
                 f"given, so they were not used: {first_few(run.unmatched_labels)}",
                 label="labels:")
    if run.shift is not None and run.shift.shifted:
        note(run.shift.line(), label="batch:")
    if run.heatmaps:
        drawn = run.heatmaps
        whose = f" from {drawn.maps_from}" if drawn.maps_from else ""
        say(f"heatmaps by {drawn.method}{whose}: {drawn.forward_passes} network passes, "
            f"{1000 * drawn.seconds / max(len(run.rows), 1):.0f} ms per image, in "
            f"{out_dir / 'heatmaps'}")
    say(f"wrote {run.scores_csv} and {run.report}")
    if run.replaced:
        note(f"replaced the earlier {', '.join(p.name for p in run.replaced)} in {out_dir}")
    for path in run.earlier:
        note(f"{path} is an earlier run's: this run drew no heatmaps (--heatmaps replaces "
             "them)", label="note:")


def _labelled_line(rows, metrics: dict | None) -> str:
    """What ``--labels`` measured, on how many of the scored images, or why nothing."""
    abnormal, normal = (sum(r.label == value for r in rows) for value in (1, 0))
    counted = (f"{abnormal} abnormal and {normal} normal of the {len(rows)} scored images "
               "have a label in --labels")
    if not metrics:
        return f"no AUROC: {counted}; it needs both"
    return (f"AUROC {metrics['auroc']:.3f} ({counted}); at the threshold sensitivity "
            f"{metrics['sensitivity']:.1%}, specificity {metrics['specificity']:.1%}")


score.__doc__ = f"{score.__doc__}\n\n{MODEL_FILE}"


def threshold(
    model: ModelArg,
    fpr: FprOpt = None,
    sensitivity: Annotated[float | None, typer.Option(
        "--sensitivity", min=0.0, max=1.0,
        help="Flag this share of the labelled anomalies of --labels.")] = None,
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="CSV image,label for --sensitivity; image paths relative to the "
                         "CSV's folder or absolute.")] = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write the updated model to this new file (or use --in-place).")
    ] = None,
    in_place: Annotated[bool, typer.Option(
        "--in-place", help="Rewrite MODEL itself with the new threshold.")] = False,
    overwrite: OverwriteOpt = False,
    weights: WeightsOverrideOpt = None,
) -> None:
    """Move the flagging threshold without refitting: to a false-positive rate (--fpr) or to
    a sensitivity on a labelled validation set (--sensitivity with --labels). The updated
    model goes to --out NEW.kad, or over MODEL with --in-place; never over MODEL unasked."""
    from kad.screening.calibration import fit_summary
    from kad.screening.workflow import set_threshold

    run = set_threshold(model, labels, sensitivity=sensitivity, fpr=fpr, out_path=out_path,
                        weights=weights, progress=RichProgress(), in_place=in_place,
                        overwrite=overwrite)
    skipped(((o.file, o.reason) for o in run.not_used), "labelled image(s) could not be read")
    for text in fit_summary(run.pipeline).lines():
        say(text)
    say(f"wrote {run.path}")


def explain(
    model: ModelArg,
    image: Annotated[Path, typer.Argument(help="The image file to explain.")],
    out_path: Annotated[Path, typer.Option(
        "--out", "-o", help="PNG of the heatmap over the image as the model saw it; the "
                            "map itself goes beside it (.npy, float32, and .json).")] = Path(
        "explain.png"),
    original: Annotated[Path | None, typer.Option(
        "--original", help="Also write the heatmap over the photograph as taken here.")] = None,
    heatmap_method: HeatmapMethodOpt = "auto",
    grid: GridOpt = 8,
    steps: StepsOpt = 16,
    weights: WeightsOverrideOpt = None,
    runtime: ModelRuntimeOpt = None,
) -> None:
    """Show where one image's score comes from: a heatmap of how much each region raises it."""
    from kad.screening.heatmaps import explain_file
    from kad.screening.pipeline import load_pipeline

    pipeline = load_pipeline(model)
    e = explain_file(pipeline, image, out_path, original=original, method=heatmap_method,
                     grid=grid, steps=steps, weights=weights, runtime=runtime)
    p_values = pipeline.p_values([e.score])
    where = (f"p-value {p_values[0]:.3g}" if p_values is not None
             else f"{e.percentile:.0f}th percentile of the training scores")
    by = e.method if e.maps_from is None else f"{e.method} of {e.maps_from}"
    line = (f"{e.file}: score {e.score:.4g}, {where}, "
            f"{'flagged' if e.flagged else 'not flagged'} (threshold {e.threshold:.4g}); map by "
            f"{by}, {e.forward_passes} network passes; peak at row {e.peak[0]}, column "
            f"{e.peak[1]} of {e.image_size} px")
    if e.explained is not None:
        line += f"; the map sums to {e.attributed:.4g} of {e.explained:.4g} explained"
    say(line)
    say(f"wrote {e.seen_png}" + (f", {e.original_png}" if e.original_png else "")
        + (f" and the map itself, {e.map_npy} (with {e.map_npy.with_suffix('.json').name})"
           if e.map_npy else ""))
    if e.replaced:
        note(f"replaced the earlier {', '.join(map(str, e.replaced))}")


def register(app: typer.Typer) -> None:
    app.command()(handle_errors(fit, interrupted=MODEL_NOT_WRITTEN))
    app.command()(handle_errors(score, interrupted=SCORES_NOT_WRITTEN))
    app.command()(handle_errors(threshold, interrupted=NOTHING_KEPT))
    app.command()(handle_errors(explain, interrupted=NOTHING_KEPT))
