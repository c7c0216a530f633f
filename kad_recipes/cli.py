"""``kad recipe …``: the paper's experiments as commands.

Each command parses options, calls one ``run_table*`` function, renders a rich table shaped
like the paper's, and writes ``results.json``, ``results.csv`` and plots to ``--out``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from kad.cli.options import (
    BackboneOpt,
    BatchSizeOpt,
    CacheDirOpt,
    DataDirOpt,
    DatasetOpt,
    ImageSizesOpt,
    PreprocessingOpt,
    RuntimeOpt,
    WeightsOpt,
)
from kad.cli.render import RichProgress, handle_errors, note, say, skipped, stdout, table
from kad.utils.metrics import percent

from .common import RecipeOptions, default_out, plot_rocs, write_results

app = typer.Typer(no_args_is_help=True, help="Run the paper's experiments.")

DetectorsOpt = Annotated[str, typer.Option(
    "--detectors", help="Comma-separated detector plugins, each NAME[:key=value,...].")]
InputsOpt = Annotated[str, typer.Option(
    "--inputs", help="What detectors see: pixels (raw-pixel baselines), features, or both.")]
RepresentationOpt = Annotated[str, typer.Option(
    "--representation", help="concat (every block), a block name, or block1,block2.")]
SeedsOpt = Annotated[int | None, typer.Option(
    "--seeds", min=1, help="Repetitions (default: 5 for medical data, 1 for natural).")]
FoldsOpt = Annotated[int, typer.Option("--folds", min=2, help="Cross-validation folds.")]
LimitOpt = Annotated[int | None, typer.Option(
    "--limit", min=2, help="At most N images per class and split (per label for medical).")]
ClassesOpt = Annotated[str | None, typer.Option(
    "--classes", help="Natural images: only these normal classes (comma-separated).")]
PixelSizeOpt = Annotated[int | None, typer.Option(
    "--pixel-size", min=8, help="Image side for pixel inputs (default 32 px).")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", "-o", help="Results folder (default kad-results/<recipe>-<time>).")]


def _split(text: str | None) -> list[str] | None:
    """Split a comma-separated list; 'iforest,knn:n_neighbors=5,method=kth' is two specs."""
    from kad.utils.specs import split_specs

    return split_specs(text) if text else None


def _options(given: dict, **fixed) -> RecipeOptions:
    """The :class:`RecipeOptions` of a command from its parameters (``locals()`` at its
    start, where every parameter named like a field is that field) and ``fixed`` values:
    one place where options become settings, so none is dropped on the way."""
    from dataclasses import fields

    from kad.screening.selection import parse_sizes

    kw = {f.name: given[f.name] for f in fields(RecipeOptions) if f.name in given}
    kw.update(fixed)
    for name in ("detectors", "inputs", "classes"):
        kw[name] = _split(kw.get(name))
    sizes = parse_sizes(kw.get("image_size"))
    kw["image_size"] = sizes[0] if sizes and len(sizes) == 1 else sizes
    return RecipeOptions(**kw)


def _bench(options: RecipeOptions, progress: RichProgress):
    """The recipe's data, with its summary and every image it could not use on stderr."""
    from .common import Workbench

    return Workbench(options, log=note, progress=progress, report_skipped=skipped)


@contextmanager
def _results_folder(options: RecipeOptions, recipe: str):
    """The results folder (``--out``, or a new one under kad-results/), locked for the whole
    run before any work (a second run with the same --out stops, naming the holder), with
    a staging folder inside it: the results appear together when the run completes, and
    an interrupted or failed run leaves the folder as it was."""
    from kad.features.cache import check_writable
    from kad.utils.files import staged_output

    options.out = check_writable(options.out or default_out(recipe), what="--out folder")
    with staged_output(options.out) as stage:
        yield stage


