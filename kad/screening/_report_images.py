"""The pictures of ``report.html``, written as files beside it: each image's thumbnails, its
heatmaps drawn on one colour scale for the whole report, and the score histogram.

Heatmaps reach the report as :class:`HeatmapSketches`: while
:func:`kad.screening.heatmaps.write_heatmaps` streams, each map is kept shrunk to
:data:`SKETCH` pixels a side (a few kilobytes per image, so thousands fit), with its
maximum and where the model's view lies on the photograph. One colour scale
(:class:`HeatScale`) is set for every panel, so a faint and a glaring region look different:
anchored on the heatmaps of the model's calibration normals where the model file holds them
(:mod:`kad.screening.heatmap_scale`), else, once every map is known, on the report's own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kad.errors import ImageReadError

#: Thumbnails are drawn with their longest side this many pixels.
THUMB = 160
#: Heatmaps are kept for the report at this many pixels a side.
SKETCH = 64
#: Where full colour lies: this quantile of the positive heatmap values of the report.
SCALE_QUANTILE = 0.99
COLOUR_MAP = "viridis"  # perceptually uniform, readable with every common colour blindness
OPACITY = 0.75

# Okabe & Ito's colour-blind-safe palette, for the histogram's groups
_BLUE, _ORANGE, _GREEN, _PINK, _SKY, _VERMILION = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")


@dataclass
class Sketch:
    """One image's heatmap as the report keeps it: ``map`` (SKETCH x SKETCH, score units
    per pixel of the model's input), its full-resolution maximum ``peak``, the region
    ``box`` (left, top, width, height) of the photograph of ``shape`` (height, width) that
    the model saw."""

    map: np.ndarray
    peak: float
    box: tuple[int, int, int, int] | None
    shape: tuple[int, int] | None


@dataclass
class HeatmapSketches:
    """Collects heatmaps for the report; pass it as ``on_heatmap`` to
    :func:`kad.screening.heatmaps.write_heatmaps`. ``grid`` and ``steps``: those the maps
    are made with, checked against the calibration normals' maps when anchoring the
    scale."""

    sketches: dict[str, Sketch] = field(default_factory=dict)
    method: str | None = None
    grid: int | None = None
    steps: int | None = None

    def __call__(self, heat) -> None:
        from kad.data.images import resize

        self.method = heat.method
        if heat.map is None:
            return
        full = np.asarray(heat.map, dtype=np.float32)
        self.sketches[str(heat.id)] = Sketch(
            resize(full, SKETCH).astype(np.float32), float(full.max()),
            None if heat.box is None else tuple(int(v) for v in heat.box),
            None if heat.original_shape is None else tuple(int(v) for v in heat.original_shape))

    def get(self, file: str) -> Sketch | None:
        return self.sketches.get(str(file))

    def scale(self, pipeline=None) -> HeatScale:
        """One colour scale for every map: anchored on the calibration normals' heatmaps of
        ``pipeline`` (:func:`kad.screening.heatmap_scale.anchor`) where it holds them and
        they were made as these were; else full colour at the :data:`SCALE_QUANTILE` of
        the positive values of the report's maps, saying why."""
        from kad.screening.heatmap_scale import HeatAnchor, NoAnchor, anchor

        found = (anchor(pipeline, self.method, self.grid, self.steps) if pipeline is not None
                 else NoAnchor("no model was given to anchor the scale on"))
        if isinstance(found, HeatAnchor):
            return HeatScale(found.value, found.describe(), found)
        values = [s.map[s.map > 0] for s in self.sketches.values()]
        positive = np.concatenate(values) if values else np.zeros(0, np.float32)
        top = float(np.quantile(positive, SCALE_QUANTILE)) if positive.size else 0.0
        n = len(self.sketches)
        anchored = (f"the {SCALE_QUANTILE:.0%} quantile of the positive heatmap values of the "
                    f"{n} image{'s' if n != 1 else ''} of this report, not the calibration "
                    f"normals: {found.reason}")
        return HeatScale(top, anchored)


