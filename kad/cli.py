"""The ``kad`` command line. Commands parse, call one library function, and render."""

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
    extract_with_progress,
    handle_errors,
    load_dataset_option,
    out,
)

app = typer.Typer(
    name="kad",
    help="Unsupervised anomaly detection on images with features from every block of an "
         "ImageNet network.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
@handle_errors
def extract(
    dataset: DatasetOpt = "digits",
    data_dir: DataDirOpt = None,
    backbone: BackboneOpt = "inception_resnet_v2",
    weights: WeightsOpt = "imagenet",
    image_size: ImageSizeOpt = None,
    preprocessing: PreprocessingOpt = None,
    batch_size: BatchSizeOpt = 64,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Compute every block's features for a dataset once and cache them."""
    from rich.table import Table

    ds = load_dataset_option(dataset, data_dir)
    features = extract_with_progress(ds, backbone, weights, image_size, preprocessing,
                                     batch_size, cache_dir)
    table = Table(title=f"{features.meta['inputs']['backbone']} features of {ds.name}")
    table.add_column("block")
    table.add_column("dim", justify="right")
    for name in features.blocks:
        table.add_row(name, str(features.dims[name]))
    out.print(table)
    out.print(f"{len(features)} images, {sum(features.dims.values())} features in all, "
              f"cached at {features.path}")


@app.command()
@handle_errors
def detectors() -> None:
    """List the detector plugins (built-in and installed), with their status."""
    from rich.table import Table

    from .registry import list_detectors

    table = Table(title="detectors (entry-point group kad.detectors)")
    for column in ("name", "distribution", "input", "status", "summary"):
        table.add_column(column, overflow="fold")
    for row in list_detectors():
        status = "ok" if row.ok else f"[red]{row.status}[/]"
        table.add_row(row.name, f"{row.distribution} {row.version}",
                      row.input_kind + (" (supervised)" if row.supervised else ""),
                      status, row.summary)
    out.print(table)


@app.command()
@handle_errors
def backbones() -> None:
    """List the backbone plugins (entry-point group kad.backbones)."""
    from rich.table import Table

    from .registry import BACKBONES, status

    table = Table(title="backbones (entry-point group kad.backbones)")
    for column in ("name", "distribution", "status", "summary"):
        table.add_column(column, overflow="fold")
    for row in status(BACKBONES):
        table.add_row(row.name, f"{row.distribution} {row.version}",
                      "ok" if row.ok else f"[red]{row.status}[/]", row.summary)
    out.print(table)


@app.command()
@handle_errors
def preview(
    images: Annotated[list[Path], typer.Argument(help="Image files to show.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path(
        "preview.png"),
    preprocessing: PreprocessingOpt = "fundus",
) -> None:
    """Save a before/after picture of the preprocessing for a few images."""
    from .preview import save_preview

    path = save_preview(list(images), out_path, preprocessing or "fundus")
    out.print(f"wrote {path}")


def _add_subcommands() -> None:
    from kad_recipes.cli import app as recipe_app

    from ._cli_screening import register

    register(app)
    app.add_typer(recipe_app, name="recipe", help="Run the paper's experiments.")


_add_subcommands()


def main() -> None:  # the console script
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
