"""Decoding image files and arrays to RGB uint8, and resizing."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from kad.data.images import (
    IMAGE_EXTENSIONS,
    check_usable,
    is_image_file,
    read_image,
    resize,
    to_rgb_uint8,
)
from kad.errors import ImageReadError, KadError


def write(path, array) -> None:
    """Write ``array`` (OpenCV channel order) with OpenCV, by bytes."""
    ok, data = cv2.imencode(path.suffix, array)
    assert ok
    path.write_bytes(data.tobytes())


def colourful(height: int = 24, width: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------- read_image


def test_bgr_file_is_read_as_rgb(tmp_path):
    red_bgr = np.zeros((10, 12, 3), np.uint8)
    red_bgr[..., 2] = 255
    write(tmp_path / "red.png", red_bgr)
    rgb = read_image(tmp_path / "red.png")
    assert rgb.shape == (10, 12, 3) and rgb.dtype == np.uint8
    assert rgb.flags.c_contiguous
    assert np.all(rgb == [255, 0, 0])


def test_colour_png_round_trips(tmp_path):
    rgb = colourful()
    write(tmp_path / "c.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert np.array_equal(read_image(str(tmp_path / "c.png")), rgb)


def test_grey_png_becomes_three_equal_channels(tmp_path):
    grey = np.arange(200, dtype=np.uint8).reshape(10, 20)
    write(tmp_path / "g.png", grey)
    rgb = read_image(tmp_path / "g.png")
    assert rgb.shape == (10, 20, 3)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], grey)


def test_rgba_png_is_composited_on_black(tmp_path):
    bgra = np.zeros((4, 6, 4), np.uint8)
    bgra[..., :3] = (10, 20, 200)  # B, G, R
    bgra[:, :2, 3] = 255  # opaque
    bgra[:, 2:4, 3] = 128  # half transparent
    bgra[:, 4:, 3] = 0  # transparent
    write(tmp_path / "a.png", bgra)
    rgb = read_image(tmp_path / "a.png")
    assert rgb.shape == (4, 6, 3)
    assert np.all(rgb[:, :2] == [200, 20, 10])
    assert np.all(rgb[:, 2:4] == [100, 10, 5])
    assert np.all(rgb[:, 4:] == 0)


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    bgr16 = np.zeros((3, 4, 3), np.uint16)
    bgr16[0] = 65535
    bgr16[1] = 257 * 100
    bgr16[2, :, 2] = 65535  # red
    write(tmp_path / "deep.png", bgr16)
    assert cv2.imdecode(np.fromfile(tmp_path / "deep.png", np.uint8),
                        cv2.IMREAD_UNCHANGED).dtype == np.uint16
    rgb = read_image(tmp_path / "deep.png")
    assert rgb.dtype == np.uint8
    assert np.all(rgb[0] == 255)
    assert np.all(rgb[1] == 100)
    assert np.all(rgb[2] == [255, 0, 0])


def test_16_bit_grey_png(tmp_path):
    write(tmp_path / "g16.png", np.full((5, 5), 32896, np.uint16))  # 128 * 257
    assert np.all(read_image(tmp_path / "g16.png") == 128)


def test_jpeg_and_non_ascii_path(tmp_path):
    smooth = np.zeros((64, 64, 3), np.uint8)
    smooth[...] = (200, 100, 30)  # RGB
    smooth[..., 1] += np.arange(64, dtype=np.uint8)  # a gentle gradient
    path = tmp_path / "fundus_ñ_眼.jpeg"
    write(path.with_name("tmp.jpeg"), cv2.cvtColor(smooth, cv2.COLOR_RGB2BGR))
    path.write_bytes(path.with_name("tmp.jpeg").read_bytes())
    rgb = read_image(path)
    assert rgb.shape == (64, 64, 3)
    assert np.abs(rgb.astype(int) - smooth).max() <= 8  # JPEG is lossy


def test_jpeg_with_trailing_padding_or_data_after_the_image_is_fine(tmp_path):
    write(tmp_path / "ok.jpg", colourful())
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "zeros.jpg").write_bytes(data + b"\x00" * 100 + b"\n")
    (tmp_path / "trailer.jpg").write_bytes(data + b"camera trailer data")
    assert read_image(tmp_path / "zeros.jpg").shape == (24, 32, 3)
    assert read_image(tmp_path / "trailer.jpg").shape == (24, 32, 3)


def test_truncated_jpeg_names_the_file(tmp_path):
    write(tmp_path / "whole.jpg", colourful(128, 128))
    data = (tmp_path / "whole.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated JPEG") as info:
        read_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_jpeg_cut_just_before_its_end_marker(tmp_path):
    write(tmp_path / "whole.jpg", colourful(128, 128))
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:-2])
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        read_image(tmp_path / "cut.jpg")


def test_truncated_png(tmp_path):
    write(tmp_path / "whole.png", colourful(64, 64))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated PNG"):
        read_image(tmp_path / "cut.png")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="not a decodable image") as info:
        read_image(path)
    assert "x.jpg" in str(info.value)
    assert "this is" in str(info.value)  # the first bytes are quoted


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist") as info:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(tmp_path / "empty.png")


def test_directory(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path / "folder.png")


def test_image_read_error_is_a_kad_error(tmp_path):
    with pytest.raises(KadError):
        read_image(tmp_path / "nope.png")


# ----------------------------------------------------------------------- to_rgb_uint8


def test_rgb_uint8_is_returned_unchanged():
    rgb = colourful()
    assert to_rgb_uint8(rgb) is rgb


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 1)])
def test_grey_arrays(shape):
    grey = np.arange(42, dtype=np.uint8).reshape(shape)
    rgb = to_rgb_uint8(grey)
    assert rgb.shape == (6, 7, 3)
    assert np.array_equal(rgb[..., 1], grey.reshape(6, 7))


def test_arrays_are_taken_as_rgb_not_bgr():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[..., 3] = 255
    assert np.all(to_rgb_uint8(rgba) == [255, 0, 0])


def test_rgba_and_grey_alpha_arrays_are_composited_on_black():
    rgba = np.full((2, 2, 4), 200, np.uint8)
    rgba[0, :, 3] = 0
    out = to_rgb_uint8(rgba)
    assert np.all(out[0] == 0) and np.all(out[1] == 157)  # 200 * 200 / 255
    grey_alpha = np.stack([np.full((2, 2), 100, np.uint8), np.full((2, 2), 255, np.uint8)], -1)
    assert np.all(to_rgb_uint8(grey_alpha) == 100)


def test_uint16_array_is_scaled():
    out = to_rgb_uint8(np.array([[0, 257, 32896, 65535]], np.uint16))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_array_is_clipped_to_unit_range():
    out = to_rgb_uint8(np.array([[-0.5, 0.0, 0.5, 1.0, 7.0, np.nan]], np.float32))
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255, 0]
    assert to_rgb_uint8(np.full((2, 2, 3), 0.25)).dtype == np.uint8  # float64 too


def test_bool_and_small_integer_arrays():
    assert to_rgb_uint8(np.ones((2, 2), bool)).max() == 255
    assert to_rgb_uint8(np.full((2, 2, 3), 7, np.int64)).max() == 7


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 5), np.uint8), "channels 5"),
        (np.zeros((4,), np.uint8), r"shape \(4,\)"),
        (np.zeros((0, 4, 3), np.uint8), r"shape \(0, 4, 3\)"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        (np.full((2, 2), 300, np.int32), r"\[300, 300\]"),
        (np.zeros((2, 2), np.complex64), "dtype complex64"),
    ],
)
def test_unsupported_arrays_raise_value_error(array, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_uint8(array)


def test_unsupported_channel_count_in_a_file(tmp_path, monkeypatch):
    write(tmp_path / "c.png", colourful())
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(ImageReadError, match="channels 5"):
        read_image(tmp_path / "c.png")


# --------------------------------------------------------------------- file extensions


def test_image_extensions():
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
            ".jp2"} <= IMAGE_EXTENSIONS


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jpeg", True), ("dir/B.JPG", True), ("c.Png", True), ("d.tiff", True),
        ("e.txt", False), ("f", False), ("g.jpeg.csv", False), ("._h.jpg", False),
    ],
)
def test_is_image_file(name, expected):
    assert is_image_file(name) is expected


# ------------------------------------------------------------------------------ resize


def test_resize_shrinks_with_area_interpolation():
    image = colourful(100, 80)
    out = resize(image, 40)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert np.array_equal(out, cv2.resize(image, (40, 40), interpolation=cv2.INTER_AREA))


def test_resize_enlarges_with_linear_interpolation():
    image = colourful(10, 12)
    out = resize(image, (30, 50))
    assert out.shape == (30, 50, 3)
    assert np.array_equal(out, cv2.resize(image, (50, 30), interpolation=cv2.INTER_LINEAR))


def test_resize_mixed_float32_and_single_channel():
    image = np.random.default_rng(0).random((20, 60, 1), dtype=np.float32)
    out = resize(image, 40)  # taller, narrower
    assert out.shape == (40, 40, 1) and out.dtype == np.float32
    assert resize(image[..., 0], (10, 10)).shape == (10, 10)


def test_resize_to_same_size_returns_the_image():
    image = colourful(16, 16)
    assert resize(image, 16) is image


@pytest.mark.parametrize("size", [0, -3, (10,), (10, 0), 2.5, True, "64"])
def test_resize_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="size"):
        resize(colourful(), size)


# ----------------------------------------------------------------- EXIF and reduced decode


def _jpeg_with_orientation(path, rgb: np.ndarray, orientation: int) -> None:
    """Write ``rgb`` as a JPEG whose EXIF says how to turn it upright, with Pillow."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, quality=100, subsampling=0, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_viewers_do(tmp_path, orientation):
    from PIL import Image, ImageOps

    # Left half dark, right half bright, top-left corner marked: every one of the eight
    # orientations gives a different picture.
    rgb = np.full((24, 40, 3), 40, np.uint8)
    rgb[:, 20:] = 200
    rgb[:6, :6] = (255, 0, 0)
    path = tmp_path / f"o{orientation}.jpg"
    _jpeg_with_orientation(path, rgb, orientation)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    got = read_image(path)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def test_rotated_jpeg_is_not_read_sideways(tmp_path):
    rgb = np.zeros((20, 50, 3), np.uint8)  # stored landscape, tagged "rotate 90 clockwise"
    _jpeg_with_orientation(tmp_path / "r.jpg", rgb, 6)
    assert read_image(tmp_path / "r.jpg").shape == (50, 20, 3)


