"""Where a score comes from: a heatmap of every scored image.

A heatmap says how much each region of an image raises its anomaly score. It is a
``(size, size)`` array over the image *as the model saw it* (after preprocessing and
resizing to the network's input), in score units per pixel, positive where a region raises
the score; :meth:`Heatmap.on_original` maps it back onto the original photograph through the
preprocessing's crop box (:meth:`kad.data.preprocessing.Preprocessing.crop_box`) and resize.

How a map is made is part of the detector contract (:mod:`kad.detectors.base`), in this order:

``"detector"``
    The detector overrides :meth:`~kad.detectors.base.BaseDetector.explain_maps` and returns
    its own map from the unpooled block maps; a batch's scores and maps are asked for
    together (:meth:`~kad.detectors.base.BaseDetector.score_maps`). Patch kNN
    (:class:`kad_plugins.patch_knn.PatchKNNDetector`), which scores each location and takes
    the largest, returns its location scores: the map's maximum is the image's score, and
    one search of the bank gives both.

``"gradient"`` (kNN, Mahalanobis, OC-SVM with an RBF or linear kernel, and on feature
vectors Deep SVDD and DSEBM's energy)
    The score ``s`` is a differentiable function of the pooled feature vector ``p``, and
    ``p`` is the spatial mean of the block maps the network has already computed:
    ``p_b = (1/N_b) Σ_l f_{b,l}`` for block ``b`` with ``N_b`` locations ``l``. The score is
    explained against the reference ``r``, the mean training feature vector
    (``detector.reference_``), with integrated gradients (Sundararajan et al. 2017) along
    the straight line from ``r`` to ``p``: ``ḡ = ∫₀¹ ∇s(r + α(p - r)) dα``, taken with the
    midpoint rule over ``steps`` points. Location ``l`` of block ``b`` receives
    ``a_{b,l} = (1/N_b) (f_{b,l} - r_b) · ḡ_b``. Because ``p`` is linear in the ``f_{b,l}``,
    these shares add up to ``ḡ · (p - r)``, which is ``s(p) - s(r)`` up to the quadrature
    error: the map is *complete*, it distributes exactly the score difference it explains
    (:attr:`Heatmap.reference_score` is ``s(r)``). For Mahalanobis the score is quadratic,
    its gradient affine, and the midpoint rule is exact for any ``steps``; for kNN the
    neighbours may change along the path and the sum is exact as ``steps`` grows (the kNN
    score is continuous and piecewise smooth). Assumptions: the score depends on the image
    only through ``p`` (true for every feature detector), and a location's share is read
    through the pooling, i.e. as where the block's feature is, not as the network's
    receptive field (which is wider than one cell of the block's grid). Plain
    gradient x input would need no reference but does not sum to anything meaningful for
    these non-linear scores; integrated gradients does, at ``steps`` detector gradients
    per image and no extra network pass.

``"occlusion"`` (Isolation Forest, DAGMM, anything else)
    The image is cut into a ``grid`` x ``grid`` grid; each cell in turn is filled with
    neutral grey (128 of 255: for fundus preprocessing, exactly the grey it gives where the
    image equals its local average, and an 8-bit value, so the occluded image is one the
    loader could have made) and the image rescored. A cell's value is the score minus the occluded
    score, spread over its pixels and interpolated bilinearly between cell centres. It costs
    ``grid²`` network passes per image beyond the one that scores it, run in batches of
    the pipeline's network batch (:attr:`~kad.screening.pipeline.Pipeline.network_batch`).
    No completeness is promised.

Several blocks concatenated: each block's share is brought to the image's resolution
(bilinear interpolation of its per-pixel density, corrected by a constant so its sum is
kept) and the blocks are added, so maps of different resolutions make one map.

The score of every image is computed from the same pooled outputs as
:meth:`kad.screening.pipeline.Pipeline.score`: a heatmap's :attr:`Heatmap.score` is that
score, and a saved and reloaded pipeline gives identical maps.

Images are explained in batches of at most the pipeline's network batch (its batch size
lowered to the memory budget at the input size, :mod:`kad.features.batching`), none padded (Keras
gives an image the same outputs whatever the batch, as the tests check; OpenVINO pads its
own fixed slices),
and a batch is closed early once the images it keeps for drawing reach
:data:`HEATMAP_BATCH_BYTES`, so memory stays bounded whatever the photographs' size.

Every map can be written as an array (:func:`write_map`): ``.npy`` float32 over the image
as the model saw it, with a JSON sidecar stating where that square lies on the photograph.

The network runs on the pipeline's runtime (the one its features were computed with), or
the one ``runtime`` names (:mod:`kad.features.runtime`): on OpenVINO the models that give
the maps are converted once and cached like the extractor. On Keras the scores are
bit-identical to :meth:`~kad.screening.pipeline.Pipeline.score`'s; on OpenVINO, whose
conversion of a model with maps is another graph than the extractor's, they agree to
float32 rounding.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kad.detectors.base import BaseDetector
from kad.errors import ImageReadError, KadError
from kad.utils.progress import Progress, task
from kad.utils.settings import HEATMAP_METHODS

__all__ = [
    "METHODS",
    "OVERLAY_MAX_SIDE",
    "Explained",
    "Heatmap",
    "HEATMAP_BATCH_BYTES",
    "HeatmapRun",
    "OverlayFiles",
    "check_heatmaps",
    "choose_method",
    "explain",
    "bounded",
    "explain_file",
    "iter_heatmaps",
    "occlusion_cells",
    "overlay",
    "pixel_auroc",
    "pointing_game",
    "save_overlays",
    "to_image_resolution",
    "write_heatmaps",
    "write_map",
    "write_overlay",
]

METHODS = ("auto", *HEATMAP_METHODS)
#: Overlays on the photograph are drawn, and photographs kept for them, with their longest
#: side at most this many pixels: a 10,000 px photograph gives a 2048 px overlay.
OVERLAY_MAX_SIDE = 2048
#: A batch of heatmaps is closed once the images it keeps (as the model saw them, and the
#: photographs bounded by OVERLAY_MAX_SIDE for drawing) reach this many bytes.
HEATMAP_BATCH_BYTES = 256 * 2**20
#: How the report and the failures name a model that draws the maps (``kad score
#: --maps-from``) without a file of its own.
MAPS_MODEL = "the maps model"
DEFAULT_GRID = 8
DEFAULT_STEPS = 16
OCCLUSION_FILL = 128 / 255

# The spatial model (pooled vectors and maps) made from a pipeline's network, per tuple of
# blocks: Keras traces each model once.
_SPATIAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Heatmap:
    """The heatmap of one image; see the module docstring.

    ``map`` is ``(size, size)`` float32 over the image as the model saw it, in score units
    per pixel (positive raises the score); None when the image could not be read, with
    ``error`` saying why. ``block_maps`` holds, for the gradient method, every block's
    per-location shares at the block's own resolution. ``box`` is the region
    ``(left, top, width, height)`` of the original photograph (``original_shape``
    ``(height, width)``, as decoded: a large JPEG is decoded reduced, see
    :func:`kad.data.images.read_image`) that the model saw. ``seen`` and ``original`` are
    the images themselves where kept (for drawing overlays); ``original`` is kept with its
    longest side at most :data:`OVERLAY_MAX_SIDE`, so it may be smaller than
    ``original_shape``.
    """

    id: str
    score: float
    method: str
    map: np.ndarray | None
    reference_score: float | None = None
    forward_passes: int = 1
    block_maps: dict[str, np.ndarray] = field(default_factory=dict)
    box: tuple[int, int, int, int] | None = None
    original_shape: tuple[int, int] | None = None
    seen: np.ndarray | None = None
    original: np.ndarray | None = None
    error: str | None = None

    @property
    def explained(self) -> float | None:
        """The score difference the map distributes (gradient method): ``score -
        reference_score``; None for the other methods."""
        return None if self.reference_score is None else self.score - self.reference_score

    @property
    def peak(self) -> tuple[int, int]:
        """``(row, column)`` of the map's maximum in the image as the model saw it."""
        if self.map is None:
            raise KadError(f"{self.id} has no heatmap: {self.error}")
        return tuple(int(v) for v in np.unravel_index(int(np.argmax(self.map)),
                                                      self.map.shape))

    def on_original(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The map on the original photograph, ``original_shape``, score units per pixel:
        the inverse of the preprocessing's crop and resize. Outside the crop it is 0; the
        sum over the part of the crop inside the photograph is kept. ``shape``: the
        photograph scaled to ``(height, width)`` instead (e.g. a downscaled copy), the
        sum still kept."""
        from kad.data.images import resize

        if self.map is None or self.box is None or self.original_shape is None:
            raise KadError(f"{self.id} has no heatmap to map back: {self.error or 'no box'}")
        left, top, width, height = self.box
        rows, cols = self.original_shape
        if shape is not None and tuple(shape) != (rows, cols):
            sy, sx = shape[0] / rows, shape[1] / cols
            left, top = int(round(left * sx)), int(round(top * sy))
            width, height = max(1, int(round(width * sx))), max(1, int(round(height * sy)))
            rows, cols = int(shape[0]), int(shape[1])
        size = self.map.shape[0]
        scaled = resize(self.map.astype(np.float32), (height, width))
        scaled *= np.float32(size * size / (width * height))  # density per original pixel
        canvas = np.zeros((rows, cols), dtype=np.float32)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, cols), min(top + height, rows)
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = scaled[y0 - top:y1 - top, x0 - left:x1 - left]
        return canvas


def bounded(image: np.ndarray, max_side: int | None = None) -> np.ndarray:
    """``image`` itself when its longest side is at most ``max_side`` (default
    :data:`OVERLAY_MAX_SIDE`), else a copy shrunk (area interpolation, aspect ratio kept)
    to that longest side."""
    from kad.data.images import resize

    max_side = OVERLAY_MAX_SIDE if max_side is None else int(max_side)
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    return resize(image, (max(1, round(height * scale)), max(1, round(width * scale))))


@dataclass
class OverlayFiles:
    """Files of one heatmap: PNG overlays over the image as the model saw it and over the
    original photograph, and the map itself (:func:`write_map`: ``.npy`` and its ``.json``
    sidecar)."""

    seen: Path
    original: Path | None
    map: Path | None = None


@dataclass
class HeatmapRun:
    """What :func:`write_heatmaps` did: the scores (as :meth:`Pipeline.score` returns them),
    the overlay files per image id, the method, network passes and seconds spent."""

    scores: object  # kad.screening.pipeline.Scores
    files: dict[str, OverlayFiles]
    method: str
    forward_passes: int
    seconds: float
    #: The model file the maps were made with when it is not the one that scored the
    #: images (``kad score --maps-from``); None when the scores and maps share a model.
    maps_from: str | None = None


# ----------------------------------------------------------------------- choosing


def choose_method(detector: BaseDetector, method: str = "auto") -> str:
    """The method that will make the maps for ``detector``: ``method`` itself when it is
    available, or, for ``"auto"``, the detector's own, else gradient, else occlusion."""
    if method not in METHODS:
        raise KadError(f"unknown heatmap method {method!r}; use one of {', '.join(METHODS)}")
    own = detector.draws_own_maps()
    reference = getattr(detector, "reference_", None)
    differentiable = reference is not None and (
        detector.score_gradient(np.asarray(reference, dtype=np.float32)[None]) is not None)
    name = type(detector).__name__
    if method == "detector" and not own:
        raise KadError(f"{name} provides no heatmap of its own; use --heatmap-method auto")
    if method == "gradient" and not differentiable:
        why = ("was fitted before kad recorded reference_; refit it" if reference is None
               else "has no score gradient")
        raise KadError(f"{name} {why}; use --heatmap-method occlusion")
    if method != "auto":
        return method
    return "detector" if own else "gradient" if differentiable else "occlusion"


# ----------------------------------------------------------------------- the maps


def to_image_resolution(share: np.ndarray, size: int) -> np.ndarray:
    """A block's per-location shares ``(h, w)`` as a ``(size, size)`` per-pixel density
    whose sum is the shares' sum: bilinear interpolation of the density, plus the constant
    that restores the sum."""
    import cv2

    share = np.asarray(share, dtype=np.float64)
    h, w = share.shape
    density = share * (h * w) / (size * size)
    up = cv2.resize(density, (size, size), interpolation=cv2.INTER_LINEAR)
    up += (share.sum() - up.sum()) / (size * size)
    return up


def occlusion_cells(size: int, grid: int) -> list[tuple[slice, slice]]:
    """The ``grid²`` cells ``(rows, columns)`` of a ``size`` square image, row by row."""
    if not 1 <= grid <= size:
        raise KadError(f"occlusion grid must be between 1 and the image size {size}, "
                       f"got {grid}")
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    return [(slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1]))
            for i in range(grid) for j in range(grid)]


