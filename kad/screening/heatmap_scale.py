"""The heatmaps' colour scale, anchored on the calibration normals.

A heatmap (:mod:`kad.screening.heatmaps`) is in score units per pixel: how bright a region
should look depends on how bright regions of healthy images get. At fitting
(:func:`kad.screening.fitting.fit_pipeline`), the heatmaps of up to :data:`MAX_IMAGES`
calibration normals (chosen at random from the fit's seed) are made the way ``kad score
--heatmaps`` makes them by default (:func:`kad.screening.heatmaps.iter_heatmaps`, method
``auto``, its default grid and steps), and the model file keeps, per image, the map's
largest value (its *peak*) and the quantiles :data:`LEVELS` of its values: plain float
arrays in ``pipeline.calibration["heatmaps"]`` (:func:`calibration_heatmaps`). The cost is
bounded: at most :data:`MAX_PASSES` network passes, so a method that rescoring makes slow
(occlusion, ``grid² + 1`` passes per image) uses fewer images, and none below
:data:`MIN_IMAGES` (the record then says why it holds no maps).

The report's scale (:func:`anchor`) takes full colour at the ``1 - rate`` quantile of those
peaks, ``rate`` being the share of calibration normals the model's current threshold flags:
a healthy image has a region brighter than full colour about as often as it is flagged, and
``kad threshold`` moving the threshold moves the anchor with it. A model file without these
maps (written before they existed, fitted without calibration normals or with
``--no-heatmap-scale``), or a report whose maps are made another way than those of the
calibration normals, gets :class:`NoAnchor`, saying why; the report then scales on its own
maps and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kad.utils.progress import Progress

__all__ = ["LEVELS", "MAX_IMAGES", "MAX_PASSES", "MIN_IMAGES", "HeatAnchor", "NoAnchor",
           "anchor", "calibration_heatmaps", "not_computed"]

#: Calibration normals whose heatmaps are kept, at most.
MAX_IMAGES = 64
#: Network passes the calibration heatmaps may cost at fitting, at most (a gradient map
#: costs one per image, an occlusion map ``grid² + 1``).
MAX_PASSES = 1024
#: Fewer images than this (when the passes allow no more) give no anchor.
MIN_IMAGES = 8
#: Quantiles of each calibration map's values kept beside its peak.
LEVELS = (0.5, 0.9, 0.99)


def not_computed(reason: str) -> dict:
    """The record of calibration heatmaps that were not made, and why."""
    return {"skipped": reason}


def calibration_heatmaps(pipeline, source, ids, *, seed: int = 0,
                         progress: Progress | None = None) -> dict:
    """Make the heatmaps of the calibration normals ``source`` (ids ``ids``) with the
    fitted ``pipeline`` and return the record kept in ``pipeline.calibration["heatmaps"]``:
    ``method``, ``grid``, ``steps``, ``n`` images, ``peaks`` (float64, one per image),
    ``levels`` and ``quantiles`` (float64, one row per image, one column per level),
    ``measured_on``, ``unreadable`` (images that could not be read again); or, when the
    cost bound allows too few images, :func:`not_computed`. Up to :data:`MAX_IMAGES`
    images, at most :data:`MAX_PASSES` network passes, chosen at random from ``seed``."""
    from kad.screening.heatmaps import DEFAULT_GRID, DEFAULT_STEPS, choose_method, iter_heatmaps

    method = choose_method(pipeline.detector, "auto")
    per_image = 1 + (DEFAULT_GRID ** 2 if method == "occlusion" else 0)
    affordable = MAX_PASSES // per_image
    total = len(source)
    if affordable < min(MIN_IMAGES, total):
        return not_computed(
            f"heatmaps by {method} cost {per_image} network passes per image: the "
            f"{MIN_IMAGES} calibration normals needed exceed the {MAX_PASSES} passes allowed "
            "at fitting")
    n = min(MAX_IMAGES, total, affordable)
    rows = np.arange(total)
    if n < total:
        rows = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    ids = [str(ids[i]) for i in rows]
    peaks, quantiles, unreadable = [], [], 0
    for heat in iter_heatmaps(pipeline, source.take(rows), ids, method=method,
                              grid=DEFAULT_GRID, steps=DEFAULT_STEPS, keep_images=False,
                              progress=progress):
        if heat.map is None:
            unreadable += 1
            continue
        values = np.asarray(heat.map, dtype=np.float64)
        peaks.append(float(values.max()))
        quantiles.append(np.quantile(values, LEVELS))
    if not peaks:
        return not_computed(f"none of the {n} calibration normals chosen could be read again")
    chosen = (f"all {total}" if n == total
              else f"{n} of the {total}, chosen at random (seed {seed})")
    return {"method": method, "grid": DEFAULT_GRID, "steps": DEFAULT_STEPS, "n": len(peaks),
            "peaks": np.asarray(peaks, dtype=np.float64),
            "levels": np.asarray(LEVELS, dtype=np.float64),
            "quantiles": np.asarray(quantiles, dtype=np.float64).reshape(len(peaks),
                                                                         len(LEVELS)),
            "unreadable": unreadable,
            "measured_on": f"the heatmaps of {chosen} calibration normals, by {method}"}


#: The threshold a lesion maps model's heatmap scale rests on: its own, fixed at fitting.
OWN_THRESHOLD = "the lesion maps model's own threshold, which kad threshold does not move"


@dataclass(frozen=True)
class HeatAnchor:
    """Full colour of the report's heatmaps: ``value``, the ``1 - rate`` quantile of the
    peaks of ``n`` calibration normals' heatmaps, ``rate`` the share of calibration normals
    (``flagged`` of ``n_calibration``) the threshold flags; ``typical``, the median over
    those heatmaps of their 99 % quantile (where a healthy map's bulk lies)."""

    value: float
    rate: float
    n: int
    flagged: int
    n_calibration: int
    method: str
    typical: float
    #: Whether the rate is of a lesion maps model's own threshold
    #: (:attr:`~kad.screening.pipeline.Pipeline.is_maps`), not the screening one.
    maps_model: bool = False

    def describe(self) -> str:
        """Where full colour lies, in one sentence for the report's legend."""
        threshold = OWN_THRESHOLD if self.maps_model else "the threshold"
        if self.flagged:
            where = (f"the {1 - self.rate:.1%} quantile of the heatmap peaks of {self.n} "
                     f"calibration normals: a healthy image has a region this hot at the "
                     f"rate of {threshold} ({self.flagged} of the {self.n_calibration} "
                     f"calibration normals, {self.rate:.1%}, score above it)")
        else:
            where = (f"the highest heatmap peak of {self.n} calibration normals "
                     f"({threshold} flags none of the {self.n_calibration} calibration "
                     "normals)")
        return (f"{where}; 99% of a healthy map's values stay below {self.typical:.3g} "
                "(median over them)")

    def exceeded_by(self, peak: float) -> bool:
        """Whether an image's heatmap peak is hotter than healthy calibration regions reach
        at the threshold's rate."""
        return bool(peak > self.value)


@dataclass(frozen=True)
class NoAnchor:
    """Why the report's scale is not anchored on the calibration normals."""

    reason: str


def anchor(pipeline, method: str | None, grid: int | None = None,
           steps: int | None = None) -> HeatAnchor | NoAnchor:
    """The colour scale's anchor for heatmaps made by ``method`` (with ``grid`` for
    occlusion and ``steps`` for gradient), or :class:`NoAnchor` saying why there is none:
    no calibration normals, no calibration heatmaps in the model file, heatmaps made
    another way than those of the calibration normals."""
    calibration = getattr(pipeline, "calibration", None) or {}
    scores = np.asarray(calibration.get("scores") or [], dtype=np.float64)
    if not scores.size:
        return NoAnchor("this model has no calibration normals")
    record = calibration.get("heatmaps")
    if record is None:
        return NoAnchor("the model file holds no heatmaps of its calibration normals (it "
                        "was written before kad kept them); refit it with kad fit to "
                        "anchor the scale")
    if "skipped" in record:
        return NoAnchor(f"the calibration normals' heatmaps were not made at fitting: "
                        f"{record['skipped']}")
    made = record["method"]
    if method is not None and method != made:
        remedy = (f"use --heatmap-method {made}" if getattr(pipeline, "has_network", True)
                  else "an exported model cannot make them: score with the model file it "
                       "was exported from")
        return NoAnchor(f"this report's heatmaps are by {method}, the calibration normals' "
                        f"by {made} ({remedy})")
    name, used = ("grid", grid) if made == "occlusion" else ("steps", steps)
    if made in ("occlusion", "gradient") and used is not None and used != record[name]:
        return NoAnchor(f"this report's heatmaps were made with --{name} {used}, the "
                        f"calibration normals' with --{name} {record[name]}")
    peaks = np.asarray(record["peaks"], dtype=np.float64)
    flagged = int(pipeline.flag(scores).sum())
    rate = flagged / scores.size
    value = float(np.quantile(peaks, 1.0 - rate))
    if not value > 0:
        return NoAnchor(f"the calibration normals' heatmaps peak at {value:.3g}: nothing "
                        "to anchor the colour on")
    levels = list(np.asarray(record["levels"], dtype=np.float64))
    column = levels.index(0.99) if 0.99 in levels else len(levels) - 1
    typical = float(np.median(np.asarray(record["quantiles"], dtype=np.float64)[:, column]))
    return HeatAnchor(value, rate, len(peaks), flagged, int(scores.size), made, typical,
                      bool(getattr(pipeline, "is_maps", False)))