def test_unknown_exif_orientation_is_ignored(tmp_path):
    rgb = colourful(16, 24)
    _jpeg_with_orientation(tmp_path / "x.jpg", rgb, 9)
    assert read_image(tmp_path / "x.jpg").shape == (16, 24, 3)


@pytest.mark.parametrize(("min_side", "shape"), [
    (None, (400, 640)), (300, (400, 640)), (200, (200, 320)), (100, (100, 160)),
    (50, (50, 80)), (10, (50, 80)),
])
def test_large_jpeg_is_decoded_at_the_size_the_caller_needs(tmp_path, min_side, shape):
    yy, xx = np.mgrid[:400, :640]
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
    write(tmp_path / "big.jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    full = read_image(tmp_path / "big.jpg")
    got = read_image(tmp_path / "big.jpg", min_side=min_side)
    assert got.shape == (*shape, 3)
    # The DCT-domain reduction is an average over blocks, as INTER_AREA is.
    expected = resize(full, shape)
    assert np.abs(got.astype(float) - expected).mean() < 3.0


def test_reduced_decode_keeps_exif_orientation(tmp_path):
    rgb = np.zeros((160, 320, 3), np.uint8)
    rgb[:, :160] = 255
    _jpeg_with_orientation(tmp_path / "r.jpg", rgb, 6)
    got = read_image(tmp_path / "r.jpg", min_side=40)
    assert got.shape == (80, 40, 3)  # quarter size, upright
    assert got[:30].mean() > 200 and got[-30:].mean() < 50  # left half turned to the top


@pytest.mark.parametrize(("orientation", "min_side", "factor"),
                         [(1, None, 1), (1, 40, 4), (6, None, 1), (6, 80, 2)])
def test_colour_jpeg_decodes_to_the_pixels_opencv_gives_in_bgr(tmp_path, orientation,
                                                                min_side, factor):
    # 8-bit colour JPEGs are decoded straight to RGB: the same pixels as OpenCV's BGR
    # decoding with the channels swapped, full size and reduced, turned upright.
    rgb = colourful(160, 320)
    _jpeg_with_orientation(tmp_path / "c.jpg", rgb, orientation)
    data = np.fromfile(tmp_path / "c.jpg", np.uint8)
    flags = {1: cv2.IMREAD_UNCHANGED, 2: cv2.IMREAD_REDUCED_COLOR_2,
             4: cv2.IMREAD_REDUCED_COLOR_4}[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    expected = cv2.cvtColor(cv2.imdecode(data, flags), cv2.COLOR_BGR2RGB)
    if orientation == 6:
        expected = cv2.rotate(expected, cv2.ROTATE_90_CLOCKWISE)
    got = read_image(tmp_path / "c.jpg", min_side=min_side)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_png_is_never_reduced(tmp_path):
    write(tmp_path / "big.png", colourful(200, 300))
    assert read_image(tmp_path / "big.png", min_side=20).shape == (200, 300, 3)


def test_a_very_large_image_header_does_not_warn_or_fail(tmp_path, monkeypatch):
    from PIL import Image

    rgb = np.zeros((40, 60, 3), np.uint8)
    _jpeg_with_orientation(tmp_path / "big.jpg", rgb, 6)
    # As if the image were larger than Pillow's decompression-bomb limits (warning, error).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 2400 pixels: Pillow warns
    assert read_image(tmp_path / "big.jpg").shape == (60, 40, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: it raises
    assert read_image(tmp_path / "big.jpg").shape == (60, 40, 3)  # the header is still read
    assert Image.MAX_IMAGE_PIXELS == 1000  # and Pillow's own limit is left as it was


# -- bounded decoding ---------------------------------------------------------------------
def test_an_image_over_the_pixel_limit_is_refused_naming_its_size_and_the_limit(
        tmp_path, monkeypatch):
    write(tmp_path / "big.png", colourful(100, 200))
    monkeypatch.setenv("KAD_MAX_IMAGE_PIXELS", "10000")
    with pytest.raises(ImageReadError) as refused:
        read_image(tmp_path / "big.png", min_side=20)  # a PNG cannot be decoded reduced
    text = str(refused.value)
    assert "200x100 px" in text and "limit of 0.01 megapixels" in text
    setting = re.search(r"KAD_MAX_IMAGE_PIXELS=(\d+)", text).group(1)
    monkeypatch.setenv("KAD_MAX_IMAGE_PIXELS", setting)  # the value suggested works
    assert read_image(tmp_path / "big.png").shape == (100, 200, 3)


def test_a_large_jpeg_counts_at_the_size_it_is_decoded_at(tmp_path, monkeypatch):
    write(tmp_path / "big.jpg", colourful(400, 480))
    monkeypatch.setenv("KAD_MAX_IMAGE_PIXELS", "10000")
    assert read_image(tmp_path / "big.jpg", min_side=50).shape == (50, 60, 3)  # 1/8
    with pytest.raises(ImageReadError, match="480x400 px"):
        read_image(tmp_path / "big.jpg")


def test_the_limit_is_checked_on_the_header_before_any_pixel_is_decoded(tmp_path):
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    # a 40,000 x 40,000 PNG header (1.6 gigapixels, over Pillow's and OpenCV's limits)
    # with a few bytes of pixel data: refused in kad's words, from the header alone
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(ImageReadError) as refused:
        read_image(tmp_path / "bomb.png")
    assert "40000x40000 px (1600.0 megapixels)" in str(refused.value)
    assert "limit of 64 megapixels" in str(refused.value)


@pytest.mark.parametrize("where", [(0, 0), (517, 1001), (1023, 1023)])
def test_check_usable_sees_one_odd_pixel_anywhere(where):
    # The usability check looks at a sparse grid of pixels first; a pixel off that grid
    # still makes the image usable, and without it the image is one flat colour.
    flat = np.full((1024, 1024, 3), 40, np.uint8)
    with pytest.raises(ImageReadError, match="one flat colour"):
        check_usable(flat, "flat.png")
    odd = flat.copy()
    odd[where] = (40, 41, 40)
    assert check_usable(odd, "odd.png") is odd


@pytest.mark.parametrize(("shape", "size"), [
    ((32, 32, 3), 224), ((300, 200, 3), 96), ((100, 400, 3), 224), ((50, 60, 1), (64, 40)),
    ((96, 96, 3), 96),
])
def test_resize_into_a_batch_row_writes_the_pixels_resize_returns(shape, size):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    expected = resize(image, size)
    batch = np.zeros((3, *expected.shape), np.uint8)
    assert resize(image, size, out=batch[1]) is batch[1] or np.shares_memory(
        resize(image, size, out=batch[1]), batch)
    np.testing.assert_array_equal(batch[1], expected)
    assert not batch[0].any() and not batch[2].any()
    with pytest.raises(ValueError, match="out must be"):
        resize(image, size, out=np.zeros((5, 5, shape[2]), np.uint8))
