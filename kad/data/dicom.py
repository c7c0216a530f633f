"""DICOM files in, RGB ``uint8`` arrays out (the ``dicom`` extra: pydicom, with Pillow,
pyjpegls and pylibjpeg-openjpeg decoding JPEG Baseline, JPEG-LS and JPEG 2000 pixel data;
12-bit Extended and Lossless JPEG need pylibjpeg-libjpeg, GPLv3, installed by the user).

:func:`kad.data.images.read_image` hands a file here when its name ends in ``.dcm`` or
``.dicom`` or its bytes carry the ``DICM`` marker at offset 128 (the DICOM preamble);
:func:`decode_dicom` decodes bytes already in memory, :func:`read_dicom` a file.

What a photograph becomes:

* ``MONOCHROME2`` is grey, ``MONOCHROME1`` (white is low) is inverted; both become three
  equal channels. The modality LUT (rescale) is applied, then the VOI LUT or window
  (:func:`pydicom.pixels.apply_voi_lut`) where the file has one, and the result is scaled
  from the range that LUT or window outputs to 0-255.
* ``RGB`` is taken as it is; ``YBR_FULL`` and ``YBR_FULL_422`` are converted to RGB by
  pydicom's decoder (:func:`pydicom.pixels.convert_color_space`), ``YBR_RCT``/``YBR_ICT``
  (JPEG 2000) come out of their decoder as RGB; ``PALETTE COLOR`` goes through its colour
  table (:func:`pydicom.pixels.apply_color_lut`).
* Without a VOI LUT, 8-bit unsigned values are kept as they are (so a DICOM file and a PNG
  file of the same pixels give the same array); other depths (1 to 32 bits, signed or
  not) are scaled from the image's own minimum and maximum to 0-255, all channels
  together.

Decoding is bounded: the header is read first, without the pixel data, and a file whose
rows x columns x frames exceed the pixel limit (``$KAD_MAX_IMAGE_PIXELS``) is refused
before any pixel is decoded. A file of several frames (a stereo pair, a series, a video)
is not scored: it is reported with its number of frames, since one row of kad's outputs
is one photograph; export its frames as single-frame files to screen them. A damaged file
(truncated, corrupted, without pixel data) raises :class:`~kad.errors.ImageReadError`
naming the file, like every unreadable image.

:func:`patient_id` reads the file's PatientID, which folder datasets use to keep a
patient's photographs together when no ``patients.csv`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from pathlib import Path

import numpy as np

from kad.errors import ImageReadError

__all__ = [
    "DICOM_EXTENSIONS",
    "INSTALL_HINT",
    "decode_dicom",
    "has_pydicom",
    "is_dicom",
    "missing_reason",
    "patient_id",
    "read_dicom",
]

#: File name endings of DICOM files (case-insensitive).
DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})

#: How to get what reading DICOM needs.
INSTALL_HINT = 'pip install "kad[dicom]"'

_PREAMBLE = 128
_MARKER = b"DICM"
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
_GREY = ("MONOCHROME1", "MONOCHROME2")
_PALETTE = "PALETTE COLOR"


def has_pydicom() -> bool:
    """Whether pydicom is installed (found without importing it)."""
    return importlib.util.find_spec("pydicom") is not None


def missing_reason() -> str | None:
    """Why DICOM files cannot be read here (pydicom is not installed), or None."""
    if has_pydicom():
        return None
    return f"a DICOM file, and reading DICOM needs the dicom extra: {INSTALL_HINT}"


def is_dicom(path: str | os.PathLike | None, data: bytes | None = None) -> bool:
    """Whether ``path`` is named as a DICOM file, or ``data`` (its bytes) starts with the
    DICOM preamble: 128 bytes, then ``DICM``."""
    if data is not None and data[_PREAMBLE:_PREAMBLE + 4] == _MARKER:
        return True
    return path is not None and Path(path).suffix.lower() in DICOM_EXTENSIONS


def read_dicom(path: str | os.PathLike, max_pixels: int) -> np.ndarray:
    """The DICOM file ``path`` as an ``(H, W, 3)`` ``uint8`` RGB array; see
    :func:`decode_dicom`. (:func:`kad.data.images.read_image` reads any image file,
    DICOM included, and checks the file first.)"""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageReadError(path, f"the file could not be read: {exc.strerror or exc}") \
            from exc
    return decode_dicom(data, path, max_pixels)


def decode_dicom(data: bytes, where: str | os.PathLike, max_pixels: int) -> np.ndarray:
    """The DICOM file whose bytes are ``data`` as an ``(H, W, 3)`` ``uint8`` RGB array.

    ``where`` names the file in messages (a path, or an upload's name). The header is read
    first, without the pixel data; a file of more than ``max_pixels`` pixels (rows x
    columns x frames), of several frames, or that is not a single image of 1 or 3 samples
    per pixel raises :class:`~kad.errors.ImageReadError` before any pixel is decoded, and
    so does a damaged file, or pydicom missing (naming the extra to install).
    """
    if not has_pydicom():
        raise ImageReadError(where, f"reading DICOM needs the dicom extra: {INSTALL_HINT}")
    if data[_PREAMBLE:_PREAMBLE + 4] != _MARKER:
        raise ImageReadError(
            where, f"not a DICOM file: the 'DICM' marker is not at byte {_PREAMBLE} of its "
                   f"{len(data)} bytes (it starts with {data[:12]!r}); check that it was "
                   "exported as a DICOM Part 10 file")
    with warnings.catch_warnings():
        # pydicom warns about odd values (it reads elements when first used): a file
        # that decodes is used; one that does not is reported, whatever the failure.
        warnings.simplefilter("ignore")
        try:
            return _decode(data, where, max_pixels)
        except ImageReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - damaged data fails in many ways
            raise ImageReadError(where, f"damaged DICOM file: {_short(exc)}; replace it "
                                        "with a complete copy") from exc


def patient_id(path: str | os.PathLike) -> str | None:
    """The PatientID of the DICOM file ``path`` (header only), or None when it has none,
    is not a DICOM file, or pydicom is missing. Never raises for a damaged file: reading
    its pixels reports it."""
    if not has_pydicom():
        return None
    import pydicom

    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(handle, stop_before_pixels=True,
                                     specific_tags=["PatientID"])
            value = str(header.get("PatientID", "") or "").strip()
    except Exception:  # noqa: BLE001 - any damage: no patient from this file
        return None
    return value or None


# --------------------------------------------------------------------------------------


def _decode(data: bytes, where, max_pixels: int) -> np.ndarray:
    header = _read(data, where, stop_before_pixels=True)
    rows, columns, _ = _check_header(header, where, max_pixels)
    dataset = _read(data, where, stop_before_pixels=False)
    if "PixelData" not in dataset:
        raise ImageReadError(where, "the DICOM file holds no pixel data (PixelData); it is "
                                    "not an image (a report, a structure set?)")
    _check_codestream(dataset, where, rows, columns)
    pixels = _decode_pixels(dataset, where)
    if pixels.shape[:2] != (rows, columns):
        raise ImageReadError(where, f"the decoded image is {pixels.shape[1]}x{pixels.shape[0]}"
                                    f" px, not the {columns}x{rows} px of its header")
    return _to_rgb_uint8(pixels, dataset)


def _check_codestream(dataset, where, rows: int, columns: int) -> None:
    """Refuse compressed pixel data whose own header (JPEG, JPEG 2000, read by Pillow
    without decoding) gives another size than the DICOM header: it would be decoded at that
    size, whatever the pixel limit said."""
    if not getattr(dataset.file_meta.TransferSyntaxUID, "is_compressed", False):
        return
    from PIL import Image, UnidentifiedImageError
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(frame)) as image:
                size = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError, StopIteration):
        return  # a codestream Pillow does not know (RLE, JPEG-LS): checked once decoded
    if tuple(size) != (columns, rows):
        raise ImageReadError(where, f"its compressed image is {size[0]}x{size[1]} px, not "
                                    f"the {columns}x{rows} px of its DICOM header; the file "
                                    "is damaged or forged")


def _short(exc: Exception, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read(data: bytes, where, *, stop_before_pixels: bool):
    """The parsed dataset; any failure to parse is an :class:`ImageReadError`."""
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # noqa: BLE001 - damaged data fails in many ways
        raise ImageReadError(where, f"damaged DICOM file: pydicom could not parse it "
                                    f"({_short(exc)}); replace it with a complete copy") \
            from exc


def _integer(header, keyword: str, where, default: int | None = None) -> int:
    value = header.get(keyword, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None:
        what = "lacks" if value is None else f"has an invalid ({value!r})"
        raise ImageReadError(where, f"the DICOM file {what} {keyword}; it is not a readable "
                                    "image")
    return number


def _check_header(header, where, max_pixels: int) -> tuple[int, int, int]:
    """``(rows, columns, frames)`` from the header, checked before any pixel is decoded."""
    photometric = str(header.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise ImageReadError(where, "the DICOM file has no PhotometricInterpretation: it "
                                    "holds no image (a report, a structure set?)")
    rows = _integer(header, "Rows", where)
    columns = _integer(header, "Columns", where)
    frames = _integer(header, "NumberOfFrames", where, default=1)
    samples = _integer(header, "SamplesPerPixel", where, default=1)
    bits = _integer(header, "BitsAllocated", where)
    if rows < 1 or columns < 1 or frames < 1:
        raise ImageReadError(where, f"the DICOM header gives {rows} rows, {columns} columns "
                                    f"and {frames} frame(s); an image needs at least one of "
                                    "each")
    pixels = rows * columns * frames
    if pixels > max_pixels:
        of = f" ({frames} frames of {columns}x{rows} px)" if frames > 1 else (
            f" ({columns}x{rows} px)")
        raise ImageReadError(
            where, f"the DICOM image is {pixels / 1e6:.1f} megapixels{of}, more than the "
                   f"limit of {max_pixels / 1e6:g} megapixels; downscale it (or, to accept "
                   f"it, set KAD_MAX_IMAGE_PIXELS={pixels})")
    if frames > 1:
        raise ImageReadError(
            where, f"a multi-frame DICOM file ({frames} frames of {columns}x{rows} px): kad "
                   "scores one photograph per file; export each frame as a single-frame "
                   "file to screen it")
    if samples not in (1, 3) or bits not in (1, 8, 16, 32):
        raise ImageReadError(where, f"unsupported DICOM pixel layout: {samples} sample(s) "
                                    f"per pixel of {bits} bits; kad reads 1 (grey or "
                                    "palette) or 3 (colour) samples of 1, 8, 16 or 32 bits")
    allowed = _GREY + _COLOUR + (_PALETTE,)
    if photometric not in allowed:
        raise ImageReadError(where, f"unsupported DICOM PhotometricInterpretation "
                                    f"{photometric!r}; kad reads {', '.join(allowed)}")
    return rows, columns, frames


def _decode_pixels(dataset, where) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        # raw=False: YBR_FULL and YBR_FULL_422 come back as RGB (convert_color_space)
        return np.asarray(pixel_array(dataset, raw=False))
    except Exception as exc:  # noqa: BLE001 - damaged data fails in many ways
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or str(syntax or "unknown")
        text = str(exc)
        if "JPEG" in name and ("Lossless" in name or "Extended" in name) and (
                "missing dependencies" in text or "does not support" in text):
            raise ImageReadError(
                where, f"its pixel data ({name}) needs pylibjpeg-libjpeg: "
                       "pip install pylibjpeg-libjpeg (GPLv3, not part of kad's extra)") from exc
        if "missing dependencies" in text or "no decoding plugin" in text.lower():
            raise ImageReadError(
                where, f"its pixel data ({name}) needs a decoder that is not installed: "
                       f"{INSTALL_HINT} brings the JPEG-LS and JPEG 2000 decoders") from exc
        raise ImageReadError(where, f"damaged DICOM pixel data ({name}): {_short(exc)}; "
                                    "replace it with a complete copy") from exc


def _to_rgb_uint8(pixels: np.ndarray, dataset) -> np.ndarray:
    """The decoded pixels (one frame) as ``(H, W, 3)`` ``uint8`` RGB; see the module
    docstring."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(dataset.PhotometricInterpretation).strip().upper()
    if photometric == _PALETTE:
        coloured = apply_color_lut(pixels, dataset)[..., :3]
        depth = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        return _scaled(coloured, 0.0, float(2 ** depth - 1))
    if photometric in _COLOUR:
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"a {photometric} image of shape {pixels.shape}, not (H, W, 3)")
        return _eight_bits(pixels, dataset)
    grey = pixels[..., 0] if pixels.ndim == 3 else pixels
    grey = apply_modality_lut(grey, dataset)
    voi = _voi_range(dataset)
    if voi is not None:
        out = _scaled(apply_voi_lut(grey, dataset), *voi)
    else:
        out = _eight_bits(grey, dataset)
    if photometric == "MONOCHROME1":
        out = np.uint8(255) - out
    return np.ascontiguousarray(np.repeat(out[:, :, None], 3, axis=2))


