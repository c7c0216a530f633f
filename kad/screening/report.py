"""``report.html``: the page a grader works from after ``kad score``, opened without a server
or network.

Its pictures are files in a folder beside it (``report_files/`` for ``report.html``),
loaded lazily; the worklist's rows and the cards are drawn by the page's script from one
record per image (plain JSON in the page), the first ones at once and the others as they
scroll into view, so a report of thousands of images opens at once
(``benchmarks/report.py``). A copy of the report keeps the folder with it. The page
holds:

- a summary, and a one-line call-out when the batch does not look like the calibration
  normals (:mod:`kad.screening.shift`);
- how the threshold was set (calibration size, method and its guarantee, sensitivity and
  specificity with 95% intervals on held-out patients);
- the score histogram of the calibration normals (the images that set the threshold)
  against the new images, with the threshold; with labels, the ROC curve;
- the worklist: every image, sortable by rank, name, score and p-value, filtered to the
  flagged images or by file name, each row linked to its card;
- one card per image, in the worklist's order: the photograph as taken, what the model saw
  and, with heatmaps, the heatmap as the model saw it and on the photograph, all heatmaps
  on one colour scale with its colour bar.

Files are named by their path relative to what was given on the command line
(:func:`kad.screening.results.display_names`), the full path on hover.
"""

from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kad.errors import KadError
from kad.screening._report_images import THUMB, HeatmapSketches, HeatScale
from kad.screening._report_page import CSS, SCRIPT
from kad.screening.pipeline import Pipeline

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kad.screening.results import ScoredImage
    from kad.screening.shift import BatchShift
    from kad.utils.progress import Progress

__all__ = ["HeatmapSketches", "fit_section", "labelled_metrics", "write_report"]

#: Written into the pictures' folder: a later report may replace a folder holding it.
MARKER = ".kad-report"

def _where(r: ScoredImage) -> str:
    """p = the image's conformal p-value, or its percentile among the training scores for a
    model without a calibration set."""
    if r.p_value is not None:
        return f"p = {r.p_value:.3g}"
    return f"{r.percentile:.0f}th pct of training"


def labelled_metrics(rows: list[ScoredImage], threshold: float) -> dict | None:
    """AUROC, and sensitivity/specificity at the threshold, where labels of both kinds exist."""
    from kad.utils.metrics import evaluate

    labelled = [r for r in rows if r.label is not None]
    y = np.array([r.label for r in labelled])
    if len(labelled) == 0 or len(np.unique(y)) < 2:
        return None
    scores = np.array([r.score for r in labelled])
    flagged = scores > threshold
    metrics = evaluate(y, scores, flagged)
    metrics.update(
        sensitivity=float(flagged[y == 1].mean()), specificity=float((~flagged[y == 0]).mean()),
        n_normal=int((y == 0).sum()), n_anomalous=int((y == 1).sum()),
    )
    return metrics


def _percent_ci(proportion) -> str:
    if proportion is None:
        return "not measured"
    return proportion.text()