def _finish(result, stage, started: float, title: str, more=None) -> Path:
    """Write the results into the staging folder (``more(folder)`` adds files) and put
    them into place together."""
    folder = stage.path
    write_results(folder, result.recipe, result.bench, result.runs, result.summary,
                  {**result.extra, "seconds": time.perf_counter() - started})
    if result.curves:
        from kad.utils.metrics import mean_std

        aurocs = {label: mean_std(r.auroc for r in result.runs if r.label == label)[0]
                  for label in result.curves}
        plot_rocs(folder / "roc.png", result.curves, aurocs, title)
    if more is not None:
        more(folder)
    replaced = stage.publish()
    if any(r.supervised for r in result.runs):
        note("columns marked [supervised] were trained with labelled anomalies: an upper "
             "bound, not an unsupervised result", label="note:")
    if replaced:
        note(f"replaced the earlier {', '.join(p.name for p in replaced)} in {stage.out}")
    note(f"results in {stage.out} ({time.perf_counter() - started:.1f} s)")
    return stage.out


def _table(title: str, row_label: str, rows: dict[str, dict[str, str]]):
    columns: list[str] = []
    for cells in rows.values():
        columns += [c for c in cells if c not in columns]
    return table(title, [row_label, *columns],
                 ([label, *(cells.get(c, "—") for c in columns)] for label, cells in rows.items()),
                 right=columns)


@app.command()
@handle_errors
def table1(
    dataset: DatasetOpt = "digits", data_dir: DataDirOpt = None,
    backbone: BackboneOpt = "inception_resnet_v2", weights: WeightsOpt = "imagenet",
    image_size: ImageSizesOpt = None, preprocessing: PreprocessingOpt = None,
    detectors: DetectorsOpt = "iforest", inputs: InputsOpt = "pixels,features",
    representation: RepresentationOpt = "concat", seeds: SeedsOpt = None,
    folds: FoldsOpt = 5, limit: LimitOpt = None, classes: ClassesOpt = None,
    pixel_size: PixelSizeOpt = None, batch_size: BatchSizeOpt = 64,
    cache_dir: CacheDirOpt = None, out: OutOpt = None,
    runtime: RuntimeOpt = "auto",
    per_split: Annotated[bool, typer.Option("--per-split", help="Also show every split.")] = False,
) -> None:
    """Table 1: novelty detection (AUROC % mean ± std), detectors as columns."""
    from .table1 import run_table1

    options = _options(locals())
    started = time.perf_counter()
    progress = RichProgress()
    with _results_folder(options, "table1") as stage:
        result = run_table1(options, progress=progress, bench=_bench(options, progress))
        _finish(result, stage, started, f"Table 1 — {result.bench.dataset.name}")
    name = result.bench.dataset.name
    stdout.print(_table("Table 1 — novelty detection, AUROC %", "dataset", {
        name: {row["column"]: percent(row["auroc"], row["auroc_std"]) for row in result.summary}}))
    stdout.print(_table(f"{name}: every metric (supplementary tables 12-14)", "detector (input)", {
        row["column"]: {
            "AUROC %": percent(row["auroc"], row["auroc_std"]),
            "AUPRC %": percent(row["auprc"], row["auprc_std"]),
            "recall % at threshold": percent(row["recall"], row["recall_std"]),
            "fit s": f"{row['fit_seconds']:.2f}", "score s": f"{row['score_seconds']:.2f}",
        } for row in result.summary}))
    if per_split:
        per = {}
        for run in result.runs:
            per.setdefault(run.split, {})[run.column] = percent(run.auroc)
        stdout.print(_table("per split, AUROC %", "split", per))