def _voi_range(dataset) -> tuple[float, float] | None:
    """The range of values that the file's VOI LUT or window outputs, or None when it has
    neither. A VOI LUT outputs 0 to 2**bits - 1 (its descriptor's third value); a window
    outputs what pydicom maps values far below and far above it to."""
    from pydicom.pixels import apply_voi_lut

    sequence = dataset.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None \
            and sequence[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(sequence[0].LUTDescriptor[2]) - 1)
    if dataset.get("WindowCenter") is None or dataset.get("WindowWidth") is None:
        return None
    with np.errstate(over="ignore"):
        ends = apply_voi_lut(np.array([-1e300, 1e300]), dataset)
    low, high = float(np.min(ends)), float(np.max(ends))
    return (low, high) if np.isfinite([low, high]).all() and high > low else None


def _eight_bits(array: np.ndarray, dataset) -> np.ndarray:
    """8-bit unsigned values as they are; anything else from its own range to 0-255."""
    bits = int(dataset.get("BitsStored", 0) or 0)
    unsigned = int(dataset.get("PixelRepresentation", 0) or 0) == 0
    if array.dtype == np.uint8 and bits == 8 and unsigned:
        return array
    values = array.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    return _scaled(values, low, high)


def _scaled(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """``array`` mapped linearly from [low, high] to [0, 255], as ``uint8``."""
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    unit = (np.asarray(array, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.rint(np.clip(unit, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
