"""The paper's preprocessing, as small frozen dataclasses.

Natural images: "The only preprocessing was rescaling the images to [0, 1]"
(:class:`Natural`). Fundus photographs: "We squared cropped to cut the neutral background
and resized images to 256 pixels, before subtracting the local average color to reduce
differences in lighting. Pixel values were rescaled to [0,1]" (:class:`Fundus`, which
follows Ben Graham's Kaggle diabetic-retinopathy recipe for the local average colour).

A preprocessing takes an ``(H, W, 3)`` ``uint8`` RGB image and returns an ``(h, w, 3)``
``float32`` image with values in [0, 1]. Its :attr:`~Preprocessing.key` spells every
parameter (``fundus:alpha=4.0,blur=0.016666666666666666,mask=0.9,size=256``); feature
caches record it, and :func:`get_preprocessing` turns it back into an equal object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, ClassVar

import cv2
import numpy as np

from kad.data.images import resize, to_rgb_uint8
from kad.utils.specs import Spec, parse_spec

__all__ = [
    "Fundus",
    "Natural",
    "Preprocessing",
    "crop_fundus",
    "fundus_box",
    "get_preprocessing",
    "preprocessing_at",
]


@dataclass(frozen=True)
class Preprocessing:
    """Base class: a named, parametrised map from RGB ``uint8`` to ``float32`` in [0, 1]."""

    name: ClassVar[str] = ""
    #: Raised whenever the numbers a preprocessing produces change beyond float noise;
    #: feature caches record it next to :attr:`key`, so old entries are not reused.
    revision: ClassVar[int] = 1

    #: Whether :meth:`pixels` gives the output as an 8-bit image: the float output is then
    #: exactly ``pixels(rgb) / 255``, and the loader hands 8-bit batches to a network that
    #: scales its own input (a quarter of the memory and no scaling pass in Python).
    eight_bit: ClassVar[bool] = False

    def pixels(self, rgb: np.ndarray) -> np.ndarray:
        """The output as ``uint8`` on the 0-255 scale, where :attr:`eight_bit`."""
        raise NotImplementedError(f"preprocessing {self.name!r} has no 8-bit output")

    def pixels_into(self, rgb: np.ndarray, out: np.ndarray) -> np.ndarray:
        """:meth:`pixels` resized to ``out``'s height and width (:func:`resize`) and
        written into ``out`` (``uint8``, C-contiguous: a row of a batch), with no copy of
        the result in between."""
        return resize(self.pixels(rgb), out.shape[:2], out=out)

    def source_side(self, input_size: int) -> int | None:  # noqa: ARG002 - a hook
        """The shorter side an image needs for this preprocessing to give the same result
        at ``input_size`` (the network input); a large JPEG is decoded at a reduced size
        that keeps at least this much. None: the full image is needed."""
        return None

    @property
    def key(self) -> str:
        """Canonical ``name:key=value,...`` with every parameter, keys sorted."""
        return str(Spec(self.name, {f.name: getattr(self, f.name) for f in fields(self)}))

    def __str__(self) -> str:
        return self.key

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def crop_box(self, rgb: np.ndarray) -> tuple[int, int, int, int]:
        """``(left, top, width, height)``: the region of ``rgb``, in its pixels, that the
        output covers (it may reach past the photograph, where the output is padding). The
        output is this region resized to the output's size, so a map over the output maps
        back onto the photograph by the inverse resize. The whole image by default."""
        height, width = to_rgb_uint8(rgb).shape[:2]
        return 0, 0, width, height


@dataclass(frozen=True)
class Natural(Preprocessing):
    """Rescale to [0, 1]; the size is unchanged.

    ``resize``
        ``8bit`` (the default): the image is resized to the network's input as an 8-bit
        image, rounded to the nearest grey level, as image loaders do (revision 3).
        ``float``: resized in float32, as kad did before (revision 2); a model file written
        then is scored this way, so that it scores as it was fitted.
    """

    name: ClassVar[str] = "natural"
    #: 2: large JPEGs are decoded at a reduced size. 3: resized to the network's input as
    #: an 8-bit image (rounded to the nearest grey level), as image loaders do.
    resize: str = "8bit"

    def __post_init__(self) -> None:
        if self.resize not in ("8bit", "float"):
            raise ValueError(f"natural resize must be 8bit or float, got {self.resize!r}")

    @property
    def revision(self) -> int:  # type: ignore[override]
        return 3 if self.resize == "8bit" else 2

    @property
    def eight_bit(self) -> bool:  # type: ignore[override]
        return self.resize == "8bit"

    @property
    def key(self) -> str:
        """``natural``, or ``natural:resize=float`` for the float32 resize."""
        return self.name if self.resize == "8bit" else f"{self.name}:resize={self.resize}"

    def source_side(self, input_size: int) -> int | None:
        return int(input_size)  # the image is resized to input_size x input_size

    def pixels(self, rgb: np.ndarray) -> np.ndarray:
        return to_rgb_uint8(rgb)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        image = to_rgb_uint8(rgb).astype(np.float32)
        image /= np.float32(255.0)  # in place: one copy of the image, not two
        return image


@dataclass(frozen=True)
class Fundus(Preprocessing):
    """Square crop around the fundus, resize, subtract the local average colour.

    The defaults are Ben Graham's Kaggle diabetic-retinopathy recipe: with the fundus
    radius ``r``, ``4 * image - 4 * GaussianBlur(image, sigma=r / 30) + 128``, then grey
    outside ``0.9 r``. Here the fundus diameter is the output ``size``, so ``r / 30`` is
    ``size / 60``.

    ``size``
        Side of the output in pixels (at least 32); the fundus diameter becomes this.
    ``blur``
        Standard deviation of the Gaussian giving the local average colour, as a fraction
        of ``size``.
    ``alpha``
        Contrast gain: ``out = alpha * image - alpha * blurred + 128`` on the 0-255 scale,
        clipped, then divided by 255.
    ``mask``
        Pixels farther from the fundus centre than this fraction of its radius, and those
        as close to a straight edge where the camera or the image frame cut the fundus
        off, are set to neutral grey (128 of 255). This hides the bright ring that subtracting the
        blurred image draws along the fundus border (about two ``blur`` sigmas wide, so
        lower ``mask`` when raising ``blur``). 1 keeps the whole fundus.
    """

    name: ClassVar[str] = "fundus"
    eight_bit: ClassVar[bool] = True
    #: 2: the fundus is searched with fewer, cheaper passes, its mask drawn at the output
    #: size, the local average computed at half resolution, large JPEGs decoded reduced.
    #: 3: the fundus is searched on a regular sample of a large photograph's pixels and the
    #: mask's edge eroded by a distance transform (tests/test_fundus_tolerance.py).
    #: 4: computed on 8-bit images (grey 128 outside the mask), the mask's straight cuts
    #: eroded as half-planes.
    revision: ClassVar[int] = 4
    size: int = 256
    blur: float = 1 / 60
    alpha: float = 4.0
    mask: float = 0.9

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, float) and size.is_integer():
            size = int(size)
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 32:
            raise ValueError(f"fundus size must be an integer of at least 32 pixels, got {size!r}")
        object.__setattr__(self, "size", int(size))
        blur = _number("blur", self.blur)
        if not blur > 0:
            raise ValueError(
                f"fundus blur must be > 0 (the Gaussian's sigma as a fraction of size, "
                f"e.g. 0.0167), got {self.blur!r}"
            )
        alpha = _number("alpha", self.alpha)
        if not alpha > 0:
            raise ValueError(f"fundus alpha must be > 0 (e.g. 4.0), got {self.alpha!r}")
        mask = _number("mask", self.mask)
        if not 0 < mask <= 1:
            raise ValueError(
                f"fundus mask must be in (0, 1] (a fraction of the fundus radius), "
                f"got {self.mask!r}"
            )
        for field_name, value in (("blur", blur), ("alpha", alpha), ("mask", mask)):
            object.__setattr__(self, field_name, value)

    def source_side(self, input_size: int) -> int | None:  # noqa: ARG002 - a hook
        # The fundus is at least half the photograph's shorter side in every camera kad
        # knows; decoding at twice the output size keeps its diameter >= size.
        return 2 * self.size

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        out = self.pixels(rgb).astype(np.float32)
        out /= np.float32(255.0)  # in place: one copy of the image, not two
        return out

    def pixels_into(self, rgb: np.ndarray, out: np.ndarray) -> np.ndarray:
        if out.shape[:2] != (self.size, self.size):
            return super().pixels_into(rgb, out)
        return self.pixels(rgb, out=out)

    def pixels(self, rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The preprocessed image as ``uint8`` on the 0-255 scale, ``size`` square: the
        recipe's own precision (Graham's computes it on 8-bit images); :meth:`__call__`
        is this divided by 255. ``out`` (``size`` x ``size`` x 3, ``uint8``,
        C-contiguous: a row of a batch) receives it, written in place.

        Every step works on 8-bit images, which OpenCV processes several times faster
        than floating point: the crop is resized, its local average computed and
        subtracted (rounded and clipped in one pass), the mask drawn, all at ``size``.
        """
        rgb = to_rgb_uint8(rgb)
        found = _find_fundus(rgb)
        crop, (left, top, side) = _square_crop(rgb, found)
        image = resize(crop, self.size)
        blurred = _local_average(image, self.blur * self.size)
        # alpha * image - alpha * blurred + 128, rounded and clipped to 0-255, in one pass.
        if out is not None and (out.shape != (self.size, self.size, 3)
                                or out.dtype != np.uint8 or not out.flags.c_contiguous):
            raise ValueError(f"fundus pixels: out must be a C-contiguous uint8 array of "
                             f"shape {(self.size, self.size, 3)}, got {out.dtype} {out.shape}")
        out = cv2.addWeighted(image, self.alpha, blurred, -self.alpha, float(_GREY), dst=out)
        if found is not None:
            # The fundus mask drawn at the output size: the disc and the bright region's
            # hull, mapped from photograph pixels to output pixels.
            hull = (found[1] + 0.5 - (left, top)) * (self.size / side) - 0.5
            margin = round((1.0 - self.mask) * self.size / 2)
            inside = (_eroded(self.size, hull, margin) if margin > 0
                      else _fundus_mask(self.size, hull))
            # Neutral grey outside the mask: one masked copy (OpenCV) of a shared image.
            cv2.copyTo(_grey(self.size), (~inside).view(np.uint8), out)
        return out

    def crop_box(self, rgb: np.ndarray) -> tuple[int, int, int, int]:
        """The square :func:`crop_fundus` cuts, as ``(left, top, side, side)``."""
        left, top, side = fundus_box(rgb)
        return left, top, side, side


