"""``kad extract``, ``kad preview``, ``kad detectors`` and ``kad backbones``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kad.cli.options import (
    BackboneOpt,
    BatchSizeOpt,
    CacheDirOpt,
    DataDirOpt,
    DatasetOpt,
    EngineOpt,
    ImageSizeOpt,
    PreprocessingOpt,
    RayAddressOpt,
    RuntimeOpt,
    WeightsOpt,
)
from kad.cli.render import RichProgress, handle_errors, note, say, skipped, stdout, table


def load_dataset(dataset: str, data_dir: Path | None, patient_pattern: str | None = None):
    """The dataset an option names, with its summary (and what it skipped) on stderr; with
    ``patient_pattern`` (a folder dataset's patients from file names), how many patients
    and images per patient it found."""
    from kad.data.datasets import load_dataset as load

    options = {} if patient_pattern is None else {"patient_pattern": patient_pattern}
    ds = load(dataset, data_dir, **options)
    note(ds.summary())
    if patient_pattern is not None:
        import numpy as np

        counts = np.unique(np.asarray(ds.patient, dtype=str), return_counts=True)[1]
        say(f"--patient-pattern found {len(counts)} patients in {len(ds)} images: "
            f"{counts.min()} to {counts.max()} images per patient "
            f"({counts.mean():.1f} on average)")
    return ds


def extract(
    dataset: DatasetOpt = "digits",
    data_dir: DataDirOpt = None,
    backbone: BackboneOpt = "inception_resnet_v2",
    weights: WeightsOpt = "imagenet",
    image_size: ImageSizeOpt = None,
    preprocessing: PreprocessingOpt = None,
    batch_size: BatchSizeOpt = 64,
    cache_dir: CacheDirOpt = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="i/N: compute the i-th of N disjoint shares (0 <= i < N); the last "
                        "shard to finish joins them into the entry.")] = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    runtime: RuntimeOpt = "auto",
) -> None:
    """Compute every block's features for a dataset once and cache them."""
    from kad.features.extract import extract_features
    from kad.features.runtime import resolve_runtime
    from kad.features.shards import find_shards, parse_shard

    ds = load_dataset(dataset, data_dir)
    choice = resolve_runtime(runtime)  # on this machine, for every engine and shard
    note(f"runtime: {choice.name} ({choice.reason})")
    part = parse_shard(shard) if shard else None
    features = extract_features(ds, backbone, weights, image_size, preprocessing,
                                batch_size=batch_size, cache_dir=cache_dir,
                                progress=RichProgress(), on_event=lambda e: note(e.message),
                                shard=part, engine=engine, ray_address=ray_address,
                                runtime=runtime)
    skipped(features.failed.items(), "image(s) could not be used")
    if "shard" in features.meta:
        entry = features.path.parent / features.path.name.split(".shard-")[0]
        missing = sorted({i for i in range(part[1])} - {
            s.index for s in find_shards(entry) if s.count == part[1] and s.complete})
        say(f"shard {part[0]}/{part[1]} done at {features.path}; waiting for shard(s) "
            f"{', '.join(map(str, missing))} (the last one to finish joins them, or run "
            f"kad cache merge {entry.name})")
        return
    stdout.print(table(f"{features.meta['inputs']['backbone']} features of {ds.name}",
                    ["block", "dim"], ((b, features.dims[b]) for b in features.blocks),
                    right=["dim"]))
    used = int(features.valid.sum())
    say(f"{len(features)} images: {used} with features, {len(features) - used} left out; "
        f"{sum(features.dims.values())} features in all, cached at {features.path}")


def detectors() -> None:
    """List the detector plugins (built-in and installed), with their status."""
    from kad.registry import DETECTOR, list_detectors

    rows = ((r.name, f"{r.distribution} {r.version}",
             r.input_kind + (" (supervised)" if r.supervised else ""), r.status, r.summary)
            for r in list_detectors())
    stdout.print(table(f"detectors (entry-point group {DETECTOR.group})",
                    ["name", "distribution", "input", "status", "summary"], rows))


def backbones() -> None:
    """List the backbone plugins (entry-point group kad.backbones)."""
    from kad.features.backbones import list_backbones
    from kad.registry import BACKBONE

    rows = ((r.name, f"{r.distribution} {r.version}", r.status, r.summary)
            for r in list_backbones())
    stdout.print(table(f"backbones (entry-point group {BACKBONE.group})",
                    ["name", "distribution", "status", "summary"], rows))


def preview(
    images: Annotated[list[Path], typer.Argument(
        help="Image files or folders to show (at most 32 images; the others are listed).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path(
        "preview.png"),
    preprocessing: PreprocessingOpt = "fundus",
) -> None:
    """Save a before/after picture of the preprocessing for a few images."""
    from kad.screening.workflow import preview_images

    run = preview_images(list(images), out_path, preprocessing or "fundus")
    skipped(run.left_out, "input(s) are not in the preview")
    say(f"wrote {run.path}: {len(run.shown)} of {run.n_inputs} inputs shown")
    if run.replaced:
        note(f"replaced the earlier {run.path}")


def register(app: typer.Typer) -> None:
    app.command()(handle_errors(extract))
    for command in (detectors, backbones, preview):
        app.command()(handle_errors(command))