@dataclass
class HeatScale:
    """Heatmap values from 0 to ``top`` drawn from transparent to full colour; ``anchored``
    says where ``top`` comes from; ``anchor`` is the calibration normals' anchor
    (:class:`kad.screening.heatmap_scale.HeatAnchor`) when ``top`` is its value."""

    top: float
    anchored: str
    anchor: object = None

    def healthy(self, peak: float) -> str:
        """What an image's heatmap peak is against the calibration normals' anchor, for its
        card; empty without an anchor."""
        if self.anchor is None:
            return ""
        if self.anchor.exceeded_by(peak):
            return f"above what healthy calibration regions reach ({self.top:.3g})"
        return f"within what healthy calibration regions reach ({self.top:.3g})"

    def levels(self, values: np.ndarray) -> np.ndarray:
        if self.top <= 0:
            return np.zeros_like(values, dtype=np.float32)
        return np.clip(values / self.top, 0.0, 1.0).astype(np.float32)

    def gradient_css(self, stops: int = 11) -> str:
        """The colour map as a CSS linear gradient, low to high."""
        colours = _lut()[np.linspace(0, 255, stops).round().astype(int)]
        return ", ".join(f"rgb({r},{g},{b}) {100 * i / (stops - 1):.0f}%"
                         for i, (r, g, b) in enumerate(colours))


@functools.cache
def _lut() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[COLOUR_MAP](np.linspace(0, 1, 256))[:, :3] * 255
            ).round().astype(np.uint8)


