"""Image files in, RGB ``uint8`` arrays out.

Every image kad touches passes through :func:`read_image` (files; :func:`decode_image` for
a file's bytes already in memory, such as an upload) or :func:`to_rgb_uint8`
(arrays already in memory), so the rest of the library sees one thing only: an array of
shape ``(height, width, 3)``, dtype ``uint8``, channels in **RGB** order.

Files are read as bytes and decoded with OpenCV (``cv2.imdecode``), which works for any
path, including non-ASCII ones, and releases the GIL, so callers may decode in a thread
pool. A file that cannot be decoded raises :class:`~kad.errors.ImageReadError` naming the
file and the reason. Truncated JPEG and PNG files are detected explicitly: libjpeg decodes
a truncated JPEG "successfully", filling the missing part with grey.

The EXIF orientation tag is applied, as every image viewer does: a photograph taken with
the camera held sideways is returned upright. The tag is read with Pillow (header only);
OpenCV's own handling is switched off so that it is applied once, for every format.

A large JPEG can be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg scales in the DCT
domain, which costs a fraction of a full decode) when the caller says how many pixels it
needs (``min_side``); see :func:`read_image`.

Decoding is bounded: the size is read from the file's header (Pillow, without decoding)
and an image that would decode to more than :func:`max_image_pixels` pixels (64
megapixels by default, about 200 MB as RGB; ``$KAD_MAX_IMAGE_PIXELS`` changes it) is
refused before any pixel is decoded, with the reason naming its size and the limit. A JPEG
counts at the size it is decoded at, so a 10,000 x 10,000 photograph read with ``min_side``
is decoded at 1/8 and accepted; other formats cannot be decoded reduced.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np

from kad.data import dicom
from kad.errors import ImageReadError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "check_usable",
    "apply_orientation",
    "decode_image",
    "is_image_file",
    "max_image_pixels",
    "read_image",
    "resize",
    "to_rgb_uint8",
]

#: Images with a side shorter than this many pixels are not screened: there is nothing to
#: see in them (8 px keeps scikit-learn's 8x8 digits).
MIN_IMAGE_SIDE = 8

#: The most pixels an image may decode to, by default (64 megapixels: 192 MB as RGB
#: ``uint8``; fundus cameras take 5 to 36). ``$KAD_MAX_IMAGE_PIXELS`` sets another.
MAX_IMAGE_PIXELS = 64_000_000


def max_image_pixels() -> int:
    """The pixel limit of :func:`read_image`: ``$KAD_MAX_IMAGE_PIXELS`` when set to a
    positive integer, else :data:`MAX_IMAGE_PIXELS`."""
    text = os.environ.get("KAD_MAX_IMAGE_PIXELS", "").strip().replace("_", "")
    try:
        value = int(text) if text else MAX_IMAGE_PIXELS
    except ValueError:
        return MAX_IMAGE_PIXELS
    return value if value > 0 else MAX_IMAGE_PIXELS


#: Lower-case file extensions that every OpenCV build kad supports (>= 4.8) decodes.
#: GIF and AVIF are left out (only some builds read them), and so is OpenEXR (disabled
#: in OpenCV's wheels unless an environment variable enables it).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".bmp", ".dib",
        ".jpg", ".jpeg", ".jpe",
        ".jp2",
        ".png",
        ".webp",
        ".tif", ".tiff",
        ".pbm", ".pgm", ".ppm", ".pxm", ".pnm", ".pfm",
        ".sr", ".ras",
        ".hdr", ".pic",
    }
)

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TRAILING_PADDING = b"\x00 \t\r\n"


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an extension in :data:`IMAGE_EXTENSIONS` or
    :data:`kad.data.dicom.DICOM_EXTENSIONS` (case-insensitive).

    Only the name is looked at, never the content. macOS "AppleDouble" companions
    (``._photo.jpg``), which are metadata and not images, are not image files.
    """
    name = Path(path).name
    suffix = Path(name).suffix.lower()
    return not name.startswith("._") and (suffix in IMAGE_EXTENSIONS
                                          or suffix in dicom.DICOM_EXTENSIONS)