def _cells_to_map(values: np.ndarray, size: int, grid: int) -> np.ndarray:
    import cv2

    cells = occlusion_cells(size, grid)
    area = np.array([(r.stop - r.start) * (c.stop - c.start) for r, c in cells], float)
    density = (values / area).reshape(grid, grid)
    return cv2.resize(density, (size, size), interpolation=cv2.INTER_LINEAR)


class _Explainer:
    """The network pieces and settings shared by every batch.

    Every image is scored as :meth:`Pipeline.score` scores it: the representation's
    network on the pipeline's runtime, its outputs assembled into the detector's input
    (:mod:`kad.features.representation`). Occlusion rescoring goes the same way. The
    gradient method alone needs the maps under the pooled vectors, and runs the spatial
    model that gives both."""

    def __init__(self, pipeline, method: str, grid: int, steps: int, weights: str | None,
                 batch_size: int | None, runtime: str | None = None):
        from kad.data.preprocessing import get_preprocessing
        from kad.features.backbones import get_backbone, spatial_extractor
        from kad.features.batching import network_batch
        from kad.features.runtime import model_runtime

        self.pipeline = pipeline
        self.detector = pipeline.detector
        self.representation = pipeline.representation
        self.method = choose_method(self.detector, method)
        if self.method == "gradient" and not pipeline.has_network:
            if method == "gradient":
                raise KadError(
                    f"{pipeline.source} is an exported model: its network is OpenVINO IR "
                    "without the block maps gradient heatmaps need; use --heatmap-method "
                    "occlusion, or the model file it was exported from")
            self.method = "occlusion"  # auto: the next best the exported network can do
        if self.method == "gradient" and pipeline.precision == "int8":
            if method == "gradient":
                raise KadError(
                    f"{pipeline.source or 'this model'} scores on an int8 network, which "
                    "gives pooled features only, not the block maps gradient heatmaps "
                    "need; use --heatmap-method occlusion")
            self.method = "occlusion"  # auto: occlusion rescoring runs on the int8 network
        if steps < 1:
            raise KadError(f"integration steps must be at least 1, got {steps}")
        self.grid, self.steps = int(grid), int(steps)
        self.size = int(pipeline.image_size)
        if self.method == "occlusion":
            occlusion_cells(self.size, self.grid)  # checks the grid
        # the images per network call, bounded by the memory budget at this input size
        self.batch_size = (pipeline.network_batch if batch_size is None else network_batch(
            get_backbone(pipeline.backbone), self.size, int(batch_size)))
        self.backbone = pipeline.input_scaling()
        self.preprocessing = get_preprocessing(pipeline.preprocessing)
        self.runner = pipeline.runner(weights, runtime)
        self.blocks = list(pipeline.blocks)
        if self.method == "gradient":
            model = pipeline.network(weights)
            built = _SPATIAL.setdefault(model, {})
            key = (*self.blocks, self.runner.name, self.batch_size)
            if key not in built:  # the maps under the pooled vectors, on the same runtime
                built[key] = model_runtime(
                    spatial_extractor(model, self.blocks), pipeline.backbone, self.size,
                    pipeline.weights_used, self.runner.name, self.batch_size,
                    extractor=model)
            self.spatial = built[key]
            self.reference = np.asarray(self.detector.reference_, dtype=np.float64)
            self.reference_score = float(self.detector.anomaly_score(
                self.reference.astype(np.float32)[None])[0])

    @property
    def passes_per_image(self) -> int:
        return 1 + (self.grid ** 2 if self.method == "occlusion" else 0)

    def _run(self, network, images: np.ndarray) -> list[np.ndarray]:
        """``network`` (a runtime or a Keras model) on ``images`` in [0, 1], in batches of
        at most ``batch_size``, none padded: the network runs only on images that are
        there."""
        from kad.features.runtime import as_runtime

        runner = as_runtime(network)
        # As the loader feeds it (kad.features.extraction.stream_features), so that an
        # image scores here exactly as it does there: 8-bit where the runtime takes them.
        pixels = getattr(runner, "takes_pixels", False) and self.preprocessing.eight_bit
        outs: list[list[np.ndarray]] = []
        bs = self.batch_size
        for start in range(0, len(images), bs):
            batch = images[start:start + bs]
            x = (np.rint(np.clip(batch, 0.0, 1.0) * 255.0).astype(np.uint8) if pixels
                 else self.backbone.preprocess(batch))
            outs.append(list(runner.predict(x)))
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]

    def _inputs(self, images: np.ndarray) -> np.ndarray:
        """The detector's inputs for ``images``, as the pipeline makes them."""
        return self.representation.assemble(self._run(self.runner, images))

    def batch(self, seen: np.ndarray) -> list[tuple[float, np.ndarray, float | None,
                                                    dict[str, np.ndarray]]]:
        """``(score, map, reference score, block maps)`` for a batch of preprocessed images
        (at most ``batch_size``)."""
        if self.method == "gradient":
            outputs = self._run(self.spatial, seen)
            pooled = np.concatenate(outputs[0::2], axis=1)
            return self._gradient(self.detector.anomaly_score(pooled), outputs[1::2])
        inputs = self._inputs(seen)
        if self.method == "occlusion":
            return self._occlusion(self.detector.anomaly_score(inputs), seen)
        # the detector's own maps and scores from one pass (BaseDetector.score_maps)
        scores, maps = self.detector.score_maps(inputs)
        if len(scores) != len(inputs) or len(maps) != len(inputs):
            raise KadError(f"{type(self.detector).__name__}.score_maps returned "
                           f"{len(scores)} scores and {len(maps)} maps for "
                           f"{len(inputs)} images")
        results = []
        for score, own in zip(scores, maps, strict=True):
            if own is None:
                raise KadError(f"{type(self.detector).__name__}.explain_maps returned None")
            results.append((float(score), _resized(own, self.size), None, {}))
        return results

    def _gradient(self, scores, maps):
        n = len(scores)
        widths = [m.shape[-1] for m in maps]
        bounds = np.cumsum([0, *widths])
        pooled = np.concatenate([m.astype(np.float64).mean(axis=(1, 2)) for m in maps], axis=1)
        delta = pooled - self.reference
        alphas = (np.arange(self.steps) + 0.5) / self.steps
        path = self.reference + alphas[None, :, None] * delta[:, None, :]  # (n, steps, d)
        grads = self.detector.score_gradient(
            path.reshape(n * self.steps, -1).astype(np.float32))
        mean_grad = grads.reshape(n, self.steps, -1).mean(axis=1)
        results = []
        for i in range(n):
            total = np.zeros((self.size, self.size))
            block_maps = {}
            for k, block in enumerate(self.blocks):
                lo, hi = bounds[k], bounds[k + 1]
                f = maps[k][i].astype(np.float64)  # (h, w, c)
                h, w = f.shape[:2]
                share = (f - self.reference[lo:hi]) @ mean_grad[i, lo:hi] / (h * w)
                block_maps[block] = share.astype(np.float32)
                total += to_image_resolution(share, self.size)
            results.append((float(scores[i]), total.astype(np.float32),
                            self.reference_score, block_maps))
        return results

    def _occlusion(self, scores, seen):
        cells = occlusion_cells(self.size, self.grid)
        results = []
        for i, image in enumerate(seen):
            occluded = np.repeat(image[None], len(cells), axis=0)
            for k, (rows, cols) in enumerate(cells):
                occluded[k, rows, cols] = OCCLUSION_FILL
            dropped = self.detector.anomaly_score(self._inputs(occluded))
            values = float(scores[i]) - dropped
            results.append((float(scores[i]),
                            _cells_to_map(values, self.size, self.grid).astype(np.float32),
                            None, {}))
        return results