def _eroded(side: int, hull: np.ndarray, margin: int) -> np.ndarray:
    """The fundus mask (the disc inscribed in a ``side`` square and inside the convex
    ``hull``, x, y points in that square's pixel coordinates) eroded by a disc
    ``2 * margin + 1`` wide: pixels nearer than ``margin`` to the mask's edge are dropped.

    Erosion distributes over intersection, so the result is the eroded disc (the same for
    every image: computed once) and the eroded hull. A convex polygon eroded by a disc is
    the intersection of its sides' half-planes, each moved inwards by ``margin``; only the
    sides that cut into the disc by more than a pixel (the straight edges where the camera
    or the image frame cut the fundus off) are drawn, each as one filled polygon, so a
    fundus the camera did not cut off costs nothing beyond the shared disc.
    """
    eroded = _eroded_disc(side, margin)
    cuts = _hull_cuts(side, hull)
    if cuts is None:
        return eroded
    eroded = eroded.copy()
    region = eroded.view(np.uint8)
    # Beyond each side moved inwards: a quadrilateral reaching well past the square.
    normals, points = cuts
    along = np.stack([-normals[:, 1], normals[:, 0]], axis=1) * (4 * side)
    out = -normals * (4 * side)
    start = points + (margin - _EDGE_OFFSET) * normals
    quads = np.stack([start - along, start + along, start + along + out, start - along + out],
                     axis=1)
    for quad in np.rint(quads * 256).astype(np.int32):
        cv2.fillConvexPoly(region, quad, 0, lineType=cv2.LINE_8, shift=8)
    return eroded