def read_image(path: str | os.PathLike, *, min_side: int | None = None) -> np.ndarray:
    """Decode the image file ``path`` to an ``(H, W, 3)`` ``uint8`` RGB array, upright.

    Grey images become three equal channels, an alpha channel is composited on black,
    16-bit images are scaled to 8 bits, floating-point images are clipped to [0, 1] and
    scaled to 255. The EXIF orientation (tag 274), where there is one, is applied. A DICOM
    file is decoded by :func:`kad.data.dicom.decode_dicom`.

    ``min_side``: the caller needs an image whose shorter side is at least this many
    pixels. A JPEG whose shorter side is at least 2, 4 or 8 times that is then decoded at
    1/2, 1/4 or 1/8 of its size (the largest such factor), in the DCT domain, which is much
    cheaper than a full decode followed by a resize. Other formats are decoded whole.

    Raises :class:`~kad.errors.ImageReadError` when the file is missing, empty, not an
    image, truncated, would decode to more than :func:`max_image_pixels` pixels (checked
    on the header, before decoding), or has a channel layout that is not grey,
    grey+alpha, colour or colour+alpha.
    """
    return decode_image(_read_bytes(path), path, min_side=min_side)


def decode_image(data: bytes, path: str | os.PathLike, *,
                 min_side: int | None = None) -> np.ndarray:
    """Decode an image file's bytes, already in memory (an upload), exactly as
    :func:`read_image` decodes the file: same checks, limits, conversions and orientation,
    DICOM included (known by its ``DICM`` marker or a ``.dcm`` name). ``path`` only names
    the image in messages; nothing is read from it or written to it. An empty ``data``
    raises :class:`~kad.errors.ImageReadError` too."""
    if not data:
        raise ImageReadError(path, "it is empty (0 bytes)")
    if dicom.is_dicom(path, data):
        return dicom.decode_dicom(data, path, max_image_pixels())
    _check_complete(path, data)
    size, orientation, colour_jpeg = _header(data)
    flags = cv2.IMREAD_UNCHANGED
    factor = _reduction(size, min_side) if data.startswith(_JPEG_SOI) else 1
    if size is not None:
        _check_pixels(path, size, factor)
    if factor > 1:
        flags = _REDUCED_FLAGS[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    rgb_out = colour_jpeg and _IMREAD_RGB is not None
    if rgb_out:
        # An 8-bit colour JPEG decoded straight to RGB: the same pixels as decoding to
        # BGR and swapping the channels, without the extra pass over the image.
        flags = (flags & ~cv2.IMREAD_COLOR if factor > 1 else 0) | _IMREAD_RGB \
            | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise ImageReadError(path, f"OpenCV failed to decode it: {exc}") from exc
    if decoded is None:
        raise ImageReadError(
            path,
            f"not a decodable image: OpenCV recognises no image format in its {len(data)} "
            f"bytes (they start with {data[:12]!r}); check that the file really is an image "
            f"and that its format is one of {_extensions_text()}",
        )
    if size is None:  # no header Pillow knows: checked once decoded (OpenCV's own limit
        _check_pixels(path, decoded.shape[1::-1], 1)  # bounds the decoding itself)
    try:
        rgb = _convert(decoded, bgr=not rgb_out)
    except ValueError as exc:
        raise ImageReadError(path, str(exc)) from exc
    return apply_orientation(rgb, orientation)


def _check_pixels(path, size: tuple[int, int], factor: int) -> None:
    """Raise when an image of ``size`` (width, height), decoded at 1/``factor``, exceeds
    the pixel limit."""
    width, height = (int(v) for v in size)
    decoded = -(-width // factor) * -(-height // factor)
    limit = max_image_pixels()
    if decoded > limit:
        at = f" even decoded at 1/{factor}" if factor > 1 else ""
        raise ImageReadError(
            path,
            f"the image is {width}x{height} px ({width * height / 1e6:.1f} megapixels), more "
            f"than the limit of {limit / 1e6:g} megapixels{at}; downscale it (or, to accept "
            f"it, set KAD_MAX_IMAGE_PIXELS={decoded})")


#: EXIF orientation (1-8) to the OpenCV operations that make the image upright, in order:
#: ("flip", flipCode) or ("rotate", rotateCode) or ("transpose", None).
_ORIENTATIONS: dict[int, tuple[tuple[str, int | None], ...]] = {
    1: (),
    2: (("flip", 1),),  # mirrored left-right
    3: (("rotate", cv2.ROTATE_180),),
    4: (("flip", 0),),  # mirrored top-bottom
    5: (("transpose", None),),  # mirrored along the main diagonal
    6: (("rotate", cv2.ROTATE_90_CLOCKWISE),),
    7: (("transpose", None), ("rotate", cv2.ROTATE_180)),  # along the anti-diagonal
    8: (("rotate", cv2.ROTATE_90_COUNTERCLOCKWISE),),
}


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` turned upright according to its EXIF ``orientation`` (1-8; 1 and unknown
    values leave it as it is)."""
    for op, code in _ORIENTATIONS.get(int(orientation), ()):
        if op == "flip":
            image = cv2.flip(image, code)
        elif op == "rotate":
            image = cv2.rotate(image, code)
        else:
            image = cv2.transpose(image)
    return np.ascontiguousarray(image)


def check_usable(rgb: np.ndarray, where: str | os.PathLike,
                 min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """``rgb`` itself when there is something to screen in it; otherwise an
    :class:`~kad.errors.ImageReadError` naming ``where`` and the reason: a side shorter than
    ``min_side`` pixels, or one flat colour (a blank or failed capture)."""
    height, width = rgb.shape[:2]
    if min(height, width) < min_side:
        raise ImageReadError(where, f"the image is {width}x{height} px, smaller than the "
                                    f"minimum of {min_side} px a side; nothing to screen")
    first = rgb[0, 0]
    # A photograph differs from its first pixel somewhere on a sparse grid of its pixels:
    # looking there first (a few thousand pixels) spares the pass over every pixel that
    # only a flat, or almost flat, image needs. The answer is the same either way.
    step = max(1, min(height, width) // 64)
    if not (rgb[::step, ::step] != first).any() and not (rgb != first).any():
        raise ImageReadError(where, f"the image is one flat colour (every pixel RGB "
                                    f"{tuple(int(c) for c in first)}): a blank or failed "
                                    "capture, nothing to screen")
    return rgb


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Convert an in-memory image to an ``(H, W, 3)`` ``uint8`` RGB array.

    Accepted: grey ``(H, W)`` or ``(H, W, 1)``, grey+alpha ``(H, W, 2)``, RGB ``(H, W, 3)``
    and RGBA ``(H, W, 4)``; dtype ``uint8``, ``uint16`` (scaled by 255/65535), ``bool``,
    floating point (values in [0, 1], clipped; NaN becomes 0), or another integer type
    with values in [0, 255]. Channels are taken to be in RGB order already (arrays from
    ``cv2.imread`` are BGR: use :func:`read_image` for files). An array that needs no
    change is returned as it is, not copied.

    Raises :class:`ValueError` for any other shape or dtype.
    """
    return _convert(np.asarray(array), bgr=False)


def resize(image: np.ndarray, size: int | tuple[int, int],
           out: np.ndarray | None = None) -> np.ndarray:
    """Resize ``image`` to exactly ``size`` x ``size`` pixels, or to ``(height, width)``.

    Shrinking uses ``cv2.INTER_AREA`` (no aliasing), enlarging ``cv2.INTER_LINEAR``; when
    one axis shrinks and the other grows, each axis is resized with its own method. The
    aspect ratio is not kept. Works for ``uint8`` and ``float32`` arrays of shape
    ``(H, W)`` or ``(H, W, C)`` and keeps the shape's layout; an image already of the
    requested size is returned as it is. ``out`` (C-contiguous, the result's shape and
    type: a row of a batch) receives the result, written in place, and is returned.
    """
    height, width = _target_size(size)
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(
            f"resize expects an image of shape (H, W) or (H, W, C) with H, W >= 1, "
            f"got shape {image.shape}"
        )
    h, w = image.shape[:2]
    if out is not None:
        if (out.shape != (height, width, *image.shape[2:]) or out.dtype != image.dtype
                or not out.flags.c_contiguous):
            raise ValueError(f"resize: out must be a C-contiguous {image.dtype} array of "
                             f"shape {(height, width, *image.shape[2:])}, got {out.dtype} "
                             f"{out.shape}")
        if (h, w) == (height, width):
            np.copyto(out, image)
            return out
        # OpenCV writes into a destination of the right size and type, a 2-D view of
        # out where the image has one channel (OpenCV drops the channel axis).
        target = out[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else out
    else:
        if (h, w) == (height, width):
            return image
        target = None
    if height <= h and width <= w:
        done = cv2.resize(image, (width, height), dst=target, interpolation=cv2.INTER_AREA)
    elif height >= h and width >= w:
        done = cv2.resize(image, (width, height), dst=target, interpolation=cv2.INTER_LINEAR)
    else:  # one axis shrinks, the other grows: shrink first, then enlarge
        shrunk = (min(w, width), min(h, height))
        done = cv2.resize(image, shrunk, interpolation=cv2.INTER_AREA)
        done = cv2.resize(done, (width, height), dst=target, interpolation=cv2.INTER_LINEAR)
    if out is not None:
        return out
    if image.ndim == 3 and done.ndim == 2:  # OpenCV drops a single channel axis
        done = done[:, :, None]
    return done


# --------------------------------------------------------------------------------------


def broken_link(path: str | os.PathLike) -> str | None:
    """The reason ``path`` cannot be read when it is a symbolic link to nothing, else None."""
    if os.path.islink(path) and not os.path.exists(path):
        return (f"broken symbolic link (it points to {os.readlink(path)}, which does not "
                "exist); fix or remove the link")
    return None


def _read_bytes(path: str | os.PathLike) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise ImageReadError(path, broken_link(p) or "the file does not exist; check the "
                                                     "path") from exc
    except IsADirectoryError as exc:
        raise ImageReadError(path, "it is a directory, not an image file") from exc
    except PermissionError as exc:
        raise ImageReadError(path, "permission denied; check the file's permissions") from exc
    except OSError as exc:
        raise ImageReadError(path, f"the file could not be read: {exc.strerror or exc}") from exc
    if not data:
        raise ImageReadError(
            path, "the file is empty (0 bytes); it was probably not written completely"
        )
    return data


def _check_complete(path: str | os.PathLike, data: bytes) -> None:
    """Raise for a JPEG or PNG file whose end is missing."""
    if data.startswith(_JPEG_SOI):
        # Entropy-coded data never contains FF D9 (0xFF bytes are stuffed), so a JPEG is
        # complete when an end-of-image marker follows its last start-of-scan marker. Data
        # appended after the image by some cameras is tolerated this way.
        end = data.rstrip(_TRAILING_PADDING)
        last_scan = data.rfind(_JPEG_SOS)
        if not end.endswith(_JPEG_EOI) and (
            last_scan < 0 or data.find(_JPEG_EOI, last_scan) < 0
        ):
            raise ImageReadError(
                path,
                f"truncated JPEG: the end-of-image marker (FF D9) is missing after "
                f"{len(data)} bytes, so the file was cut short (interrupted download or "
                f"copy?); replace it with a complete copy or remove it",
            )
    elif data.startswith(_PNG_SIGNATURE) and data.rfind(b"IEND") < len(_PNG_SIGNATURE):
        raise ImageReadError(
            path,
            f"truncated PNG: the final IEND chunk is missing after {len(data)} bytes, so the "
            f"file was cut short (interrupted download or copy?); replace it with a complete "
            f"copy or remove it",
        )


_REDUCED_FLAGS = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


#: OpenCV's flag to decode straight to RGB (OpenCV 4.10 and later; None before).
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def _header(data: bytes) -> tuple[tuple[int, int] | None, int, bool]:
    """``((width, height) or None, EXIF orientation, colour JPEG)`` from the file's
    header, read with Pillow without decoding the pixels; ``(None, 1, False)`` where
    Pillow does not know the format (OpenCV may still decode it). ``colour JPEG``: a JPEG
    of three 8-bit components (YCbCr or RGB, which Pillow opens as ``RGB``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        try:
            size, orientation, colour = _pillow_header(data)
        except Image.DecompressionBombError:
            # Pillow refuses to even open an image of more than twice its own limit; its
            # size is needed to say so in kad's terms, and reading the header is safe.
            with _PILLOW_LIMIT:
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    size, orientation, colour = _pillow_header(data)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError):
        return None, 1, False
    try:
        orientation = int(orientation)
    except (TypeError, ValueError):
        orientation = 1
    return size, orientation if orientation in _ORIENTATIONS else 1, colour


_PILLOW_LIMIT = threading.Lock()


def _pillow_header(data: bytes) -> tuple[tuple[int, int], object, bool]:
    from PIL import Image

    with warnings.catch_warnings():
        # Pillow's guard against decompression bombs concerns decoding, which OpenCV
        # does (kad's pixel limit is checked first); reading the header is safe.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "PNG" and "exif" not in image.info:
                # Pillow would decode the whole PNG looking for an eXIf chunk after the
                # pixels; the specification puts it before them, where info has it.
                return image.size, 1, False
            colour = (image.format == "JPEG" and image.mode == "RGB"
                      and getattr(image, "bits", 8) == 8)
            return image.size, image.getexif().get(0x0112, 1), colour


def _reduction(size: tuple[int, int] | None, min_side: int | None) -> int:
    """The largest of 8, 4, 2 by which an image of ``size`` can be shrunk and keep its
    shorter side at least ``min_side``; 1 when none can."""
    if size is None or not min_side or min_side < 1:
        return 1
    shorter = min(size)
    for factor in (8, 4, 2):
        if shorter // factor >= min_side:
            return factor
    return 1


def _extensions_text() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))


def _target_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        dims = (int(size), int(size))
    elif (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
    ):
        dims = (int(size[0]), int(size[1]))
    else:
        raise ValueError(
            f"size must be an int or a (height, width) pair of ints, got {size!r}"
        )
    if min(dims) < 1:
        raise ValueError(f"size must be at least 1 pixel, got {size!r}")
    return dims


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale the values of ``array`` (any supported dtype) to ``uint8``."""
    dtype = array.dtype
    if dtype == np.uint8:
        return array
    if dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if dtype == np.uint16:
        scaled = array.astype(np.float32) * np.float32(255.0 / 65535.0)
        return np.rint(scaled).astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        unit = np.clip(np.nan_to_num(array.astype(np.float32), nan=0.0), 0.0, 1.0)
        return np.rint(unit * np.float32(255.0)).astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low >= 0 and high <= 255:
            return array.astype(np.uint8)
        raise ValueError(
            f"an image of dtype {dtype} must have values in [0, 255], got [{low}, {high}]; "
            f"convert it to uint8, uint16 or float in [0, 1] first"
        )
    raise ValueError(
        f"unsupported image dtype {dtype}; expected uint8, uint16, bool, float in [0, 1], "
        f"or integers in [0, 255]"
    )


def _convert(array: np.ndarray, *, bgr: bool) -> np.ndarray:
    """The conversions shared by :func:`read_image` (``bgr=True``) and :func:`to_rgb_uint8`."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"an image must have shape (H, W) or (H, W, channels) with H, W >= 1, "
            f"got shape {array.shape}"
        )
    channels = array.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ValueError(
            f"unsupported number of channels {channels} (shape {array.shape}); expected 1 "
            f"(grey), 2 (grey+alpha), 3 (colour) or 4 (colour+alpha)"
        )
    array = _to_uint8(array)
    if channels in (2, 4):
        color, alpha = array[:, :, :-1], array[:, :, -1:]
        # Composite on black: colour * alpha / 255, rounded.
        weighted = color.astype(np.uint16) * alpha.astype(np.uint16) + 127
        array = (weighted // 255).astype(np.uint8)
    if array.shape[2] == 1:
        return cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_GRAY2RGB)
    if bgr:
        return cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(array)
