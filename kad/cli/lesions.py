"""``kad lesions``: how well a model's heatmaps point at lesions marked in masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kad.cli.options import ModelArg
from kad.cli.render import (
    NOTHING_KEPT,
    RichProgress,
    handle_errors,
    note,
    say,
    skipped,
    stdout,
    table,
)
from kad.cli.screening import (
    GridOpt,
    HeatmapMethodOpt,
    ModelRuntimeOpt,
    StepsOpt,
    WeightsOverrideOpt,
)


def lesions(
    model: ModelArg,
    images: Annotated[list[Path], typer.Argument(
        help="Photographs with lesions (files or folders).")],
    masks: Annotated[Path, typer.Option(
        "--masks", help="Folder of masks <stem>_<KIND>.png: KIND MA, HE, EX or SE marks "
                        "lesions, OD the optic disc.")],
    normals: Annotated[list[Path] | None, typer.Option(
        "--normals", help="Photographs without lesions (files or folders; repeatable): "
                          "adds the image AUROC of lesion against normal.")] = None,
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for lesions.csv and summary.json (an earlier run's are "
                            "replaced, together at the end).")] = Path("kad-lesions"),
    near: Annotated[float, typer.Option(
        "--near", min=0.0, max=0.5,
        help="Pointing tolerance, a share of the photograph's width.")] = 0.01,
    disc_margin: Annotated[float, typer.Option(
        "--disc-margin", min=0.0, max=0.5,
        help="A miss within this share of the width of the optic disc counts as on it.")
    ] = 0.05,
    eval_side: Annotated[int, typer.Option(
        "--eval-side", min=32,
        help="Pixel AUROC and AUPRO are measured on a grid of at most this many px a "
             "side.")] = 1024,
    heatmap_method: HeatmapMethodOpt = "auto",
    grid: GridOpt = 8,
    steps: StepsOpt = 16,
    weights: WeightsOverrideOpt = None,
    runtime: ModelRuntimeOpt = None,
) -> None:
    """Measure where a model's heatmaps point on photographs with lesion masks: strict
    pointing (the map's maximum on a lesion pixel) with a 95 % interval, pointing within a
    tolerance, pixel AUROC inside the fundus, AUPRO up to 30 % false positives, image
    AUROC with --normals, misses on the optic disc and hits by lesion kind."""
    from kad.screening.lesions import KIND_NAMES, measure_lesions

    run = measure_lesions(model, images, masks, out_dir, normals=normals,
                          method=heatmap_method, grid=grid, steps=steps, weights=weights,
                          runtime=runtime, near=near, disc_margin=disc_margin,
                          eval_side=eval_side, progress=RichProgress())
    s = run.summary
    skipped(((r.id, f"{r.status}: {r.reason}") for r in run.results if r.hit is None),
            "photograph(s) were not measured")
    skipped(((r.id, f"{r.status}: {r.reason}") for r in run.normals if r.status != "normal"),
            "normal photograph(s) were not scored")
    cells = s.row()
    stdout.print(table(f"lesions: {s.n} photographs", ["measure", "value"], cells.items()))
    say(f"{len(run.results)} photographs: {s.n} measured; {s.hits} strict hits, "
        f"{s.misses} misses ({s.misses_on_disc} of {s.misses_with_disc} with a disc mask on "
        f"or within {100 * s.settings['disc_margin']:g} % of the width of the optic disc); "
        f"chance (lesion share of the fundus) {100 * s.chance:.1f} %")
    if s.image_auroc is not None:
        say(f"image AUROC {s.image_auroc:.3f}: {s.n} lesion against {s.n_normals} normal "
            "photographs")
    say("hits by kind: " + ", ".join(
        f"{KIND_NAMES[k]} {s.hits_by_kind[k]} of {s.photographs_by_kind[k]} photographs"
        for k in s.hits_by_kind if s.photographs_by_kind[k]))
    note(f"heatmaps by {run.method}; {run.seconds:.0f} s")
    say(f"wrote {run.csv} and {run.json}")
    if run.replaced:
        note(f"replaced the earlier {', '.join(p.name for p in run.replaced)} in {out_dir}")


def register(app: typer.Typer) -> None:
    app.command()(handle_errors(lesions, interrupted=NOTHING_KEPT))