def _hull_cuts(side: int, hull: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(inward unit normals, points)``, one row for each side of the convex ``hull``
    whose line passes more than a pixel inside the disc inscribed in a ``side`` square;
    None when there is none."""
    points = np.asarray(hull, np.float64).reshape(-1, 2)
    if len(points) < 3:
        return None
    centre = np.full(2, side / 2 - 0.5)  # pixel-centre coordinates
    edges = np.roll(points, -1, axis=0) - points
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    keep = lengths > 0
    points, edges, lengths = points[keep], edges[keep], lengths[keep]
    normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1) / lengths[:, None]
    inner = points.mean(axis=0)  # inside a convex polygon
    normals *= np.where(np.einsum("ij,ij->i", inner - points, normals) < 0, -1.0, 1.0)[:, None]
    depth = np.einsum("ij,ij->i", centre - points, normals)  # centre to the side's line
    cutting = depth < side / 2 - 1
    return (normals[cutting], points[cutting]) if cutting.any() else None


@lru_cache(maxsize=8)
def _eroded_disc(side: int, margin: int) -> np.ndarray:
    disc = cv2.erode(_inscribed_disc(side).astype(np.uint8), _disc(2 * margin + 1),
                     borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)
    disc.flags.writeable = False
    return disc


@lru_cache(maxsize=4)
def _grey(side: int) -> np.ndarray:
    grey = np.full((side, side, 3), _GREY, np.uint8)
    grey.flags.writeable = False
    return grey


def _local_average(image: np.ndarray, sigma: float) -> np.ndarray:
    """``GaussianBlur(image, sigma)``, computed at half resolution when sigma is large
    (``uint8`` or ``float32``, the type of ``image``).

    The blurred image has no detail finer than a few sigma, so blurring a half-size copy
    with sigma / 2 and enlarging it gives the same result within a fraction of a grey
    level, for a quarter of the work.
    """
    height, width = image.shape[:2]
    if sigma < 3.0 or min(height, width) < 64:
        return cv2.GaussianBlur(image, (0, 0), sigma)
    half = cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
    half = cv2.GaussianBlur(half, (0, 0), sigma / 2)
    return cv2.resize(half, (width, height), interpolation=cv2.INTER_LINEAR)


#: Every preprocessing by name.
def get_preprocessing(spec: str | Preprocessing) -> Preprocessing:
    """The preprocessing ``spec`` names: ``"natural"``, ``"fundus"``, ``"fundus:size=512"``
    (a ``kad.preprocessing`` entry point and its options).

    A :class:`Preprocessing` is returned as it is. Raises :class:`~kad.errors.SpecError`
    (a :class:`~kad.errors.KadError` and a :class:`ValueError`) for an unknown option or an
    invalid value, and :class:`~kad.errors.PluginError` for an unknown name.
    """
    if isinstance(spec, Preprocessing):
        return spec
    from kad.registry import PREPROCESSING, create

    return create(PREPROCESSING, spec)


def _number(field_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"fundus {field_name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"fundus {field_name} must be finite, got {value!r}")
    return number


# ---------------------------------------------------------------------- fundus cropping

#: Neutral grey outside the fundus mask, on the 0-255 scale (Graham's 128).
_GREY = 128
#: Where a side of the hull, drawn through the centres of the fundus' edge pixels, is
#: taken to lie for the erosion: this far outside them (in output pixels), which matches
#: the erosion of the drawn mask (a pixel is kept when the nearest pixel outside it is
#: more than the margin away) on Kaggle photographs within 0.1 % of the mask's pixels.
_EDGE_OFFSET = 0.85
_DETECT_SIDE = 512  # the fundus is looked for on a copy at most this many pixels wide
_MIN_DETECT_SIDE = 16  # smaller images are not searched: centred square crop
_MIN_MARGIN = 8.0  # foreground is at least this much brighter than the background (0-255)
_MIN_CONTRAST = 20.0  # median fundus brightness minus background, below it: no fundus
_MIN_AREA = 0.05  # the fundus covers at least this share of the image
# Thresholds tried, as fractions of the way from the background to the fundus' median.
_THRESHOLD_FRACTIONS = (0.1, 0.2, 0.35, 0.5, 0.65)
_GOOD_FIT = 0.9  # overlap of region and fitted disc at which a threshold is accepted
_MIN_FIT = 0.5  # below this for every threshold, the bright region is no fundus


def crop_fundus(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square crop around the fundus of a colour fundus photograph.

    Returns ``(crop, mask)``. ``crop`` is a square ``uint8`` RGB image whose side is the
    fundus diameter, centred on the fundus; where the square extends past the photograph
    (a fundus clipped at the top and bottom by the camera) it is padded with black.
    ``mask`` (``bool``, the crop's height and width) is ``True`` on the fundus: inside the
    fitted circle and inside the convex hull of the bright region found, which excludes
    black bands where the fundus was cut off by a straight edge.

    The search runs on a copy at most 512 pixels wide, on the maximum over the colour
    channels. The background level is read from the image border; the fundus is the
    largest region clearly brighter than it that leaves the image corners dark and is
    close to a disc (several thresholds are tried, so a dim rim, a noisy background or a
    glow do not throw it off). Its centre is the middle of its widest rows and columns,
    which stays right when the fundus is clipped on one side. When no fundus stands out
    from a dark background (an all-bright or all-dark image, a tiny one), the result is
    the centred square crop of the image with a mask that is ``True`` everywhere.
    """
    rgb = to_rgb_uint8(rgb)
    found = _find_fundus(rgb)
    crop, (left, top, side) = _square_crop(rgb, found)
    crop = np.array(crop)  # the caller's own copy, never a view of rgb
    if found is None:
        return crop, np.ones((side, side), dtype=bool)
    return crop, _fundus_mask(side, found[1] - (left, top))


def _square_crop(rgb: np.ndarray, found) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The square around the fundus ``found`` (or the centred square) and its
    ``(left, top, side)`` in ``rgb``; padded with black where it extends past the image."""
    height, width = rgb.shape[:2]
    if found is None:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return rgb[top : top + side, left : left + side], (left, top, side)
    cx, cy, radius = found[0]
    side = max(1, round(2 * radius))
    left, top = round(cx - side / 2), round(cy - side / 2)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, width), min(top + side, height)
    if (x0, y0, x1, y1) == (left, top, left + side, top + side):
        return rgb[y0:y1, x0:x1], (left, top, side)  # inside the image: a view, no copy
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    if x1 > x0 and y1 > y0:
        crop[y0 - top : y1 - top, x0 - left : x1 - left] = rgb[y0:y1, x0:x1]
    return crop, (left, top, side)


def _fundus_mask(side: int, hull: np.ndarray) -> np.ndarray:
    """``True`` inside the disc inscribed in a ``side`` square and inside ``hull`` (x, y
    points in that square's pixel coordinates)."""
    region = np.zeros((side, side), dtype=np.uint8)
    cv2.fillPoly(region, [np.rint(hull).astype(np.int32)], 1)
    return _inscribed_disc(side) & region.view(bool)


@lru_cache(maxsize=8)
def _inscribed_disc(side: int) -> np.ndarray:
    """``True`` on the pixels whose centre lies in the disc inscribed in a ``side`` square
    (read-only: shared between calls)."""
    centre = side / 2
    yy, xx = np.ogrid[:side, :side]
    disc = (xx + 0.5 - centre) ** 2 + (yy + 0.5 - centre) ** 2 <= centre**2
    disc.flags.writeable = False
    return disc


def fundus_box(rgb: np.ndarray) -> tuple[int, int, int]:
    """``(left, top, side)`` of the square :func:`crop_fundus` cuts from ``rgb``, in its
    pixels; the square may reach past the photograph (the crop is padded with black there).
    """
    rgb = to_rgb_uint8(rgb)
    return _square_crop(rgb, _find_fundus(rgb))[1]


def _find_fundus(
    rgb: np.ndarray,
) -> tuple[tuple[float, float, float], np.ndarray] | None:
    """``((centre x, centre y, radius), hull)`` of the fundus in pixels of ``rgb``, or None.

    ``hull`` is the convex hull of the bright region, an ``(n, 2)`` array of x, y points.
    Thresholds from low to high are tried between the background level and the fundus'
    median brightness; the first whose largest bright region is close to a disc (or a disc
    clipped by straight edges) wins. A low threshold keeps a dim, vignetted rim inside the
    fundus; a higher one is needed when the background is noisy or has a glow.
    """
    height, width = rgb.shape[:2]
    scale = min(1.0, _DETECT_SIDE / max(height, width))
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    if min(small_h, small_w) < _MIN_DETECT_SIDE:
        return None
    if (small_w, small_h) != (width, height):
        # Every k-th row and column first: averaging a large photograph down to the search
        # size reads all its pixels (the slowest step for a 2000 px image); the fundus is
        # found as well on the average of a regular sample of them.
        stride = max(1, int(max(height, width) // _DETECT_SIDE))
        rgb = cv2.resize(rgb[::stride, ::stride], (small_w, small_h),
                         interpolation=cv2.INTER_AREA)
    # The fundus is reddish: the maximum over the channels sees it best.
    small = cv2.medianBlur(np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]), 3)

    band = max(1, round(0.02 * min(small_h, small_w)))
    border = np.concatenate([
        small[:band].ravel(), small[-band:].ravel(),
        small[:, :band].ravel(), small[:, -band:].ravel(),
    ])
    background = _percentile(_histogram(border), 20)
    # The median of the pixels brighter than the background, from the histogram.
    counts = _histogram(small)[math.floor(background + _MIN_MARGIN) + 1:]
    total = int(counts.sum())
    if total < _MIN_AREA * small.size:
        return None
    first = math.floor(background + _MIN_MARGIN) + 1
    cumulative = np.cumsum(counts)
    low = first + int(np.searchsorted(cumulative, (total - 1) // 2, side="right"))
    high = first + int(np.searchsorted(cumulative, total // 2, side="right"))
    fundus_level = (low + high) / 2
    if fundus_level - background < _MIN_CONTRAST:
        return None

    k = max(3, round(0.02 * min(small_h, small_w)) | 1)  # removes noise up to 2% wide
    best = None
    tried: set[float] = set()
    for fraction in _THRESHOLD_FRACTIONS:
        threshold = background + max(_MIN_MARGIN, fraction * (fundus_level - background))
        if threshold in tried:
            continue
        tried.add(threshold)
        found = _largest_region(small, threshold, k)
        if found is None:
            continue
        region, contour = found
        if np.count_nonzero(region[[0, 0, -1, -1], [0, -1, 0, -1]]) >= 2:
            continue  # bright into the corners: background, or no fundus at all
        circle = _circle_around(contour)
        fit = _disc_overlap(region, circle)
        if best is None or fit > best[0]:
            best = (fit, circle, contour)
        if fit >= _GOOD_FIT:
            break
    if best is None or best[0] < _MIN_FIT:
        return None
    _, (cx, cy, half), contour = best
    fx, fy = small_w / width, small_h / height
    # Pixel centres of the small image to pixel centres of the full one.
    hull = (cv2.convexHull(contour).reshape(-1, 2) + 0.5) / (fx, fy) - 0.5
    return (cx / fx, cy / fy, half / min(fx, fy)), hull


def _histogram(grey: np.ndarray) -> np.ndarray:
    """The number of pixels of each grey level 0-255 of a ``uint8`` array (OpenCV's
    histogram: the counts ``np.bincount`` gives, a pass over the pixels without first
    widening each one to 64 bits)."""
    flat = np.ascontiguousarray(grey).reshape(1, -1)
    return cv2.calcHist([flat], [0], None, [256], [0, 256]).ravel().astype(np.int64)


def _percentile(counts: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (its default, linear method) of the ``uint8`` values
    whose histogram is ``counts``, computed as NumPy computes it to the last bit (the two
    order statistics around the virtual index, interpolated as ``numpy``'s ``_lerp``),
    without sorting the values."""
    n = int(counts.sum())
    virtual = (n - 1) * (q / 100)
    below = math.floor(virtual)
    above = min(below + 1, n - 1)
    cumulative = np.cumsum(counts)
    a, b = (int(np.searchsorted(cumulative, rank, side="right")) for rank in (below, above))
    gamma = virtual - below
    return float(b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma)


def _largest_region(grey: np.ndarray, threshold: float, k: int,
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """The largest connected region of ``grey > threshold`` after cleaning, holes filled
    (``uint8``, 1 inside), and its outer contour.

    The largest region is the filled outer contour of largest area: one pass of
    ``findContours``, no labelling of every pixel.
    """
    _, foreground = cv2.threshold(grey, threshold, 1, cv2.THRESH_BINARY)
    cleaned = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, _disc(k))
    cleaned = cv2.morphologyEx(cleaned, cv2.MORPH_CLOSE, _disc(k))
    # Every boundary pixel (no compression): the region's extent in each row and column
    # is read from them (_circle_around).
    contours, _ = cv2.findContours(cleaned, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    region = np.zeros_like(cleaned)
    cv2.drawContours(region, [contour], -1, 1, thickness=cv2.FILLED)
    if cv2.countNonZero(region) < _MIN_AREA * grey.size:
        return None
    return region, contour


def _circle_around(contour: np.ndarray) -> tuple[float, float, float]:
    """``(cx, cy, half)`` of the region inside ``contour`` (every boundary pixel): centre
    from the widest rows and columns, half the square side."""
    points = contour.reshape(-1, 2)
    x0, y0, w, h = cv2.boundingRect(points)
    x1, y1 = x0 + w, y0 + h
    xs, ys = points[:, 0] - x0, points[:, 1] - y0
    cx = _widest_middle(ys, xs, w) + x0  # the widest columns
    cy = _widest_middle(xs, ys, h) + y0  # the widest rows
    half = max((x1 - x0) / 2, (y1 - y0) / 2, cx - x0, x1 - cx, cy - y0, y1 - cy)
    return cx, cy, float(half)


def _disc_overlap(region: np.ndarray, circle: tuple[float, float, float]) -> float:
    """Intersection over union of ``region`` (``uint8``, 0 or 1) and the disc ``circle``
    (pixel-edge coordinates) within the image.

    Row by row: the disc covers one run of pixels in each row, counted from the
    region's summed-area table (OpenCV's integral image: one pass over the region, no
    disc image drawn).
    """
    cx, cy, radius = circle
    height, width = region.shape
    rows = np.arange(height)
    # Pixel centres x + 0.5 within the disc: |x + 0.5 - cx| <= half-width of the row.
    half = np.sqrt(np.maximum(radius**2 - (rows + 0.5 - cy) ** 2, 0.0))
    inside_rows = (rows + 0.5 - cy) ** 2 <= radius**2
    first = np.clip(np.ceil(cx - 0.5 - half), 0, width).astype(np.int64)
    last = np.clip(np.floor(cx - 0.5 + half), -1, width - 1).astype(np.int64)
    runs = np.where(inside_rows & (last >= first), last - first + 1, 0)
    table = cv2.integral(region, sdepth=cv2.CV_32S)  # (height + 1, width + 1)
    ends = np.where(runs > 0, last + 1, 0)
    starts = np.where(runs > 0, first, 0)
    # Row r's pixels in [start, end): the table's differences down one row.
    both = int((table[rows + 1, ends] - table[rows, ends]
                - table[rows + 1, starts] + table[rows, starts]).sum())
    union = int(table[-1, -1]) + int(runs.sum()) - both
    return both / union if union else 0.0


def _widest_middle(along: np.ndarray, line: np.ndarray, lines: int) -> float:
    """Middle (pixel-edge coordinates) of the lines where a filled region is widest.

    ``along`` and ``line`` are the coordinates of its boundary pixels across and along the
    lines (x and y for rows); the region spans, in each line, from its first to its last
    boundary pixel. For a disc, rows within 20% of the radius from the centre are at least
    98% as wide as the widest; they lie symmetrically around the centre even when the disc
    is clipped on one side, as long as the clipping leaves the centre visible.
    """
    first = np.full(lines, np.iinfo(np.int32).max, dtype=np.int32)
    last = np.full(lines, -1, dtype=np.int32)
    np.minimum.at(first, line, along)
    np.maximum.at(last, line, along)
    extent = np.where(last >= 0, last - first + 1, 0)
    rows = np.flatnonzero(extent >= 0.98 * extent.max())
    return float(rows.mean()) + 0.5


def _disc(diameter: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter, diameter))


def preprocessing_at(spec, size: int | None):
    """``spec`` with ``size=input`` replaced by the network input ``size``: the fundus
    preprocessing then works at the resolution the network sees instead of 256 px
    (``fundus:size=input`` at 448 px is ``fundus:size=448``). With ``size`` None the option
    is dropped (the preprocessing's default). Other specs are returned unchanged."""
    if spec is None or isinstance(spec, Preprocessing):
        return spec
    parsed = parse_spec(spec, "preprocessing")
    if str(parsed.options.get("size")) != "input":
        return spec
    options = {k: v for k, v in parsed.options.items() if k != "size"}
    if size is not None:
        options["size"] = int(size)
    return str(Spec(parsed.name, options))
