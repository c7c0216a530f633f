"""``report.html``: one self-contained page a person can open without a server or network.

Every picture is inlined as a base64 PNG: thumbnails of the most and least suspicious
images as the model saw them (after preprocessing), the score distribution of the training
normals against the new images, and, when labels are given, the ROC curve with its AUROC and
the operating point of the threshold.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import ImageReadError
from .pipeline import Pipeline
from .screening import ScoredImage, labelled_metrics

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


def _thumbnail(pipeline: Pipeline, file: str) -> str | None:
    from .images import read_image, resize
    from .preprocessing import get_preprocessing

    try:
        seen = get_preprocessing(pipeline.preprocessing)(read_image(file))
    except ImageReadError:
        return None
    return _png(resize(resize(seen, pipeline.image_size), THUMB))


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


def _roc(rows: list[ScoredImage], metrics: dict, threshold: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import roc

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


def _overlay_thumbnail(path) -> str | None:
    """A heatmap overlay PNG written by :func:`kad.heatmaps.save_overlays`, as a thumbnail."""
    from .images import read_image, resize

    if path is None:
        return None
    try:
        return _png(resize(read_image(path), THUMB).astype(np.float32) / 255.0)
    except ImageReadError:
        return None


def _gallery(pipeline: Pipeline, rows: list[ScoredImage], heatmaps: dict | None = None) -> str:
    cells = []
    for r in rows:
        uri = _thumbnail(pipeline, r.file)
        label = "" if r.label is None else (" · labelled abnormal" if r.label else
                                            " · labelled normal")
        img = f'<img src="{uri}" alt="">' if uri else "<div>(unreadable)</div>"
        drawn = (heatmaps or {}).get(r.file)
        if drawn is not None:
            for part, what in ((drawn.seen, "as the model saw it"),
                               (drawn.original, "on the photograph")):
                heat = _overlay_thumbnail(part)
                if heat:
                    img += f'<img src="{heat}" alt="heatmap {what}" title="heatmap {what}">'
        cells.append(
            f'<figure class="{"flag" if r.flagged else ""}{" heat" if drawn else ""}">'
            f"{img}<figcaption>"
            f'<b class="num">{r.score:.4g}</b> · {r.percentile:.0f}th pct{label}<br>'
            f"{html.escape(Path(r.file).name)}</figcaption></figure>"
        )
    return '<div class="grid">' + "".join(cells) + "</div>"


def write_report(path: Path, pipeline: Pipeline, rows: list[ScoredImage],
                 failed: dict[str, str], skipped: list[tuple[str, str]], model_path: str,
                 n_thumbnails: int = 12, heatmaps: dict | None = None,
                 ) -> tuple[Path, dict | None]:
    """Write the page; returns its path and the labelled metrics (None without labels).

    ``heatmaps`` ({file: :class:`kad.heatmaps.OverlayFiles`}, from
    :func:`kad.heatmaps.write_heatmaps`) adds, for the most suspicious images, the heatmap
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
        plots += f'<img src="{_roc(rows, metrics, pipeline.threshold.value)}" alt="ROC curve">'
    problems = ""
    if failed or skipped:
        items = [f"<tr><td>{html.escape(f)}</td><td>{html.escape(why)}</td></tr>"
                 for f, why in [*failed.items(), *skipped]]
        problems = ("<h2>Not scored</h2><table><tr><th>file</th><th>reason</th></tr>"
                    + "".join(items) + "</table>")
    heat_note = ('<p class="meta">Each image, then its heatmap as the model saw it and on '
                 "the photograph: the warmer, the more that region raises the score (colour "
                 "scale per image).</p>" if heatmaps else "")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kad screening report</title>
<style>{_CSS}</style></head><body>
<h1>kad screening report</h1>
<div class="meta">{datetime.now():%Y-%m-%d %H:%M} · kad {html.escape(info['versions']['kad'])}
 · red borders: flagged (score above the threshold)</div>
<h2>Summary</h2><table>{table}</table>
<h2>Scores</h2><div class="plots">{plots}</div>
<h2>Most suspicious {k}</h2>{heat_note}{_gallery(pipeline, rows[:k], heatmaps)}
<h2>Least suspicious {k}</h2>{_gallery(pipeline, rows[::-1][:k])}
{problems}
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path, metrics
