"""Do the heatmaps point at real lesions? Measured on photographs with lesion masks.

The masks are laid out as in IDRiD's segmentation set: ``MASKS/<stem>_<KIND>.png`` for a
photograph ``<stem>.<ext>``, binary (any non-zero pixel is marked), the photograph's size
or the same shape scaled. ``KIND`` is one of :data:`LESION_KINDS` (a lesion pixel is any
pixel marked in one of them) or :data:`DISC_KIND`, the optic disc (a normal structure,
used to say where misses fall). A kind without a file marks nothing in that photograph.

For each photograph (:func:`measure_map`), with the map on the photograph's pixels and
kad's fundus mask (:func:`fundus_region`, the region fundus preprocessing keeps):

* strict pointing: the map's maximum inside the fundus falls on a lesion pixel, and which
  kinds mark that pixel;
* pointing within ``near`` (a share of the photograph's width, 1 % by default): the
  maximum lies within that distance of a lesion pixel;
* for a miss, whether it falls on or within ``disc_margin`` of the width of the optic disc;
* pixel AUROC inside the fundus, on a grid whose longer side is at most ``eval_side``
  (the map averaged over each cell, a cell a lesion where any of its pixels is one, in the
  fundus where most of its pixels are), so that a folder of 4288 px photographs is measured
  in bounded memory; microaneurysms stay regions on that grid.

Over all photographs (:class:`LesionTally`): the shares of hits with Wilson 95 % intervals,
the pixel AUROC of all fundus pixels pooled, AUPRO up to 30 % false-positive rate
(:func:`kad.utils.metrics.aupro`, regions labelled per photograph on the same grid), the
image AUROC of lesion photographs against normal ones where normal ones were scored, the
share of misses on the optic disc and the hits per lesion kind. ``kad lesions`` and
``benchmarks/lesions.py`` both measure with these functions.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kad.errors import ImageReadError, KadError
from kad.utils.progress import Progress

__all__ = [
    "DISC_KIND",
    "LESION_KINDS",
    "LesionCase",
    "LesionResult",
    "LesionRun",
    "LesionSummary",
    "LesionTally",
    "LesionTruth",
    "find_cases",
    "fundus_region",
    "load_truth",
    "measure_lesions",
    "measure_map",
    "table",
]

LESION_KINDS = ("MA", "HE", "EX", "SE")
DISC_KIND = "OD"
KIND_NAMES = {"MA": "microaneurysms", "HE": "haemorrhages", "EX": "hard exudates",
              "SE": "soft exudates", "OD": "optic disc"}
#: Pixel AUROC and AUPRO are measured on a grid whose longer side is at most this.
EVAL_SIDE = 1024
NEAR = 0.01
DISC_MARGIN = 0.05
FPR_LIMIT = 0.3


@dataclass
class LesionCase:
    """A photograph and its mask files, by kind."""

    id: str
    image: Path
    masks: dict[str, Path]


@dataclass
class LesionTruth:
    """The masks of one photograph at their own resolution, and its fundus there."""

    lesion: np.ndarray  # bool (h, w): any lesion kind
    kinds: dict[str, np.ndarray]  # bool (h, w) per lesion kind present
    disc: np.ndarray | None  # bool (h, w), the optic disc, where a mask is given
    fundus: np.ndarray  # bool (h, w)

    @property
    def shape(self) -> tuple[int, int]:
        return self.lesion.shape


@dataclass
class LesionResult:
    """One photograph's measures; ``status`` is ``measured`` or says why it was not."""

    id: str
    status: str = "measured"
    reason: str = ""
    score: float = float("nan")
    hit: bool | None = None
    near: bool | None = None
    kinds_hit: list[str] = field(default_factory=list)
    kinds_present: list[str] = field(default_factory=list)
    peak: tuple[int, int] | None = None  # (row, column) in the masks' pixels
    miss_on_disc: bool | None = None
    pixel_auroc: float = float("nan")
    lesion_share: float = float("nan")  # of the fundus