@app.command()
@handle_errors
def table2(
    dataset: DatasetOpt = "digits", data_dir: DataDirOpt = None,
    backbone: BackboneOpt = "inception_resnet_v2", weights: WeightsOpt = "imagenet",
    image_size: ImageSizesOpt = None, preprocessing: PreprocessingOpt = None,
    detectors: DetectorsOpt = "iforest", seeds: SeedsOpt = None, folds: FoldsOpt = 5,
    limit: LimitOpt = None, classes: ClassesOpt = None, batch_size: BatchSizeOpt = 64,
    cache_dir: CacheDirOpt = None, out: OutOpt = None,
    runtime: RuntimeOpt = "auto",
    n_anomalies: Annotated[float | None, typer.Option(
        "--n-anomalies", help="Labelled validation anomalies: a count, or a fraction of the "
                              "dataset (default 0.03).")] = None,
) -> None:
    """Table 2: pick the best block with a few labelled anomalies."""
    from .table2 import plot_blocks, plot_candidates, run_table2

    options = _options(locals(), inputs="features")
    started = time.perf_counter()
    progress = RichProgress()

    def plots(folder: Path) -> None:
        plot_blocks(folder / "blocks.png", result.extra["blocks"],
                    f"{options.detectors[0]} per block — {result.bench.dataset.name}")
        plot_candidates(folder / "candidates.png", result.extra["candidates"],
                        f"{result.bench.dataset.name}: test AUROC per block")

    with _results_folder(options, "table2") as stage:
        result = run_table2(options, n_anomalies, progress=progress,
                            bench=_bench(options, progress))
        _finish(result, stage, started, "", more=plots)
    cells = {("Concatenation" if row["representation"] == "concat"
              else "Best (picked) representation"): percent(row["auroc"], row["auroc_std"])
             for row in result.summary}
    stdout.print(_table(f"Table 2 — {result.extra['n_validation_anomalies']} labelled "
                     "anomalies, AUROC %", "dataset", {result.bench.dataset.name: cells}))
    stdout.print(_table("per block (Supplementary Sect. 10), AUROC %", "block", {
        b["block"]: {"validation": percent(b["val_auroc"], b["val_auroc_std"]),
                     "test": percent(b["test_auroc"], b["test_auroc_std"])}
        for b in result.extra["blocks"]}))
    picked = result.extra["picked_blocks"]
    say("picked: " + ", ".join(f"{b} ×{picked.count(b)}" for b in dict.fromkeys(picked)))
    picked = result.extra["picked"]
    stdout.print(_table("picked (input size, block, detector) per split, by validation "
                        "AUROC inside the training folds", "split", {
        row["split"]: {"picked": row["picked"]["label"],
                       "validation %": percent(row["validation_auroc"]),
                       "test %": percent(row["test_auroc"])}
        for row in picked["per_split"]}))
    say(f"picked triple: test AUROC {percent(picked['auroc'], picked['auroc_std'])}; "
        + ", ".join(f"{label} ×{n}" for label, n in picked["counts"].items()))


@app.command()
@handle_errors
def table3(
    dataset: DatasetOpt = "digits", data_dir: DataDirOpt = None,
    backbone: BackboneOpt = "inception_resnet_v2", weights: WeightsOpt = "imagenet",
    image_size: ImageSizesOpt = None, preprocessing: PreprocessingOpt = None,
    detectors: DetectorsOpt = "iforest", inputs: InputsOpt = "features",
    representation: RepresentationOpt = "concat", seeds: SeedsOpt = None,
    folds: FoldsOpt = 5, limit: LimitOpt = None, classes: ClassesOpt = None,
    pixel_size: PixelSizeOpt = None, batch_size: BatchSizeOpt = 64,
    cache_dir: CacheDirOpt = None, out: OutOpt = None,
    runtime: RuntimeOpt = "auto",
    ratios: Annotated[str | None, typer.Option(
        "--ratios", help="Anomaly ratios in training, e.g. 0.01,0.02,0.03 (default: the "
                         "paper's, by dataset).")] = None,
) -> None:
    """Table 3: anomalies mixed into training at ratios ρ."""
    from .table3 import run_table3

    options = _options(locals())
    started = time.perf_counter()
    ratio_list = [float(r) for r in _split(ratios)] if ratios else None
    progress = RichProgress()
    with _results_folder(options, "table3") as stage:
        result = run_table3(options, ratio_list, progress=progress,
                            bench=_bench(options, progress))
        _finish(result, stage, started, f"Table 3 — {result.bench.dataset.name}")
    rows: dict[str, dict[str, str]] = {}
    for row in result.summary:
        rows.setdefault(row["column"], {})[f"ρ={row['ratio']:.0%}"] = percent(
            row["auroc"], row["auroc_std"])
    stdout.print(_table(f"Table 3 — {result.bench.dataset.name}, anomalies in training, AUROC %",
                     "detector", rows))
