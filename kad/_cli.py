"""Pieces shared by kad's Typer commands: option types, error handling, progress bars.

Diagnostics and progress go to stderr; results go to stdout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import KadError

out = Console()
err = Console(stderr=True)
for _console in (out, err):
    if not _console.is_terminal:  # a log file or a pipe: do not squeeze tables to 80 columns
        _console.width = max(_console.width, 160)

DatasetOpt = Annotated[str, typer.Option(
    "--dataset", "-d",
    help="digits, cifar10, cifar100, svhn, dr, rop, rop-all-grades or folder; options as "
         "NAME:key=value, e.g. 'dr:anomaly_grades=(3,4)'.")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Folder holding the dataset (required for dr, rop, folder).")]
BackboneOpt = Annotated[str, typer.Option(
    "--backbone", "-b", help="NAME[:key=value,...], e.g. mobilenet_v2:alpha=0.35.")]
WeightsOpt = Annotated[str, typer.Option(
    "--weights", "-w", help="imagenet (Keras download and cache), none, or a weights file.")]
ImageSizeOpt = Annotated[int | None, typer.Option(
    "--image-size", help="Network input size in px (default: the backbone's native size).")]
PreprocessingOpt = Annotated[str | None, typer.Option(
    "--preprocessing", help="natural or fundus[:key=value,...] (default: by dataset).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
CacheDirOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Feature cache folder (default $KAD_CACHE_DIR or ~/.cache/kad).")]


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


def handle_errors(func: Callable) -> Callable:
    """Turn kad's errors (and bad values) into one clear line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (KadError, ValueError, FileNotFoundError) as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            err.print("interrupted; finished batches are kept and the next run resumes")
            raise typer.Exit(code=130) from None

    return wrapper


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, driven by ``update(done, total)`` calls."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def load_dataset_option(dataset: str, data_dir: Path | None):
    from .datasets import load_dataset
    from .specs import parse_spec

    spec = parse_spec(dataset, "dataset")
    ds = load_dataset(spec.name, data_dir, **spec.options)
    err.print(ds.summary(), highlight=False)
    return ds


def extract_with_progress(ds, backbone: str, weights: str, image_size: int | None,
                          preprocessing: str | None, batch_size: int = 64,
                          cache_dir: Path | None = None):
    from .features import cached_features, extract_features, plan_extraction

    plan = plan_extraction(ds, backbone, weights, image_size, preprocessing, cache_dir)
    features = cached_features(plan)
    if features is None:
        with progress_bar(f"features {plan.backbone.spec} @{plan.input_size}px") as update:
            features = extract_features(ds, plan.backbone, weights, image_size, preprocessing,
                                        batch_size=batch_size, cache_dir=cache_dir,
                                        progress=update)
    if features.failed:
        shown = "; ".join(f"{k}: {v}" for k, v in list(features.failed.items())[:5])
        err.print(f"[yellow]{len(features.failed)} image(s) could not be read and are left "
                  f"out:[/] {shown}", highlight=False)
    return features
