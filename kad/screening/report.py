"""``report.html``: one self-contained page a person can open without a server or network.

Every picture is inlined as a base64 PNG: thumbnails of the most and least suspicious
images, each as the photograph was taken beside what the model saw (after preprocessing),
with its score and conformal p-value; the score distribution of the training normals
against the new images; how the threshold was set (calibration size, method and its
guarantee, and sensitivity and specificity with 95% intervals on held-out patients); and,
when labels are given, the ROC curve with its AUROC and the operating point of the
threshold.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kad.errors import ImageReadError
from kad.screening.pipeline import Pipeline

if TYPE_CHECKING:
    from kad.screening.results import ScoredImage

THUMB = 160

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555;font-size:13px}table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:THUMBpx;font-size:11px;overflow-wrap:anywhere}
figure.heat{width:calc(3 * THUMBpx + 24px)}
figure img{width:THUMBpx;height:THUMBpx;border:3px solid #ccc;border-radius:4px}
figure.flag img{border-color:#d33}.num{font-variant-numeric:tabular-nums}
figure.pair{width:calc(2*THUMBpx + 14px)}.pair .views{display:flex;gap:4px}
.pair .views div{width:THUMBpx;text-align:center;color:#666}
.pair img.taken{object-fit:contain;background:#111}
.note{color:#8a4b00}
.plots img{max-width:520px;margin-right:16px}
""".replace("THUMB", str(THUMB))