def _resized(own: np.ndarray, size: int) -> np.ndarray:
    from kad.data.images import resize

    own = np.asarray(own, dtype=np.float32)
    if own.ndim != 2:
        raise KadError(f"a detector's own heatmap must be 2-D, got shape {own.shape}")
    return np.asarray(resize(own, size), dtype=np.float32)


def _drawer(pipeline, method: str, maps, weights: str | None):
    """``(the pipeline that draws the maps, the weights it runs with)``: ``maps`` when
    given, else ``pipeline.drawer(method)`` (its lesion maps model for auto). ``weights``
    (where the model's weights file is now) go to ``pipeline`` and to its own lesion maps
    model, fitted with the same weights; another model file's uses its recorded ones."""
    drawer = pipeline.drawer(method) if maps is None else maps
    own = drawer is pipeline or drawer is pipeline.maps
    return drawer, weights if own else None


def check_heatmaps(pipeline, method: str = "auto", grid: int = DEFAULT_GRID,
                   steps: int = DEFAULT_STEPS, weights: str | None = None,
                   runtime: str | None = None, maps=None) -> str:
    """Check, before any image is read, that heatmaps of ``pipeline`` can be made by
    ``method`` (with ``grid``, ``steps``, ``weights``, ``runtime`` and ``maps`` as
    :func:`iter_heatmaps` takes them): the drawing model's network is built and its weights
    checked (kept for the heatmaps that follow). Returns the method that will make them;
    raises :class:`KadError` saying why not."""
    drawer, weights = _drawer(pipeline, method, maps, weights)
    return _Explainer(drawer, method, grid, steps, weights, None, runtime).method