@dataclass
class LesionSummary:
    """What :class:`LesionTally` found over every photograph measured."""

    n: int
    hits: int
    pointing: float
    pointing_ci: tuple[float, float]
    near_hits: int
    near: float
    near_ci: tuple[float, float]
    pixel_auroc: float  # every fundus pixel of every photograph pooled (anomalib's)
    pixel_auroc_mean: float  # the mean of the photographs' own
    aupro: float
    misses: int
    misses_on_disc: int
    misses_with_disc: int  # misses on photographs with an optic-disc mask
    hits_by_kind: dict[str, int]
    photographs_by_kind: dict[str, int]
    chance: float  # the mean lesion share of the fundus: a random map's strict pointing
    image_auroc: float | None = None
    n_normals: int = 0
    settings: dict = field(default_factory=dict)

    def row(self) -> dict[str, str]:
        """The table's cells, as ``kad lesions`` and the benchmark print them."""
        lo, hi = self.pointing_ci
        return {
            "strict pointing": f"{100 * self.pointing:.0f} % [{100 * lo:.0f}-{100 * hi:.0f}]",
            f"within {100 * self.settings.get('near', NEAR):g} %": f"{100 * self.near:.0f} %",
            "pixel AUROC": f"{self.pixel_auroc:.3f}",
            "pixel AUROC per photo": f"{self.pixel_auroc_mean:.3f}",
            "AUPRO@30%": f"{self.aupro:.3f}",
            "image AUROC": "–" if self.image_auroc is None else f"{self.image_auroc:.3f}",
            "misses on disc": (f"{self.misses_on_disc}/{self.misses_with_disc}"
                               if self.misses_with_disc else "–"),
            "hits by kind": ", ".join(f"{k} {self.hits_by_kind[k]}/{self.photographs_by_kind[k]}"
                                      for k in LESION_KINDS if self.photographs_by_kind.get(k)),
        }


# --------------------------------------------------------------------------- inputs


def find_cases(images: Sequence[Path], masks_dir: str | Path,
               ) -> tuple[list[LesionCase], list[LesionResult]]:
    """The photographs among ``images`` with at least one lesion mask in ``masks_dir``,
    and every other one as a result with the reason."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise KadError(f"no masks folder {masks_dir}; give --masks the folder holding "
                       "<stem>_<KIND>.png files")
    by_stem: dict[str, dict[str, Path]] = {}
    for path in sorted(masks_dir.iterdir()):
        stem, _, kind = path.stem.rpartition("_")
        if stem and kind in (*LESION_KINDS, DISC_KIND) and path.is_file():
            by_stem.setdefault(stem, {})[kind] = path
    cases, left_out = [], []
    for image in images:
        found = by_stem.get(Path(image).stem, {})
        if not any(kind in found for kind in LESION_KINDS):
            left_out.append(LesionResult(str(image), "no mask", reason=(
                f"no {Path(image).stem}_<MA|HE|EX|SE>.png in {masks_dir}")))
            continue
        cases.append(LesionCase(str(image), Path(image), found))
    return cases, left_out


def _read_mask(path: Path) -> np.ndarray:
    """The mask at ``path`` as booleans: read as every image is
    (:func:`kad.data.images.read_image`: the same checks and pixel limit, before decoding),
    a pixel of it any non-black one."""
    from kad.data.images import read_image

    return read_image(path).any(axis=2)


def fundus_region(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """kad's fundus mask of the photograph ``rgb`` (:func:`kad.data.preprocessing.crop_fundus`:
    inside the fitted circle and the bright region's hull), on a grid of ``shape``
    (height, width) covering the same photograph."""
    import cv2

    from kad.data.preprocessing import crop_fundus, fundus_box

    _, inside = crop_fundus(rgb)
    left, top, side = fundus_box(rgb)
    rows, cols = rgb.shape[:2]
    canvas = np.zeros((rows, cols), dtype=np.uint8)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, cols), min(top + side, rows)
    canvas[y0:y1, x0:x1] = inside[y0 - top:y1 - top, x0 - left:x1 - left]
    return cv2.resize(canvas, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def load_truth(case: LesionCase, rgb: np.ndarray | None = None) -> LesionTruth:
    """The masks of ``case`` and kad's fundus mask at the masks' resolution; ``rgb``: the
    photograph, if already decoded (else it is read, reduced). Raises
    :class:`~kad.errors.ImageReadError` naming a mask that cannot be read or whose shape
    does not fit the photograph's."""
    from kad.data.images import read_image

    read = {kind: _read_mask(path) for kind, path in case.masks.items()}
    shapes = {m.shape for m in read.values()}
    if len(shapes) != 1:
        raise ImageReadError(case.masks[next(iter(case.masks))],
                             f"the masks of {case.image.name} differ in size: "
                             f"{sorted(shapes)}")
    shape = shapes.pop()
    if rgb is None:
        rgb = read_image(case.image, min_side=min(512, min(shape)))
    if abs(rgb.shape[0] / rgb.shape[1] - shape[0] / shape[1]) > 0.01 * shape[0] / shape[1]:
        raise ImageReadError(case.image, f"its masks are {shape[1]}x{shape[0]} px, not the "
                                         f"photograph's shape ({rgb.shape[1]}x{rgb.shape[0]})")
    kinds = {k: read[k] for k in LESION_KINDS if k in read and read[k].any()}
    lesion = np.zeros(shape, dtype=bool)
    for mask in kinds.values():
        lesion |= mask
    return LesionTruth(lesion, kinds, read.get(DISC_KIND), fundus_region(rgb, shape))


