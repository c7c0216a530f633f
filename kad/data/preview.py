"""A picture of what a preprocessing does: each image beside its preprocessed version.

``kad preview`` calls :func:`save_preview`; looking at a few images before extracting
features catches a crop that misses the fundus, or the wrong preprocessing for a dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from kad.data.images import read_image, resize
from kad.data.preprocessing import Preprocessing, get_preprocessing
from kad.errors import ImageReadError, KadError

__all__ = ["MAX_IMAGES", "save_preview"]

#: The most images one preview shows (a row of about 290 px each).
MAX_IMAGES = 32

_SCALE = 0.38  # font scale of the labels
_LINE_HEIGHT = 14
_LABEL_HEIGHT = 2 * _LINE_HEIGHT + 2  # two lines of text above each tile
_GAP = 4
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT = (235, 235, 235)
_CANVAS = 40  # dark grey, so that a black fundus background stays visible


def save_preview(
    paths: list[Path] | list[str | os.PathLike],
    out: str | os.PathLike,
    preprocessing: str | Preprocessing = "fundus",
    size: int = 256,
    left_out: list[tuple[str, str]] | None = None,
) -> Path:
    """Write a PNG with one row per image: the original, then the preprocessed image.

    The original is letterboxed into ``size`` x ``size`` pixels (aspect ratio kept, black
    bars); the preprocessed image is scaled to the same square. Labels above the tiles give
    the file name and original size, and the preprocessing's key. Returns ``out`` as a
    :class:`~pathlib.Path`; its folder is created if needed.

    Raises :class:`~kad.errors.ImageReadError` for an image that cannot be read, unless
    ``left_out`` (a list) is given: each such image is then appended to it as ``(path,
    reason)`` and the others are shown (:class:`~kad.errors.KadError` when none can be).
    Raises :class:`ValueError` for an empty ``paths``, more than :data:`MAX_IMAGES`, a
    ``size`` below 32 or an ``out`` that does not end in ``.png``, before reading any.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("save_preview needs at least one image path, got none")
    if len(paths) > MAX_IMAGES:
        raise ValueError(f"a preview shows at most {MAX_IMAGES} images, got {len(paths)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"preview tile size must be an integer of at least 32, got {size!r}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"the preview is a PNG: out must end in .png, got {str(out)!r}")
    prep = get_preprocessing(preprocessing)

    rows = []
    for path in paths:
        try:
            rgb = read_image(path)
        except ImageReadError as exc:
            if left_out is None:
                raise
            left_out.append((str(path), exc.reason))
            continue
        processed = prep(rgb)
        processed_u8 = np.rint(np.clip(processed, 0.0, 1.0) * 255).astype(np.uint8)
        height, width = rgb.shape[:2]
        rows.append(np.hstack([
            _tile(_letterbox(rgb, size), f"{path.name} ({width}x{height})"),
            np.full((size + _LABEL_HEIGHT, _GAP, 3), _CANVAS, np.uint8),
            _tile(_letterbox(processed_u8, size), prep.key),
        ]))
    if not rows:
        raise KadError(f"none of the {len(paths)} images could be read: "
                       + "; ".join(f"{Path(name).name} ({why})" for name, why in left_out))
    gap = np.full((_GAP, rows[0].shape[1], 3), _CANVAS, np.uint8)
    sheet = np.vstack([part for row in rows for part in (row, gap)][:-1])

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - PNG encoding of uint8 RGB does not fail
        raise RuntimeError("OpenCV could not encode the preview as PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    from kad.utils.files import write_bytes

    return write_bytes(out, encoded.tobytes())  # not cv2.imwrite: non-ASCII paths work too


def _letterbox(rgb: np.ndarray, size: int) -> np.ndarray:
    """Fit ``rgb`` into a black ``size`` x ``size`` square, keeping its aspect ratio."""
    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resize(rgb, (new_h, new_w))
    return canvas


def _tile(image: np.ndarray, label: str) -> np.ndarray:
    """``image`` under a strip holding ``label``, wrapped at commas to fit the width."""
    width = image.shape[1]
    strip = np.full((_LABEL_HEIGHT, width, 3), _CANVAS, np.uint8)
    for row, line in enumerate(_wrap(label, width - 6)):
        baseline = _LINE_HEIGHT * (row + 1) - 2
        cv2.putText(strip, line, (3, baseline), _FONT, _SCALE, _TEXT, 1, cv2.LINE_AA)
    return np.vstack([strip, image])


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, _FONT, _SCALE, 1)[0][0]


def _wrap(label: str, width: int) -> list[str]:
    """At most two lines of ``label`` no wider than ``width``, broken after commas."""
    lines = [""]
    for part in label.split(","):
        piece = part if not lines[-1] else "," + part
        if lines[-1] and _text_width(lines[-1] + piece) > width:
            lines[-1] += ","
            lines.append(part)
        else:
            lines[-1] += piece
    if len(lines) > 2:
        lines = [lines[0], "".join(lines[1:])]
    shortened = []
    for line in lines:
        if _text_width(line) > width:
            while len(line) > 1 and _text_width(line + "...") > width:
                line = line[:-1]
            line += "..."
        shortened.append(line)
    return shortened