def fit_section(pipeline: Pipeline) -> str:
    """How the model was fitted and its threshold set: the calibration set, the threshold
    method and what it guarantees, and the sensitivity and specificity with 95% intervals,
    each with what it was measured on (HTML)."""
    training = pipeline.training
    threshold = pipeline.threshold
    details = threshold.details
    calibration = getattr(pipeline, "calibration", None)
    if calibration:
        rows = [("calibration", calibration["measured_on"])]
    else:
        rows = [("calibration", "none: this model has no p-values and no guaranteed "
                                "false-positive rate (refit with a calibration share)")]
    if threshold.method == "conformal":
        rows += [("threshold", f"{threshold.value:.4g}, conformal at false-positive rate "
                               f"{details['alpha']:.3g} (the {_ordinal(details['rank'])} "
                               "smallest of "
                               f"{details['n_calibration']} calibration scores)"),
                 ("guarantee", details["guarantee"])]
    elif threshold.method == "sensitivity":
        moved = details.get("labels")  # set later by kad threshold on this labels CSV
        rows += [("threshold", f"{threshold.value:.4g}, set to flag "
                               f"{details['target_sensitivity']:.0%} of the labelled "
                               f"anomalies of {moved or 'the selection set'}"),
                 (f"on {moved} (optimistic)" if moved else "at fitting (optimistic)",
                  f"sensitivity {details['sensitivity']:.1%}, specificity "
                  f"{details['specificity']:.1%} on the {details['n_anomalous']} anomalies and "
                  f"{details['n_normal']} normals that set the threshold")]
    else:
        rows.append(("threshold", f"{threshold.value:.4g} ({threshold.method}); no "
                                  "guarantee on the false-positive rate"))
    picked = training.get("selection", {}).get("picked")
    if picked:
        rows.append(("block", f"{picked}, best AUROC "
                              f"{training['selection']['selection_auroc'][picked]:.3f} on "
                              "the selection set"))
    assessment = pipeline.assessed()
    if assessment:
        rows += [("held out", assessment.measured_on),
                 ("sensitivity (held out)", _percent_ci(assessment.sensitivity)),
                 ("specificity (held out)", _percent_ci(assessment.specificity))]
        if assessment.auroc is not None:
            low, high = assessment.auroc_ci95
            rows.append(("AUROC (held out)",
                         f"{assessment.auroc:.3f} (95% CI {low:.3f}–{high:.3f})"))
    else:
        rows.append(("held out", "no labelled images were held out: sensitivity and "
                                 "specificity on new patients were not measured at fitting"))
    notes = list(training.get("split", {}).get("notes", []))
    notes += assessment.notes if assessment else []
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                    for k, v in rows)
    items = "".join(f'<li class="note">{html.escape(n)}</li>' for n in notes)
    return f"<table>{table}</table>" + (f"<ul>{items}</ul>" if items else "")


def _pictures_folder(path: Path) -> Path:
    """The folder of the report's pictures, emptied when an earlier report made it; one
    kad did not make is refused."""
    import shutil

    folder = path.parent / f"{path.stem}_files"
    if folder.exists() or folder.is_symlink():
        if not (folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file()):
            raise KadError(f"{folder} exists and was not written by a kad report; move it "
                           "or write the report elsewhere")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("pictures of the kad report beside this folder\n")
    return folder


