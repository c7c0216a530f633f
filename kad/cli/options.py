"""Option types shared by kad's commands, and by command plugins (``kad.commands``) that
want the same spelling: ``--dataset``, ``--backbone``, ``--weights`` and the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kad.utils.settings import (
    FUNDUS_INPUT_SIZE,
    MAX_BATCH_SIZE,
    MAX_IMAGE_SIZE,
    MIN_BATCH_SIZE,
    MIN_IMAGE_SIZE,
)

DatasetOpt = Annotated[str, typer.Option(
    "--dataset", "-d",
    help="A kad.data.datasets plugin, NAME[:key=value,...]: digits, cifar10, cifar100, svhn, dr, "
         "rop, rop-all-grades or folder, e.g. 'dr:anomaly_grades=(3,4)'.")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Folder holding the dataset (required for dr, rop, folder).")]
BackboneOpt = Annotated[str, typer.Option(
    "--backbone", "-b", help="NAME[:key=value,...], e.g. mobilenet_v2:alpha=0.35.")]
WeightsOpt = Annotated[str, typer.Option(
    "--weights", "-w", help="imagenet (Keras download and cache), none, or a weights file.")]
#: What --image-size defaults to: kad.features.extraction.default_input_size.
_SIZE_DEFAULT = (f"{FUNDUS_INPUT_SIZE} for fundus photographs (dr, rop and folder datasets, "
                 "unless folder:kind=natural), else the backbone's native size")
ImageSizeOpt = Annotated[int | None, typer.Option(
    "--image-size", min=MIN_IMAGE_SIZE, max=MAX_IMAGE_SIZE,
    help=f"Network input size in px (default: {_SIZE_DEFAULT}).")]
ImageSizesOpt = Annotated[str | None, typer.Option(
    "--image-size", help="Network input size(s) in px, e.g. 224 or 224,448: features are "
                         "extracted and cached per size (default: "
                         f"{_SIZE_DEFAULT}).")]
PreprocessingOpt = Annotated[str | None, typer.Option(
    "--preprocessing", help="natural or fundus[:key=value,...] (default: by dataset); "
                            "fundus:size=input preprocesses at the network's input size.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=MIN_BATCH_SIZE,
                                           max=MAX_BATCH_SIZE, help=(
                                               "Most images per network call; fewer where "
                                               "they would not fit $KAD_BATCH_MEMORY (1 GiB "
                                               "by default) at the input size."))]
CacheDirOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Feature cache folder (default $KAD_CACHE_DIR or ~/.cache/kad).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random choice.")]
ModelArg = Annotated[Path, typer.Argument(
    help="A model file written by kad fit, or a folder written by kad export.")]
EngineOpt = Annotated[str, typer.Option(
    "--engine", help="local (this process) or ray (Ray Data: a cluster, or a local Ray "
                     "started for the run; pip install 'kad\\[ray]').")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="Address of a running Ray cluster (default $RAY_ADDRESS, else a "
                          "local Ray is started).")]
RuntimeOpt = Annotated[str, typer.Option(
    "--runtime", help="Where the network runs: auto (OpenVINO on a CPU when installed, else "
                      "Keras), keras or openvino.")]