def iter_heatmaps(pipeline, source, ids: Sequence[str] | None = None, *,
                  method: str = "auto", grid: int = DEFAULT_GRID, steps: int = DEFAULT_STEPS,
                  weights: str | None = None, batch_size: int | None = None,
                  keep_images: bool = True, runtime: str | None = None,
                  progress: Progress | None = None, maps=None) -> Iterator[Heatmap]:
    """One :class:`Heatmap` per image of ``source`` (an :class:`~kad.data.datasets.ImageSource`),
    in order, streamed batch by batch; unreadable images give a heatmap with ``map`` None
    and ``error`` set. See the module docstring for ``method``, ``grid`` and ``steps``;
    ``runtime`` (default: the pipeline's); ``progress`` gets the task ``heatmaps``
    (images done of all).

    The maps are drawn by ``maps`` (another fitted pipeline) when given, else by
    ``pipeline.drawer(method)``: its lesion maps model for auto, where it has one. When
    another model draws them, every heatmap's score is still ``pipeline``'s own, read in
    a first pass over ``source`` (the drawing model's score and reference are dropped),
    and an image either model cannot read has no map, with the reason."""
    drawer, drawn_weights = _drawer(pipeline, method, maps, weights)
    explainer = _Explainer(drawer, method, grid, steps, drawn_weights, batch_size, runtime)
    ids = [str(i) for i in (ids if ids is not None else range(len(source)))]
    if len(ids) != len(source):
        raise KadError(f"{len(ids)} ids for {len(source)} images")
    own = None if drawer is pipeline else pipeline.score(
        source, ids, progress=progress, weights=weights, runtime=runtime)
    size, bs = explainer.size, explainer.batch_size
    with task(progress, "heatmaps", len(source)) as update:
        drawn = _heatmaps(explainer, source, ids, size, bs, keep_images, update)
        if own is None:
            yield from drawn
            return
        name = model_file(drawer) or MAPS_MODEL
        for row, heat in enumerate(drawn):
            yield _scored_by(heat, float(own.scores[row]), own.failed.get(heat.id), name)