# --------------------------------------------------------------------------- measuring


def _within(mask: np.ndarray, row: int, col: int, radius: float) -> bool:
    """Whether a pixel of ``mask`` lies within ``radius`` pixels of ``(row, col)``."""
    r = int(math.ceil(radius))
    y0, y1 = max(row - r, 0), min(row + r + 1, mask.shape[0])
    x0, x1 = max(col - r, 0), min(col + r + 1, mask.shape[1])
    yy, xx = np.ogrid[y0:y1, x0:x1]
    return bool((mask[y0:y1, x0:x1] & ((yy - row) ** 2 + (xx - col) ** 2 <= radius ** 2)).any())


def _grid(shape: tuple[int, int], eval_side: int) -> tuple[int, int]:
    rows, cols = shape
    scale = min(1.0, eval_side / max(rows, cols))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def _down(array: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    import cv2

    if array.shape == grid:
        return array
    return cv2.resize(array, (grid[1], grid[0]), interpolation=cv2.INTER_AREA)


def measure_map(ident: str, heat: np.ndarray, truth: LesionTruth, *,
                score: float = float("nan"), near: float = NEAR,
                disc_margin: float = DISC_MARGIN, eval_side: int = EVAL_SIDE,
                ) -> tuple[LesionResult, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One photograph's :class:`LesionResult` from its map ``heat`` on the masks' pixels
    (higher = more anomalous), and ``(map, lesion, fundus)`` on the evaluation grid for
    the pooled measures (:class:`LesionTally`)."""
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != truth.shape:
        raise KadError(f"{ident}: a map of shape {heat.shape} for masks of {truth.shape}")
    fundus = truth.fundus
    if not fundus.any():
        raise KadError(f"{ident}: no fundus found")
    inside = np.where(fundus, heat, -np.inf)
    if not np.isfinite(inside).any():
        raise KadError(f"{ident}: the map has no finite value inside the fundus")
    row, col = (int(v) for v in np.unravel_index(int(np.argmax(inside)), heat.shape))
    del inside
    width = truth.shape[1]
    hit = bool(truth.lesion[row, col])
    result = LesionResult(ident, score=float(score), hit=hit, peak=(row, col),
                          near=hit or _within(truth.lesion, row, col, near * width),
                          kinds_hit=[k for k, m in truth.kinds.items() if m[row, col]],
                          kinds_present=list(truth.kinds))
    if not hit and truth.disc is not None:
        result.miss_on_disc = _within(truth.disc, row, col, disc_margin * width)
    grid = _grid(truth.shape, eval_side)
    small = _down(heat, grid)
    lesion = _down(truth.lesion.astype(np.uint8), grid) > 0
    region = _down(fundus.astype(np.float32), grid) > 0.5
    labels = lesion[region]
    result.lesion_share = float(truth.lesion[fundus].mean())  # at the masks' resolution
    if labels.any() and not labels.all():
        from sklearn.metrics import roc_auc_score

        result.pixel_auroc = float(roc_auc_score(labels, small[region]))
    return result, (small, lesion, region)


class LesionTally:
    """Every photograph's result and grid arrays, and the summary over them."""

    def __init__(self, near: float = NEAR, disc_margin: float = DISC_MARGIN,
                 eval_side: int = EVAL_SIDE, fpr_limit: float = FPR_LIMIT):
        self.near, self.disc_margin = float(near), float(disc_margin)
        self.eval_side, self.fpr_limit = int(eval_side), float(fpr_limit)
        self.results: list[LesionResult] = []
        self._grids: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, ident: str, heat: np.ndarray, truth: LesionTruth,
            score: float = float("nan")) -> LesionResult:
        result, grids = measure_map(ident, heat, truth, score=score, near=self.near,
                                    disc_margin=self.disc_margin, eval_side=self.eval_side)
        self.results.append(result)
        self._grids.append(grids)
        return result

    def summary(self, normal_scores: Sequence[float] | None = None) -> LesionSummary:
        """The measures over every photograph added; with ``normal_scores`` (of normal
        photographs, by the same model), the image AUROC of lesion against normal."""
        from sklearn.metrics import roc_auc_score

        from kad.utils.metrics import aupro, wilson_interval

        done = [r for r in self.results if r.hit is not None]
        if not done:
            raise KadError("no photograph with lesions was measured")
        n = len(done)
        hits = sum(r.hit for r in done)
        near = sum(r.near for r in done)
        maps = [g[0][g[2]] for g in self._grids]
        truths = [g[1][g[2]] for g in self._grids]
        values, labels = np.concatenate(maps), np.concatenate(truths)
        pooled = (float(roc_auc_score(labels, values)) if labels.any() and not labels.all()
                  else float("nan"))
        with_regions = [g for g in self._grids if (g[1] & g[2]).any()]
        area = (aupro([g[0] for g in with_regions], [g[1] for g in with_regions],
                      [g[2] for g in with_regions], self.fpr_limit)
                if with_regions else float("nan"))
        misses = [r for r in done if not r.hit]
        with_disc = [r for r in misses if r.miss_on_disc is not None]
        image_auroc = None
        normal = np.asarray([] if normal_scores is None else normal_scores, dtype=float)
        normal = normal[np.isfinite(normal)]
        lesion_scores = np.array([r.score for r in done], dtype=float)
        if len(normal) and np.isfinite(lesion_scores).all():
            y = np.r_[np.ones(len(lesion_scores)), np.zeros(len(normal))]
            image_auroc = float(roc_auc_score(y, np.r_[lesion_scores, normal]))
        per_image = [r.pixel_auroc for r in done if np.isfinite(r.pixel_auroc)]
        return LesionSummary(
            n=n, hits=hits, pointing=hits / n, pointing_ci=wilson_interval(hits, n),
            near_hits=near, near=near / n, near_ci=wilson_interval(near, n),
            pixel_auroc=pooled,
            pixel_auroc_mean=float(np.mean(per_image)) if per_image else float("nan"),
            aupro=area, misses=len(misses),
            misses_on_disc=sum(bool(r.miss_on_disc) for r in with_disc),
            misses_with_disc=len(with_disc),
            hits_by_kind={k: sum(k in r.kinds_hit for r in done) for k in LESION_KINDS},
            photographs_by_kind={k: sum(k in r.kinds_present for r in done)
                                 for k in LESION_KINDS},
            chance=float(np.mean([r.lesion_share for r in done])),
            image_auroc=image_auroc, n_normals=len(normal),
            settings={"near": self.near, "disc_margin": self.disc_margin,
                      "eval_side": self.eval_side, "fpr_limit": self.fpr_limit})


# --------------------------------------------------------------------------- the command


@dataclass
class LesionRun:
    """What :func:`measure_lesions` measured and wrote."""

    summary: LesionSummary
    results: list[LesionResult]  # every photograph given, measured or not
    normals: list[LesionResult]  # every normal photograph given, scored or not
    method: str
    seconds: float
    csv: Path
    json: Path
    replaced: list[Path] = field(default_factory=list)


def measure_lesions(model: str | Path, images: Sequence[str | Path], masks: str | Path,
                    out_dir: str | Path, *, normals: Sequence[str | Path] | None = None,
                    method: str = "auto", grid: int = 8, steps: int = 16,
                    weights: str | None = None, runtime: str | None = None,
                    near: float = NEAR, disc_margin: float = DISC_MARGIN,
                    eval_side: int = EVAL_SIDE, progress: Progress | None = None,
                    ) -> LesionRun:
    """Measure the heatmaps of the model file ``model`` on the photographs under
    ``images`` against their masks in ``masks`` (see the module docstring); with
    ``normals`` (files or folders of photographs without lesions), also the image AUROC.
    Writes ``lesions.csv`` (one row per photograph given, the ones not measured with the
    reason) and ``summary.json`` into ``out_dir``, together at the end
    (:func:`kad.utils.files.staged_output`)."""
    from kad.features.cache import check_writable
    from kad.screening.pipeline import load_pipeline
    from kad.screening.results import collect_images, no_images
    from kad.utils.files import staged_output

    for name, value, low, high in (("near", near, 0, 0.5), ("disc margin", disc_margin, 0, 0.5)):
        if not low <= value <= high:
            raise KadError(f"{name} must be between {low} and {high} of the width, got {value}")
    if eval_side < 32:
        raise KadError(f"the evaluation grid needs at least 32 px a side, got {eval_side}")
    pipeline = load_pipeline(model)
    files, others = collect_images(images)
    if not files:
        raise no_images(images, others, "photographs")
    cases, left_out = find_cases(files, masks)
    left_out = [LesionResult(o.file, o.status, reason=o.reason) for o in others] + left_out
    if not cases:
        raise KadError(f"none of the {len(files)} photographs has a lesion mask in {masks}: "
                       "masks are named <stem>_<MA|HE|EX|SE|OD>.png")
    normal_files, normal_others = collect_images(normals) if normals else ([], [])
    out_dir = check_writable(Path(out_dir), what="--out folder")
    began = time.perf_counter()
    # the maps a grader sees: the model's lesion maps model's where it has one (for method
    # auto, as kad score --heatmaps draws them); the image scores stay the model's own
    drawer = pipeline.drawer(method)
    tally, used = _measure(pipeline, cases, method=method, grid=grid, steps=steps,
                           weights=weights, runtime=runtime, near=near,
                           disc_margin=disc_margin, eval_side=eval_side, progress=progress)
    normal_rows = [LesionResult(o.file, o.status, reason=o.reason) for o in normal_others]
    normal_scores: list[float] = []
    if normal_files:
        from kad.data.datasets import FileSource

        scored = pipeline.score(FileSource(normal_files), ids=[str(f) for f in normal_files],
                                weights=weights, runtime=runtime, progress=progress)
        for ident, value in zip(scored.ids, scored.scores, strict=True):
            if ident in scored.failed:
                normal_rows.append(LesionResult(ident, "unreadable",
                                                reason=scored.failed[ident]))
            else:
                normal_rows.append(LesionResult(ident, "normal", score=float(value)))
                normal_scores.append(float(value))
    summary = tally.summary(normal_scores if normal_files else None)
    summary.settings.update(model=str(model), method=used, masks=str(masks))
    if drawer is not pipeline:
        summary.settings["maps"] = "its lesion maps model"
    results = tally.results + left_out
    seconds = time.perf_counter() - began
    with staged_output(out_dir) as stage:
        csv_path = _write_csv(stage.path / "lesions.csv", results, normal_rows)
        json_path = _write_json(stage.path / "summary.json", summary, results, normal_rows)
        replaced = stage.publish()
    return LesionRun(summary, results, normal_rows, used, seconds, stage.final(csv_path),
                     stage.final(json_path), replaced)


def _measure(pipeline, cases, *, method, grid, steps, weights, runtime, near, disc_margin,
             eval_side, progress) -> tuple[LesionTally, str]:
    from kad.data.datasets import FileSource
    from kad.screening.heatmaps import iter_heatmaps

    tally = LesionTally(near, disc_margin, eval_side)
    used = method
    failed: list[LesionResult] = []
    for case, heat in zip(cases, iter_heatmaps(
            pipeline, FileSource([c.image for c in cases]), [c.id for c in cases],
            method=method, grid=grid, steps=steps, weights=weights, keep_images=False,
            runtime=runtime, progress=progress), strict=True):
        used = heat.method
        if heat.map is None:
            failed.append(LesionResult(case.id, "unreadable", reason=heat.error or ""))
            continue
        try:
            truth = load_truth(case)
        except ImageReadError as exc:
            failed.append(LesionResult(case.id, "bad mask", reason=f"{exc.path}: {exc.reason}"))
            continue
        if not truth.lesion.any():
            failed.append(LesionResult(case.id, "no lesion",
                                       reason="its lesion masks mark no pixel"))
            continue
        tally.add(case.id, heat.on_original(truth.shape), truth, score=heat.score)
    tally.results.extend(failed)
    return tally, used


_COLUMNS = ["image", "status", "score", "hit", "within_tolerance", "kinds_hit",
            "kinds_present", "peak_row", "peak_col", "miss_on_disc", "pixel_auroc",
            "lesion_share", "reason"]


def _yes(value: bool | None) -> str:
    return "" if value is None else "yes" if value else "no"


def _write_csv(path: Path, results: list[LesionResult], normals: list[LesionResult]) -> Path:
    from kad.utils.files import atomic_write, csv_cell

    def number(value: float) -> str:
        return "" if not np.isfinite(value) else f"{value:.6g}"

    with atomic_write(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_COLUMNS)
        for r in [*results, *normals]:
            writer.writerow([csv_cell(r.id), r.status, number(r.score), _yes(r.hit),
                             _yes(r.near), " ".join(r.kinds_hit), " ".join(r.kinds_present),
                             "" if r.peak is None else r.peak[0],
                             "" if r.peak is None else r.peak[1], _yes(r.miss_on_disc),
                             number(r.pixel_auroc), number(r.lesion_share),
                             csv_cell(r.reason)])
    return path


def _plain(value):
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _write_json(path: Path, summary: LesionSummary, results: list[LesionResult],
                normals: list[LesionResult]) -> Path:
    from kad.utils.files import write_text

    counts: dict[str, int] = {}
    for r in [*results, *normals]:
        counts[r.status] = counts.get(r.status, 0) + 1
    record = {"summary": _plain(asdict(summary)),
              "photographs": {"given": len(results), "normals_given": len(normals),
                              "by_status": counts}}
    return write_text(path, json.dumps(record, indent=1) + "\n")


def table(rows: dict[str, dict[str, str]]) -> str:
    """Rows of cells by name (:meth:`LesionSummary.row`, with any cells added) as a plain
    text table; a cell a row lacks is ``–``."""
    columns = list(dict.fromkeys(k for cells in rows.values() for k in cells))
    lines = [["heatmap from", *columns]]
    lines += [[name, *(cells.get(k, "–") for k in columns)] for name, cells in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
