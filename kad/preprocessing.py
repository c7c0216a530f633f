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

import difflib
import math
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, ClassVar

import cv2
import numpy as np

from .errors import SpecError
from .images import resize, to_rgb_uint8
from .specs import Spec, parse_spec

__all__ = [
    "PREPROCESSINGS",
    "Fundus",
    "Natural",
    "Preprocessing",
    "crop_fundus",
    "get_preprocessing",
    "preprocessing_at",
]


@dataclass(frozen=True)
class Preprocessing:
    """Base class: a named, parametrised map from RGB ``uint8`` to ``float32`` in [0, 1]."""

    name: ClassVar[str] = ""

    @property
    def key(self) -> str:
        """Canonical ``name:key=value,...`` with every parameter, keys sorted."""
        return str(Spec(self.name, {f.name: getattr(self, f.name) for f in fields(self)}))

    def __str__(self) -> str:
        return self.key

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class Natural(Preprocessing):
    """Rescale to [0, 1]; the size is unchanged."""

    name: ClassVar[str] = "natural"

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return to_rgb_uint8(rgb).astype(np.float32) / np.float32(255.0)


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
        off, are set to neutral grey (0.5). This hides the bright ring that subtracting the
        blurred image draws along the fundus border (about two ``blur`` sigmas wide, so
        lower ``mask`` when raising ``blur``). 1 keeps the whole fundus.
    """

    name: ClassVar[str] = "fundus"
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

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        crop, fundus = crop_fundus(rgb)
        image = resize(crop, self.size).astype(np.float32)
        inside = resize(fundus.astype(np.float32), self.size) > 0.5
        margin = round((1.0 - self.mask) * self.size / 2)
        if margin > 0 and not inside.all():  # all inside: no fundus was found, keep all
            inside = cv2.erode(
                inside.astype(np.uint8), _disc(2 * margin + 1),
                borderType=cv2.BORDER_CONSTANT, borderValue=0,
            ).astype(bool)
        blurred = cv2.GaussianBlur(image, (0, 0), self.blur * self.size)
        out = cv2.addWeighted(image, self.alpha, blurred, -self.alpha, 128.0)
        out = np.clip(out, 0.0, 255.0) / np.float32(255.0)
        out[~inside] = 0.5
        return out.astype(np.float32, copy=False)


#: Every preprocessing by name.
PREPROCESSINGS: MappingProxyType[str, type[Preprocessing]] = MappingProxyType(
    {cls.name: cls for cls in (Natural, Fundus)}
)


def get_preprocessing(spec: str | Preprocessing) -> Preprocessing:
    """The preprocessing ``spec`` names: ``"natural"``, ``"fundus"``, ``"fundus:size=512"``.

    A :class:`Preprocessing` is returned as it is. Raises :class:`~kad.errors.SpecError`
    (a :class:`~kad.errors.KadError` and a :class:`ValueError`) for an unknown name, an
    unknown option or an invalid value.
    """
    if isinstance(spec, Preprocessing):
        return spec
    parsed = parse_spec(spec, "preprocessing")
    cls = PREPROCESSINGS.get(parsed.name)
    if cls is None:
        close = difflib.get_close_matches(parsed.name, list(PREPROCESSINGS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SpecError(
            f"unknown preprocessing {parsed.name!r}.{hint} "
            f"Available: {', '.join(PREPROCESSINGS)}"
        )
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(parsed.options) - set(allowed))
    if unknown:
        raise SpecError(
            f"unknown option {unknown[0]!r} for preprocessing {parsed.name!r} in {str(spec)!r}; "
            f"allowed options: {', '.join(allowed) if allowed else 'none'}"
        )
    try:
        return cls(**parsed.options)
    except ValueError as exc:
        raise SpecError(f"invalid preprocessing {str(spec)!r}: {exc}") from exc


def _number(field_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"fundus {field_name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"fundus {field_name} must be finite, got {value!r}")
    return number


# ---------------------------------------------------------------------- fundus cropping

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
    height, width = rgb.shape[:2]
    found = _find_fundus(rgb)
    if found is None:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        crop = rgb[top : top + side, left : left + side].copy()
        return crop, np.ones((side, side), dtype=bool)

    (cx, cy, radius), hull = found
    side = max(1, round(2 * radius))
    left, top = round(cx - side / 2), round(cy - side / 2)
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, width), min(top + side, height)
    if x1 > x0 and y1 > y0:
        crop[y0 - top : y1 - top, x0 - left : x1 - left] = rgb[y0:y1, x0:x1]
    region = np.zeros((side, side), dtype=np.uint8)
    cv2.fillPoly(region, [np.rint(hull - (left, top)).astype(np.int32)], 1)
    centre = side / 2
    yy, xx = np.ogrid[:side, :side]
    disc = (xx + 0.5 - centre) ** 2 + (yy + 0.5 - centre) ** 2 <= centre**2
    return crop, disc & region.astype(bool)


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
        rgb = cv2.resize(rgb, (small_w, small_h), interpolation=cv2.INTER_AREA)
    # The fundus is reddish: the maximum over the channels sees it best.
    small = cv2.medianBlur(np.ascontiguousarray(rgb.max(axis=2)), 3)

    band = max(1, round(0.02 * min(small_h, small_w)))
    border = np.concatenate([
        small[:band].ravel(), small[-band:].ravel(),
        small[:, :band].ravel(), small[:, -band:].ravel(),
    ])
    background = float(np.percentile(border, 20))
    candidates = small[small > background + _MIN_MARGIN]
    if candidates.size < _MIN_AREA * small.size:
        return None
    fundus_level = float(np.median(candidates))
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
        found = _largest_region(small > threshold, k)
        if found is None:
            continue
        region, contour = found
        if np.count_nonzero(region[[0, 0, -1, -1], [0, -1, 0, -1]]) >= 2:
            continue  # bright into the corners: background, or no fundus at all
        circle = _circle_around(region)
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


def _largest_region(foreground: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The largest connected region of ``foreground`` after cleaning, holes filled, and
    its outer contour."""
    cleaned = cv2.morphologyEx(foreground.astype(np.uint8), cv2.MORPH_OPEN, _disc(k))
    cleaned = cv2.morphologyEx(cleaned, cv2.MORPH_CLOSE, _disc(k))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(cleaned, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < _MIN_AREA * foreground.size:
        return None
    region = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=len)
    cv2.drawContours(region, [contour], -1, 1, thickness=cv2.FILLED)
    return region.astype(bool), contour