def _scored_by(heat: Heatmap, score: float, failed: str | None, name: str) -> Heatmap:
    """``heat``, drawn by the model ``name``, with the score of the model that scores the
    image (``failed``: why that model could not read it)."""
    from dataclasses import replace

    if failed is not None:
        return replace(heat, score=float("nan"), map=None, reference_score=None,
                       error=failed)
    if heat.map is None:
        return replace(heat, score=float("nan"), reference_score=None,
                       error=f"{heat.error} (reading it for the heatmaps of {name})")
    return replace(heat, score=score, reference_score=None)


def _load(explainer, source, index: int, size: int):
    """``(seen, box, decoded shape, photograph kept for overlays)`` of one image, loaded
    as :meth:`Pipeline.score` loads it (a large JPEG decoded reduced, images with nothing
    to screen refused); only a copy of the photograph bounded by
    :data:`OVERLAY_MAX_SIDE` outlives this call."""
    from kad.data.images import check_usable
    from kad.features.extraction import preprocess_image

    side = explainer.preprocessing.source_side(size)
    load_scaled = getattr(source, "load_scaled", None)
    rgb = source.load(index) if load_scaled is None or side is None else load_scaled(
        index, side)
    rgb = check_usable(rgb, source.describe(index))
    seen = preprocess_image(rgb, explainer.preprocessing, size)
    box = explainer.preprocessing.crop_box(rgb)
    return seen, box, rgb.shape[:2], bounded(rgb)