def _png(image_rgb01: np.ndarray) -> str:
    import cv2

    rgb = np.clip(image_rgb01 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumbnails(pipeline: Pipeline, file: str) -> tuple[str, str] | None:
    """The photograph as taken (aspect ratio kept) and what the model saw, as PNG URIs."""
    from kad.data.images import read_image, resize
    from kad.data.preprocessing import get_preprocessing

    try:
        prep = get_preprocessing(pipeline.preprocessing)  # a large JPEG decoded reduced
        taken = read_image(file, min_side=prep.source_side(pipeline.image_size))
        seen = prep(taken)
    except ImageReadError:
        return None
    height, width = taken.shape[:2]
    scale = THUMB / max(height, width)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    return (_png(resize(taken.astype(np.float32) / 255.0, shape)),
            _png(resize(resize(seen, pipeline.image_size), THUMB)))


def _distribution(pipeline: Pipeline, rows: list[ScoredImage]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = np.asarray(pipeline.training["scores"])
    new = np.array([r.score for r in rows])
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    bins = np.histogram_bin_edges(np.r_[train, new], bins=40)
    ax.hist(train, bins=bins, density=True, alpha=0.55, label="training normals")
    labels = np.array([-1 if r.label is None else r.label for r in rows])
    if (labels >= 0).any():
        for value, name in ((0, "new: labelled normal"), (1, "new: labelled abnormal")):
            if (labels == value).any():
                ax.hist(new[labels == value], bins=bins, density=True, alpha=0.55, label=name)
        if (labels < 0).any():
            ax.hist(new[labels < 0], bins=bins, density=True, alpha=0.4, label="new: unlabelled")
    else:
        ax.hist(new, bins=bins, density=True, alpha=0.55, label="new images")
    ax.axvline(pipeline.threshold.value, color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel("anomaly score (higher = more suspicious)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    uri = _figure_png(fig)
    plt.close(fig)
    return uri


def _roc(rows: list[ScoredImage], metrics: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kad.utils.metrics import roc

    labelled = [r for r in rows if r.label is not None]
    fpr, tpr = roc([r.label for r in labelled], [r.score for r in labelled])
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot(fpr, tpr, lw=1.5, label=f"AUROC {100 * metrics['auroc']:.1f}%")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "o", color="#d33",
            label=f"threshold: sens {100 * metrics['sensitivity']:.0f}%, "
                  f"spec {100 * metrics['specificity']:.0f}%")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=8, loc="lower right")
    uri = _figure_png(fig)
    plt.close(fig)
    return uri


def _where(r: ScoredImage) -> str:
    """p = the image's conformal p-value, or its percentile among the training scores for a
    model without a calibration set."""
    if r.p_value is not None:
        return f"p = {r.p_value:.3g}"
    return f"{r.percentile:.0f}th pct of training"


def _overlay_thumbnail(path) -> str | None:
    """A heatmap overlay PNG written by :func:`kad.screening.heatmaps.save_overlays`, as a
    thumbnail."""
    from kad.data.images import read_image, resize

    if path is None:
        return None
    try:
        return _png(resize(read_image(path), THUMB).astype(np.float32) / 255.0)
    except ImageReadError:
        return None


def _gallery(pipeline: Pipeline, rows: list[ScoredImage], heatmaps: dict | None = None) -> str:
    cells = []
    for r in rows:
        uris = _thumbnails(pipeline, r.file)
        label = "" if r.label is None else (" · labelled abnormal" if r.label else
                                            " · labelled normal")
        if uris:
            views = (f'<div><img class="taken" src="{uris[0]}" alt="as taken"><br>as taken'
                     f'</div><div><img src="{uris[1]}" alt="model input"><br>model input</div>')
        else:
            views = "<div>(unreadable)</div>"
        drawn = (heatmaps or {}).get(r.file)
        if drawn is not None:
            for part, what in ((drawn.seen, "as the model saw it"),
                               (drawn.original, "on the photograph")):
                heat = _overlay_thumbnail(part)
                if heat:
                    views += (f'<div><img src="{heat}" alt="heatmap {what}" '
                              f'title="heatmap {what}"><br>heatmap {what}</div>')
        cells.append(
            f'<figure class="pair{" flag" if r.flagged else ""}{" heat" if drawn else ""}">'
            f'<div class="views">{views}'
            f'</div><figcaption><b class="num">{r.score:.4g}</b> · {_where(r)}{label}<br>'
            f"{html.escape(Path(r.file).name)}</figcaption></figure>"
        )
    return '<div class="grid">' + "".join(cells) + "</div>"


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
                               f"{details['alpha']:g} (the {details['rank']}-th smallest of "
                               f"{details['n_calibration']} calibration scores)"),
                 ("guarantee", details["guarantee"])]
    elif threshold.method == "sensitivity":
        rows += [("threshold", f"{threshold.value:.4g}, set to flag "
                               f"{details['target_sensitivity']:.0%} of the labelled "
                               "anomalies of the selection set"),
                 ("at fitting (optimistic)",
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


def _ranked_table(rows: list[ScoredImage], limit: int = 50) -> str:
    head = "<tr><th>rank</th><th>file</th><th>score</th><th>p-value</th><th>flagged</th></tr>"
    body = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(Path(r.file).name)}</td>"
        f'<td class="num">{r.score:.4g}</td>'
        f'<td class="num">{"" if r.p_value is None else f"{r.p_value:.3g}"}</td>'
        f"<td>{'yes' if r.flagged else 'no'}</td></tr>"
        for i, r in enumerate(rows[:limit]))
    more = f"<p class=meta>and {len(rows) - limit} more in scores.csv</p>" if (
        len(rows) > limit) else ""
    return f"<table>{head}{body}</table>{more}"


def write_report(path: Path, pipeline: Pipeline, rows: list[ScoredImage],
                 failed: dict[str, str], skipped: list[tuple[str, str]], model_path: str,
                 n_thumbnails: int = 12, heatmaps: dict | None = None,
                 ) -> tuple[Path, dict | None]:
    """Write the page; returns its path and the labelled metrics (None without labels).

    ``heatmaps`` ({file: :class:`kad.screening.heatmaps.OverlayFiles`}, from
    :func:`kad.screening.heatmaps.write_heatmaps`) adds, for the most suspicious images, the heatmap
    over the image as the model saw it and over the photograph."""
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
    if metrics:
        summary += [
            ("AUROC", f"{100 * metrics['auroc']:.1f}% ({metrics['n_anomalous']} abnormal, "
                      f"{metrics['n_normal']} normal labelled)"),
            ("sensitivity at threshold", f"{100 * metrics['sensitivity']:.1f}%"),
            ("specificity at threshold", f"{100 * metrics['specificity']:.1f}%"),
        ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                    for k, v in summary)
    k = min(n_thumbnails, len(rows))
    plots = f'<img src="{_distribution(pipeline, rows)}" alt="score distribution">'
    if metrics:
        plots += f'<img src="{_roc(rows, metrics)}" alt="ROC curve">'
    problems = ""
    if failed or skipped:
        items = [f"<tr><td>{html.escape(f)}</td><td>{html.escape(why)}</td></tr>"
                 for f, why in [*failed.items(), *skipped]]
        problems = ("<h2>Not scored</h2><table><tr><th>file</th><th>reason</th></tr>"
                    + "".join(items) + "</table>")
    heat_note = ('<p class="meta">Beside each image, its heatmap as the model saw it and on '
                 "the photograph: the warmer, the more that region raises the score (colour "
                 "scale per image).</p>" if heatmaps else "")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kad screening report</title>
<style>{_CSS}</style></head><body>
<h1>kad screening report</h1>
<div class="meta">{datetime.now():%Y-%m-%d %H:%M} · kad {html.escape(info['versions']['kad'])}
 · red borders: flagged (score above the threshold)</div>
<h2>Summary</h2><table>{table}</table>
<h2>How the threshold was set</h2>{fit_section(pipeline)}
<h2>Scores</h2><div class="plots">{plots}</div>
<h2>Ranked images and p-values</h2>
<p class="meta">The p-value is the share of calibration normals scoring at least as high:
small means unlike the healthy images; an image is flagged by a conformal threshold at
false-positive rate α exactly when its p-value is at most α.</p>
{_ranked_table(rows)}
<h2>Most suspicious {k}</h2>{heat_note}{_gallery(pipeline, rows[:k], heatmaps)}
<h2>Least suspicious {k}</h2>{_gallery(pipeline, rows[::-1][:k])}
{problems}
</body></html>
"""
    from kad.utils.files import write_text

    write_text(path, page)
    return path, metrics