def _ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ``11th``, ``21st``, ..."""
    n = int(n)
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _caption(r: ScoredImage, peak: float | None, scale: HeatScale | None = None) -> str:
    label = "" if r.label is None else (" · labelled abnormal" if r.label else
                                        " · labelled normal")
    healthy = "" if peak is None or scale is None else scale.healthy(peak)
    heat = "" if peak is None else f" · heatmap max {peak:.3g}" + (
        f", {healthy}" if healthy else "")
    return (f"{r.score:.4g} · {_where(r)} · {'flagged' if r.flagged else 'not flagged'}"
            f"{label}{heat}")


def _record(i: int, r: ScoredImage, name: str, pictures: str, peak: float | None,
            scale: HeatScale | None = None) -> dict:
    """What the page's script draws an image's worklist row and card from (``pics``: the
    tags of its pictures, ``t`` as taken, ``m`` model input, ``h`` and ``p`` the
    heatmaps)."""
    return {"i": i, "name": name, "file": r.file, "score": float(r.score),
            "p": None if r.p_value is None else float(r.p_value), "flag": int(r.flagged),
            "label": "" if r.label is None else ("abnormal" if r.label else "normal"),
            "pics": pictures, "caption": _caption(r, peak, scale),
            "cells": [f"{r.score:.4g}", "" if r.p_value is None else f"{r.p_value:.3g}",
                      "yes" if r.flagged else "no",
                      "" if r.label is None else ("abnormal" if r.label else "normal"),
                      "" if peak is None else f"{peak:.3g}"]}


def _worklist(rows, names, pictures: list[str], sketches, scale: HeatScale | None) -> str:
    """The worklist's controls and table; its rows are drawn by the page's script from the
    records in ``<script id="records">``, the first ones at once and the others as the
    table scrolls, so thousands of images cost the page nothing on opening."""
    import json

    heat = scale is not None
    head = ('<th data-key="rank" aria-sort="ascending"><button>rank</button></th>'
            '<th data-key="name"><button>file</button></th>'
            '<th data-key="score"><button>score</button></th>'
            '<th data-key="p"><button>p-value</button></th><th>flagged</th><th>label</th>'
            + ('<th title="the largest value of its heatmap, score units per pixel">'
               "heatmap max</th>" if heat else ""))
    records = [_record(i, r, names[r.file], pictures[i], _peak(sketches, r.file), scale)
               for i, r in enumerate(rows)]
    # "</" never closes the script early; the records are data, never run
    data = json.dumps(records, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    n_flagged = sum(r.flagged for r in rows)
    columns = ('<col class="narrow"><col><col class="value"><col class="value">'
               '<col class="narrow"><col class="value">' + ('<col class="value">' if heat else ""))
    return (f'<div class="controls"><label>find a file <input type="search" id="search" '
            f'placeholder="part of a name"></label><label><input type="checkbox" '
            f'id="flagged-only"> flagged only ({n_flagged})</label>'
            f'<span id="shown" class="meta">{len(rows)} of {len(rows)} images shown</span>'
            f'</div><div class="worklist"><table id="worklist" data-heat="{int(heat)}">'
            f"<colgroup>{columns}</colgroup><thead><tr>{head}</tr></thead><tbody></tbody>"
            '</table><button id="more-rows" hidden>more rows</button></div>'
            f'<script type="application/json" id="records">{data}</script>')


def _peak(sketches: HeatmapSketches | None, file: str) -> float | None:
    sketch = sketches.get(file) if sketches else None
    return None if sketch is None else sketch.peak


def _pictures(pipeline, rows, folder: Path, sketches: HeatmapSketches | None,
              scale: HeatScale | None, progress: Progress | None) -> list[str]:
    """Draw every image's pictures into ``folder`` as ``NNNNNt.jpg`` (as taken),
    ``NNNNNm.jpg`` (model input), ``NNNNNh.jpg`` and ``NNNNNp.jpg`` (the heatmaps), NNNNN
    its rank from 0; returns the tags drawn per image."""
    from kad.data.images import resize
    from kad.screening._report_images import (
        draw_overlay,
        on_photograph,
        thumbnails,
        write_jpeg,
    )
    from kad.utils.progress import task

    tags = []
    with task(progress, "report", len(rows)) as update:
        for i, r in enumerate(rows):
            drawn = thumbnails(pipeline, r.file)
            sketch = sketches.get(r.file) if sketches else None
            pictures: list[tuple[np.ndarray, str]] = []
            if drawn is not None:
                taken, seen = drawn
                pictures = [(taken, "t"), (seen, "m")]
                if sketch is not None and scale is not None:
                    pictures.append((draw_overlay(seen, scale.levels(resize(sketch.map, THUMB))),
                                     "h"))
                    back = on_photograph(sketch, taken.shape[:2])
                    if back is not None:
                        pictures.append((draw_overlay(taken, scale.levels(back)), "p"))
            for rgb, tag in pictures:
                write_jpeg(folder / f"{i:05d}{tag}.jpg", rgb)
            tags.append("".join(tag for _, tag in pictures))
            if (i + 1) % 50 == 0 or i + 1 == len(rows):
                update(i + 1)
    return tags


def _colourbar(sketches: HeatmapSketches, scale: HeatScale, maps_from: str | None = None
               ) -> str:
    whose = "" if maps_from is None else f" of {maps_from}"
    anchored = (f"anchored on the calibration normals{whose}" if scale.anchor is not None
                else f"not anchored on the calibration normals{whose}")
    source = ("" if maps_from is None else
              f'<p class="meta" id="maps-from">The heatmaps come from {html.escape(maps_from)}, '
              "not from the model that gave the scores: they show where that model finds "
              "each image unusual, and their colour scale is that model's.</p>")
    return (source + f'<div class="colourbar"><span>0</span><span class="bar" style="background:'
            f'linear-gradient(to right, {scale.gradient_css()})"></span>'
            f'<span class="num">{scale.top:.3g}</span><span>how much a region raises the '
            "score, in score units per pixel of the model's input (heatmaps by "
            f"{html.escape(str(sketches.method) + whose)}); regions at 0 or below are not "
            "coloured"
            f'</span></div><p class="meta" id="heat-scale">One colour scale for every heatmap '
            f"of this report, {html.escape(anchored)}: full colour at {scale.top:.3g}, "
            f"{html.escape(scale.anchored)}. Each card gives its own heatmap's maximum in "
            "numbers" + (" and whether it is above what healthy calibration regions reach"
                         if scale.anchor is not None else "") + ".</p>")


def write_report(path: Path, pipeline: Pipeline, rows: list[ScoredImage],
                 failed: dict[str, str], skipped: list[tuple[str, str]], model_path: str,
                 heatmaps: HeatmapSketches | None = None, names: dict[str, str] | None = None,
                 shift: BatchShift | None = None, progress: Progress | None = None,
                 maps: Pipeline | None = None,
                 unmatched_labels: Sequence[str] = ()) -> tuple[Path, dict | None]:
    """Write the page and its pictures' folder; returns its path and the labelled metrics
    (None without labels).

    ``heatmaps``: the maps collected while they were drawn (a :class:`HeatmapSketches`
    passed as ``on_heatmap`` to :func:`kad.screening.heatmaps.write_heatmaps`); ``names``:
    ``{file: name to show}`` (default: :func:`kad.screening.results.display_names` of the
    files); ``shift``: the batch test (:func:`kad.screening.shift.batch_shift`) to show;
    ``progress`` gets the task ``report`` (images drawn of all); ``maps``: the model that
    drew ``heatmaps`` when it is not ``pipeline`` (``kad score --maps-from``): the heatmaps,
    the pictures of what the model saw and the colour scale are then that model's, and the
    page names its file; ``unmatched_labels``: rows of the labels CSV that label none of
    the images given (:attr:`kad.screening.workflow.ScoredImages.unmatched_labels`)."""
    from kad.screening._report_images import histogram, roc
    from kad.screening.heatmaps import MAPS_MODEL, model_file
    from kad.screening.results import display_names

    path = Path(path)
    names = {**display_names([r.file for r in rows]), **(names or {})}
    metrics = labelled_metrics(rows, pipeline.threshold.value)
    flagged = sum(r.flagged for r in rows)
    info = pipeline.describe()
    summary = [
        ("model", model_path),
        ("backbone", f"{info['backbone']} @ {info['image_size']} px, weights {info['weights']}"),
        ("blocks", ", ".join(info["blocks"]) if len(info["blocks"]) < 6
         else f"{len(info['blocks'])} blocks concatenated"),
        ("detector", info["detector"]),
        ("preprocessing", info["preprocessing"]),
        ("threshold", f"{pipeline.threshold.value:.4g} ({pipeline.threshold.method})"),
        ("trained on", f"{info['training']['n_images']} normal images of "
                       f"{info['training']['dataset']}"),
        ("images scored", str(len(rows))),
        ("flagged", f"{flagged} ({100 * flagged / max(len(rows), 1):.1f}%)"),
        ("unreadable", str(len(failed))),
        ("skipped (not images kad reads, broken links, missing)", str(len(skipped))),
    ]
    maps_from = None
    if maps is not None:
        maps_from = model_file(maps) or MAPS_MODEL
        drew = maps.describe()
        summary.append(("heatmaps from", f"{maps_from}: {drew['detector']}, "
                                         f"{drew['backbone']} @ {drew['image_size']} px"))
    if shift is not None:
        summary.append(("batch against calibration", shift.line()))
    if unmatched_labels:
        from kad.data.datasets.base import first_few

        summary.append(("label rows not used", f"{len(unmatched_labels)} row(s) label none "
                        f"of the images given: {first_few(unmatched_labels)}"))
    if metrics:
        summary += [
            ("AUROC", f"{100 * metrics['auroc']:.1f}% ({metrics['n_anomalous']} abnormal, "
                      f"{metrics['n_normal']} normal labelled)"),
            ("sensitivity at threshold", f"{100 * metrics['sensitivity']:.1f}%"),
            ("specificity at threshold", f"{100 * metrics['specificity']:.1f}%"),
        ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                    for k, v in summary)
    folder = _pictures_folder(path)
    groups = histogram(folder / "scores.png", pipeline, rows)
    plots = (f'<img src="{folder.name}/scores.png" alt="score histogram: '
             f'{html.escape("; ".join(groups))}">')
    if metrics:
        roc(folder / "roc.png", rows, metrics)
        plots += f'<img src="{folder.name}/roc.png" alt="ROC curve">'
    caption = "".join(f"<li>{html.escape(g)}</li>" for g in groups)
    problems = ""
    if failed or skipped:
        items = [f'<tr><td title="{html.escape(str(f))}">{html.escape(names.get(str(f), str(f)))}'
                 f"</td><td>{html.escape(why)}</td></tr>" for f, why in [*failed.items(), *skipped]]
        problems = ("<h2>Not scored</h2><table><tr><th>file</th><th>reason</th></tr>"
                    + "".join(items) + "</table>")
    callout = (f'<p class="shift" id="shift">{html.escape(shift.line())}</p>'
               if shift is not None and shift.shifted else "")
    heat = bool(heatmaps and heatmaps.sketches)
    drawer = maps if maps is not None else pipeline
    scale = heatmaps.scale(drawer) if heat else None
    pictures = _pictures(drawer, rows, folder, heatmaps, scale, progress)
    heat_note = (" Beside each image, its heatmap as the model saw it and on the photograph: "
                 "the brighter, the more that region raises the score." if heat else "")
    cards = ((_colourbar(heatmaps, scale, maps_from) if heat else "")
             + f'<div class="cards" id="cards" data-folder="{html.escape(folder.name)}" '
               f'style="--card:{560 if heat else 300}px"></div>'
               '<button id="more" hidden>show more</button>'
               "<noscript><p>The cards need JavaScript; the worklist above and scores.csv "
               "list every image.</p></noscript>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kad screening report</title>
<style>{CSS}</style></head><body>
<h1>kad screening report</h1>
<div class="meta">{datetime.now():%Y-%m-%d %H:%M} · kad {html.escape(info['versions']['kad'])}
 · red: flagged (score above the threshold) · pictures in {html.escape(folder.name)}/</div>
{callout}
<h2>Summary</h2><table>{table}</table>
<h2>How the threshold was set</h2>{fit_section(pipeline)}
<h2>Scores</h2><div class="plots">{plots}</div><ul class="meta">{caption}</ul>
<h2>Worklist</h2>
<p class="meta">The p-value is the share of calibration normals scoring at least as high:
small means unlike the healthy images; an image is flagged by a conformal threshold at
false-positive rate α exactly when its p-value is at most α. Click a column to sort, a
name to see its card.</p>
{_worklist(rows, names, pictures, heatmaps, scale)}
<h2>Images</h2><p class="meta">In the worklist's order and filter, drawn as they come
into view.{heat_note}</p>
{cards}
{problems}
<script>{SCRIPT}</script>
</body></html>
"""
    from kad.utils.files import write_text

    write_text(path, page)
    return path, metrics