def draw_overlay(rgb: np.ndarray, level: np.ndarray) -> np.ndarray:
    """``rgb`` (uint8) with ``level`` (0..1, same height and width) drawn over it in the
    colour map, the more opaque the higher: where a region does not raise the score the
    photograph shows through."""
    colour = _lut()[(level * 255).round().astype(int)].astype(np.float32)
    alpha = (OPACITY * level)[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + colour * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def on_photograph(sketch: Sketch, shape: tuple[int, int]) -> np.ndarray | None:
    """The sketch's values placed where the model's view lies on the photograph, scaled
    to ``shape`` (height, width); 0 outside it. None without a box."""
    from kad.data.images import resize

    if sketch.box is None or sketch.shape is None:
        return None
    sy, sx = shape[0] / sketch.shape[0], shape[1] / sketch.shape[1]
    left, top, width, height = sketch.box
    left, top = int(round(left * sx)), int(round(top * sy))
    width, height = max(1, int(round(width * sx))), max(1, int(round(height * sy)))
    scaled = resize(sketch.map, (height, width))
    canvas = np.zeros(shape, dtype=np.float32)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, shape[1]), min(top + height, shape[0])
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = scaled[y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas


def thumbnails(pipeline, file: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The photograph as taken (aspect ratio kept, longest side :data:`THUMB`) and what the
    model saw (THUMB square), RGB uint8; None when it cannot be read now."""
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
    seen = resize(resize(np.asarray(seen, np.float32), pipeline.image_size), THUMB)
    return (np.asarray(resize(taken, shape), np.uint8),
            np.clip(seen * 255.0 + 0.5, 0, 255).astype(np.uint8))


def write_picture(path: Path, data: bytes) -> Path:
    """Write one picture into the report's folder. The folder is new and the run's own (in
    ``kad score``, inside the staging folder renamed into place at the end), so a picture
    is written straight, not aside and synced one by one: thousands of them would spend
    seconds in ``fsync``."""
    from kad.utils.files import write_error

    try:
        Path(path).write_bytes(data)
    except OSError as exc:
        raise write_error(path, exc) from None
    return Path(path)


def write_jpeg(path: Path, rgb: np.ndarray) -> Path:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise ImageReadError(path, "could not be encoded as JPEG")
    return write_picture(path, buf.tobytes())


def histogram(path: Path, pipeline, rows) -> list[str]:
    """The score histogram as a PNG at ``path``: the normals that set the threshold (the
    calibration normals; the training normals, said to be in-sample, for a model without
    them), the new images (by label where given), the held-out labelled images of the fit
    where there are some, and the threshold. Returns what each group is, for the caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: list[tuple[np.ndarray, str, str, bool]] = []
    calibration = getattr(pipeline, "calibration", None) or {}
    notes = []
    if len(calibration.get("scores") or []):
        cal = np.asarray(calibration["scores"], dtype=np.float64)
        groups.append((cal, f"calibration normals ({len(cal)})", _BLUE, True))
        role = ("that set the threshold" if pipeline.threshold.method == "conformal" else
                "for the p-values (labelled images set the threshold)")
        notes.append(f"calibration normals: the {len(cal)} normal images kept aside at fitting "
                     f"{role}; a new healthy image scores like them")
    else:
        train = np.asarray(pipeline.training["scores"], dtype=np.float64)
        groups.append((train, f"training normals ({len(train)}, in-sample)", _BLUE, True))
        notes.append("training normals: this model has no calibration set, so the images it "
                     "was fitted on are shown; their scores are in-sample, lower than a new "
                     "healthy image's")
    new = np.array([r.score for r in rows], dtype=np.float64)
    labels = np.array([-1 if r.label is None else r.label for r in rows])
    for value, name, colour in ((-1, "new images", _ORANGE),
                                (0, "new, labelled normal", _SKY),
                                (1, "new, labelled abnormal", _VERMILION)):
        part = new[labels == value]
        if part.size:
            groups.append((part, f"{name} ({part.size})", colour, False))
    notes.append(f"new images: the {len(new)} images scored in this run")
    held = getattr(pipeline, "assessment", None) or {}
    if len(held.get("scores") or []):
        scores = np.asarray(held["scores"], dtype=np.float64)
        y = np.asarray(held["labels"], dtype=int)
        for value, name, colour in ((0, "held-out labelled normals", _GREEN),
                                    (1, "held-out labelled abnormal", _PINK)):
            if (y == value).any():
                groups.append((scores[y == value], f"{name} ({(y == value).sum()})", colour,
                               False))
        notes.append("held-out labelled images: kept aside at fitting to measure sensitivity "
                     "and specificity, used for nothing else")
    threshold = float(pipeline.threshold.value)
    bins = np.histogram_bin_edges(np.concatenate([g[0] for g in groups] + [[threshold]]),
                                  bins=40)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for values, label, colour, filled in groups:
        ax.hist(values, bins=bins, density=True, label=label, color=colour,
                histtype="stepfilled" if filled else "step", alpha=0.45 if filled else 1.0,
                lw=1.8)
    ax.axvline(threshold, color="k", ls="--", lw=1.2,
               label=f"threshold {threshold:.4g} ({pipeline.threshold.method})")
    ax.set_xlabel("anomaly score (higher = more suspicious)")
    ax.set_ylabel("density (each group sums to 1)")
    ax.legend(fontsize=8)
    _save(fig, path)
    return notes


def roc(path: Path, rows, metrics: dict) -> None:
    """The ROC curve of the labelled new images, with the threshold's operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kad.utils.metrics import roc as roc_curve

    labelled = [r for r in rows if r.label is not None]
    fpr, tpr = roc_curve([r.label for r in labelled], [r.score for r in labelled])
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot(fpr, tpr, lw=1.5, color=_BLUE, label=f"AUROC {100 * metrics['auroc']:.1f}%")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "o", color=_VERMILION,
            label=f"threshold: sens {100 * metrics['sensitivity']:.0f}%, "
                  f"spec {100 * metrics['specificity']:.0f}%")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    from io import BytesIO

    import matplotlib.pyplot as plt

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_picture(path, buf.getvalue())
