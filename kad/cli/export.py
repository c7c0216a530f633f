"""``kad export``: a fitted model as a folder that scores with kad's core and OpenVINO alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kad.cli.options import ModelArg
from kad.cli.render import NOTHING_KEPT, handle_errors, note, say


def export(
    model: ModelArg,
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder to write (written aside and renamed when complete; an "
                            "existing non-empty one only with --overwrite).")],
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an earlier export in --out (a folder holding anything "
                            "else is refused).")] = False,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="A weights file to use instead of the one whose path is recorded "
                          "in the model file (when it has moved); it must hold the same "
                          "tensors.")] = None,
) -> None:
    """Export a fitted model for scoring without TensorFlow: the network as OpenVINO IR,
    the preprocessing, detector and threshold as the model file's plain data. Score it
    with kad score DIR IMAGES (pip install 'kad\\[openvino]' is enough)."""
    from kad.screening.export import export_pipeline

    run = export_pipeline(model, out_dir, overwrite=overwrite, weights=weights,
                          log_line=lambda line: note(line))
    for text in run.notes:
        note(text, label="note:")
    say(f"{'replaced' if run.replaced else 'wrote'} {run.path}: the network with "
        f"{len(run.outputs)} output(s) as OpenVINO IR, and the pipeline; score it with "
        f"kad score {run.path} IMAGES")


def register(app: typer.Typer) -> None:
    app.command()(handle_errors(export, interrupted=NOTHING_KEPT))