def _batches(explainer, source, size, bs, keep_images):
    """``(start, stop, loaded, failed)``: consecutive images loaded, at most ``bs`` of them
    and, once the images kept reach :data:`HEATMAP_BATCH_BYTES`, no more."""
    start = 0
    while start < len(source):
        loaded: list[tuple[int, np.ndarray, tuple, tuple, np.ndarray | None]] = []
        failed: dict[int, str] = {}
        held = 0
        index = start
        while index < len(source) and index - start < bs and held < HEATMAP_BATCH_BYTES:
            try:
                seen, box, shape, kept = _load(explainer, source, index, size)
            except ImageReadError as exc:
                failed[index] = exc.reason
            else:
                kept = kept if keep_images else None
                held += seen.nbytes + (0 if kept is None else kept.nbytes)
                loaded.append((index, seen, box, shape, kept))
            index += 1
        yield start, index, loaded, failed
        start = index


def _heatmaps(explainer, source, ids, size, bs, keep_images, update) -> Iterator[Heatmap]:
    for start, stop, loaded, failed in _batches(explainer, source, size, bs, keep_images):
        results = explainer.batch(np.stack([x[1] for x in loaded])) if loaded else []
        made = {x[0]: (x, r) for x, r in zip(loaded, results, strict=True)}
        loaded.clear()  # each image is held by ``made`` alone, until it is handed out
        for index in range(start, stop):
            if index in failed:
                yield Heatmap(ids[index], float("nan"), explainer.method, None,
                              forward_passes=0, error=failed[index])
                continue
            (_, seen, box, shape, kept), (score, heat, ref, blocks) = made.pop(index)
            yield Heatmap(ids[index], score, explainer.method, heat, reference_score=ref,
                          forward_passes=explainer.passes_per_image, block_maps=blocks,
                          box=tuple(int(v) for v in box), original_shape=tuple(shape),
                          seen=seen if keep_images else None, original=kept)
        update(stop)


def explain(pipeline, source, ids: Sequence[str] | None = None, **options) -> list[Heatmap]:
    """Heatmaps of every image of ``source``, as a list (see :func:`iter_heatmaps` for the
    options); for a whole folder prefer :func:`write_heatmaps`, which streams."""
    return list(iter_heatmaps(pipeline, source, ids, **options))


# ----------------------------------------------------------------------- drawing