def _circle_around(region: np.ndarray) -> tuple[float, float, float]:
    """``(cx, cy, half)``: centre from the widest rows and columns, half the square side."""
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    y0, y1 = rows[0], rows[-1] + 1
    x0, x1 = cols[0], cols[-1] + 1
    cx = _widest_middle(region.T)
    cy = _widest_middle(region)
    half = max((x1 - x0) / 2, (y1 - y0) / 2, cx - x0, x1 - cx, cy - y0, y1 - cy)
    return cx, cy, float(half)


def _disc_overlap(region: np.ndarray, circle: tuple[float, float, float]) -> float:
    """Intersection over union of ``region`` and the disc ``circle`` within the image."""
    cx, cy, radius = circle
    yy, xx = np.ogrid[: region.shape[0], : region.shape[1]]
    disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2
    union = np.count_nonzero(region | disc)
    return np.count_nonzero(region & disc) / union if union else 0.0


def _widest_middle(region: np.ndarray) -> float:
    """Middle (pixel-edge coordinates) of the rows of ``region`` where it is widest.

    For a disc, rows within 20% of the radius from the centre are at least 98% as wide
    as the widest; they lie symmetrically around the centre even when the disc is
    clipped on one side, as long as the clipping leaves the centre visible.
    """
    present = region.any(axis=1)
    first = np.argmax(region, axis=1)
    last = region.shape[1] - 1 - np.argmax(region[:, ::-1], axis=1)
    extent = np.where(present, last - first + 1, 0)
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