def overlay(image: np.ndarray, heat: np.ndarray, vmax: float | None = None,
            opacity: float = 0.6) -> np.ndarray:
    """``image`` (RGB, [0, 1] float or uint8) with the positive part of ``heat`` (same
    height and width) drawn over it in the "jet" colour map, the more opaque the higher:
    regions that lower the score or do not matter stay as they are. ``vmax`` (default:
    the map's maximum) is the value drawn at full colour. Returns RGB uint8."""
    import cv2

    from kad.data.images import to_rgb_uint8

    rgb = to_rgb_uint8(image).astype(np.float32)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != rgb.shape[:2]:
        raise KadError(f"heatmap of shape {heat.shape} for an image of shape {rgb.shape}")
    top = float(np.max(heat)) if vmax is None else float(vmax)
    level = np.clip(heat / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat)
    colour = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = (opacity * level)[..., None]
    return np.clip(rgb * (1 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)


def _stem(ident: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(ident).stem)[:60]
    return f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise KadError(f"could not encode {path} as PNG")
    from kad.utils.files import write_bytes

    return write_bytes(path, buf.tobytes())


def write_overlay(heatmap: Heatmap, path: str | Path, on: str = "seen") -> Path:
    """Write one overlay PNG to ``path``: over the image as the model saw it (``on="seen"``)
    or mapped back over the original photograph (``on="original"``), drawn with its
    longest side at most :data:`OVERLAY_MAX_SIDE` pixels."""
    if heatmap.map is None:
        raise KadError(f"{heatmap.id} has no heatmap: {heatmap.error}")
    if on not in ("seen", "original"):
        raise KadError(f"an overlay is drawn on 'seen' or 'original', got {on!r}")
    image = heatmap.seen if on == "seen" else heatmap.original
    if image is None:
        raise KadError(f"{heatmap.id}: the heatmap was made without keep_images=True")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if on == "seen":
        return _write_png(path, overlay(image, heatmap.map))
    image = bounded(image)  # at most OVERLAY_MAX_SIDE a side, whatever the photograph
    back = heatmap.on_original(image.shape[:2])
    return _write_png(path, overlay(image, back, vmax=float(back.max())))


def write_map(heatmap: Heatmap, path: str | Path, model: str | None = None) -> Path:
    """Write the map itself to ``path`` (``.npy``, float32, ``(size, size)`` over the image
    as the model saw it, score units per pixel of the map) and, beside it with the suffix
    ``.json``, where that square lies on the photograph: ``box`` ``(left, top, width,
    height)`` in the pixels of the photograph as decoded (``decoded_shape``, height and
    width: a large JPEG is decoded reduced) and ``box_fraction``, the same box in
    fractions of the photograph's width and height, which hold at any resolution. Map
    pixel ``(i, j)`` covers ``x`` from ``left + j * width / size`` to ``left + (j + 1) *
    width / size`` and ``y`` likewise with ``top``, ``height`` and ``i``
    (:meth:`Heatmap.on_original` applies it). ``score`` is the image's score, by the model
    that scored it; ``model``, when given, is the model file that drew the map (a lesion
    maps model or ``--maps-from``, which may not be the one that scored). Both files are
    written aside and renamed when complete; returns the ``.npy`` path."""
    import io
    import json

    from kad.utils.files import write_bytes, write_text

    if heatmap.map is None:
        raise KadError(f"{heatmap.id} has no heatmap: {heatmap.error}")
    path = Path(path)
    if path.suffix != ".npy":
        raise KadError(f"a map is written as .npy, got {path.name!r}")
    heat = np.ascontiguousarray(heatmap.map, dtype=np.float32)
    sidecar = {"image": heatmap.id, "score": float(heatmap.score), "method": heatmap.method,
               "map_shape": list(heat.shape), "dtype": "float32",
               "units": "score per pixel of the map (positive raises the score)"}
    if model is not None:
        sidecar["model"] = str(model)
    if heatmap.explained is not None:
        sidecar["explained"] = float(heatmap.explained)
    if heatmap.box is not None and heatmap.original_shape is not None:
        left, top, width, height = (int(v) for v in heatmap.box)
        rows, cols = (int(v) for v in heatmap.original_shape)
        sidecar.update(
            decoded_shape=[rows, cols],
            box={"left": left, "top": top, "width": width, "height": height},
            box_fraction={"left": left / cols, "top": top / rows, "width": width / cols,
                          "height": height / rows},
            transform="map pixel (i, j) covers x in [left + j*width/W, left + (j+1)*width/W) "
                      "and y in [top + i*height/H, top + (i+1)*height/H) of the photograph, "
                      "W, H the map's width and height; outside the box the map is 0")
    buffer = io.BytesIO()
    np.save(buffer, heat, allow_pickle=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buffer.getvalue())
    write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")
    return path


def save_overlays(heatmap: Heatmap, out_dir: str | Path, stem: str | None = None,
                  model: str | None = None) -> OverlayFiles:
    """Write ``STEM_seen.png`` (the map over the image as the model saw it),
    ``STEM_original.png`` (mapped back over the original photograph) and the map itself,
    ``STEM_map.npy`` with ``STEM_map.json`` (:func:`write_map`), into ``out_dir``.
    ``stem`` defaults to the image's name and a hash of its id (unique per id: two
    ``eye.jpeg`` of different folders never share a file); ``model``: the model file that
    made the map, recorded in its sidecar."""
    out = Path(out_dir)
    stem = stem or _stem(heatmap.id)
    seen = write_overlay(heatmap, out / f"{stem}_seen.png", "seen")
    original = None
    if heatmap.original is not None and heatmap.box is not None:
        original = write_overlay(heatmap, out / f"{stem}_original.png", "original")
    return OverlayFiles(seen, original, write_map(heatmap, out / f"{stem}_map.npy", model))


def model_file(pipeline) -> str | None:
    """The model file ``pipeline`` was read from, as a map's sidecar and the report name
    it (a lesion maps model, :attr:`~kad.screening.pipeline.Pipeline.maps`, as the file's
    own); None for a pipeline fitted in this process."""
    if pipeline.source is None:
        return None
    return f"{pipeline.source} (its lesion maps model)" if pipeline.is_maps else str(
        pipeline.source)


def write_heatmaps(pipeline, source, ids: Sequence[str] | None, out_dir: str | Path, *,
                   method: str = "auto", grid: int = DEFAULT_GRID,
                   steps: int = DEFAULT_STEPS, weights: str | None = None,
                   runtime: str | None = None,
                   progress: Progress | None = None, on_heatmap=None,
                   maps=None) -> HeatmapRun:
    """Score every image of ``source`` and write its two overlays into ``out_dir``,
    streaming (images are not kept). The scores are those :meth:`Pipeline.score` gives;
    the maps come from the model :func:`iter_heatmaps` draws them with (``maps``, or
    ``pipeline``'s lesion maps model). ``on_heatmap``, a callable, receives every
    :class:`Heatmap` before it is let go (the report keeps a small copy of each map this
    way). Each map's sidecar names the model file that made it where the model was read
    from one."""
    from kad.features.extraction import Scores

    ids = [str(i) for i in (ids if ids is not None else range(len(source)))]
    scores = np.full(len(ids), np.nan)
    failed: dict[str, str] = {}
    files: dict[str, OverlayFiles] = {}
    passes = 0
    used = method
    began = time.perf_counter()
    drawer, _ = _drawer(pipeline, method, maps, weights)
    name = model_file(drawer)
    for row, heat in enumerate(iter_heatmaps(pipeline, source, ids, method=method, grid=grid,
                                             steps=steps, weights=weights, runtime=runtime,
                                             progress=progress, maps=maps)):
        used = heat.method
        passes += heat.forward_passes
        if on_heatmap is not None:
            on_heatmap(heat)
        if heat.map is None:
            failed[heat.id] = heat.error or "unreadable"
            continue
        scores[row] = heat.score
        files[heat.id] = save_overlays(heat, out_dir, model=name)
    return HeatmapRun(Scores(ids, scores, failed), files, used, passes,
                      time.perf_counter() - began,
                      maps_from=None if drawer is pipeline else name or MAPS_MODEL)


@dataclass
class Explained:
    """What :func:`explain_file` found and wrote for one image."""

    file: str
    score: float
    flagged: bool
    threshold: float
    percentile: float
    method: str
    forward_passes: int
    peak: tuple[int, int]  # (row, column) in the image as the model saw it
    image_size: int
    explained: float | None  # score - reference score (gradient method), else None
    attributed: float  # the map's sum
    seen_png: Path
    original_png: Path | None
    map_npy: Path | None = None  # the map itself, beside seen_png (write_map)
    #: The model that drew the map where it is not the one that scored (its lesion maps
    #: model); None where the map is the scoring model's own.
    maps_from: str | None = None
    #: The files written over files that were there before (said, never silently).
    replaced: list[Path] = field(default_factory=list)


def explain_file(pipeline, image: str | Path, out: str | Path, *,
                 original: str | Path | None = None, method: str = "auto",
                 grid: int = DEFAULT_GRID, steps: int = DEFAULT_STEPS,
                 weights: str | None = None, runtime: str | None = None) -> Explained:
    """Explain one image file: the overlay on the image as the model saw it goes to
    ``out``, the map itself beside it (``out`` with the suffix ``.npy``, and its ``.json``
    sidecar: :func:`write_map`), and, with ``original``, the overlay on the photograph
    goes there. An unreadable image raises :class:`~kad.errors.ImageReadError`."""
    from kad.data.datasets import FileSource

    drawer = pipeline.drawer(method)  # the map is its, the score the model's own
    found = explain(pipeline, FileSource([Path(image)]), [str(image)], method=method,
                    grid=grid, steps=steps, weights=weights, runtime=runtime)[0]
    if found.map is None:
        raise ImageReadError(image, found.error or "unreadable")
    score = found.score
    npy = Path(out).with_suffix(".npy")
    replaced = [p for p in (Path(out), original and Path(original), npy,
                            npy.with_suffix(".json")) if p is not None and p.exists()]
    seen = write_overlay(found, out, "seen")
    back = write_overlay(found, original, "original") if original is not None else None
    array = write_map(found, npy, model_file(drawer))
    return Explained(
        str(image), score, bool(pipeline.flag(np.array([score]))[0]),
        float(pipeline.threshold.value), float(pipeline.percentile(np.array([score]))[0]),
        found.method, found.forward_passes, found.peak, int(found.map.shape[0]),
        found.explained, float(found.map.astype(np.float64).sum()), seen, back, array,
        maps_from=None if drawer is pipeline else (model_file(drawer) or MAPS_MODEL),
        replaced=replaced)


# ----------------------------------------------------------------------- evaluation


def pointing_game(heat: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the map's maximum falls inside ``mask`` (the planted lesion), or within
    ``tolerance`` pixels of it (Zhang et al. 2016 use 15 px at 224). Ties: the first
    maximum in row order."""
    import cv2

    heat = np.asarray(heat)
    mask = np.asarray(mask, dtype=bool)
    if heat.shape != mask.shape:
        raise KadError(f"heatmap of shape {heat.shape} for a mask of shape {mask.shape}")
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if tolerance <= 0:
        return bool(mask[row, col])
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return bool(distance[row, col] <= tolerance)


def pixel_auroc(heat: np.ndarray, mask: np.ndarray, region: np.ndarray | None = None,
                ) -> float:
    """AUROC of the map's values as a per-pixel detector of ``mask``, over the pixels of
    ``region`` (default: all)."""
    from sklearn.metrics import roc_auc_score

    heat = np.asarray(heat, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    keep = np.ones_like(mask) if region is None else np.asarray(region, dtype=bool)
    y = mask[keep]
    if y.all() or not y.any():
        raise KadError("pixel AUROC needs lesion and background pixels inside the region")
    return float(roc_auc_score(y, heat[keep]))
