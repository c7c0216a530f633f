"""The paper's preprocessing: fundus crop, local average colour, spec parsing, keys."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from kad.data.images import read_image, resize
from kad.data.preprocessing import (
    Fundus,
    Natural,
    Preprocessing,
    crop_fundus,
    get_preprocessing,
)
from kad.data.preview import save_preview
from kad.errors import KadError

SHARED = Path(__file__).resolve().parents[2] / "shared"
KAGGLE_DR = SHARED / "data" / "kaggle-dr-256" / "images"
GREY = np.float32(128 / 255)  # outside the fundus mask: Graham's grey, 128 of 255


def synthetic_fundus(
    height: int,
    width: int,
    radius: float,
    centre: tuple[float, float] | None = None,
    background: int = 0,
    brightness: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """A fake fundus photograph, RGB uint8: a reddish disc with vignetting, a smooth
    texture, dark "vessels" and a bright "optic disc", on a noisy flat background."""
    rng = np.random.default_rng(seed)
    cx, cy = centre if centre is not None else (width / 2, height / 2)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    distance = np.hypot(xx - cx, yy - cy) / radius
    texture = cv2.resize(rng.normal(0, 1, (12, 12)).astype(np.float32), (width, height),
                         interpolation=cv2.INTER_CUBIC)
    shade = (1.0 - 0.45 * distance**2) * (1.0 + 0.06 * texture)
    features = np.ones((height, width), np.float32)
    thickness = max(1, round(radius / 60))
    for _ in range(6):
        ends = (rng.uniform(-1, 1, (2, 2)) * radius + (cx, cy)).astype(np.int32)
        cv2.line(features, tuple(map(int, ends[0])), tuple(map(int, ends[1])), 0.6, thickness)
    optic = (round(cx + 0.45 * radius), round(cy))
    cv2.circle(features, optic, max(1, round(radius / 7)), 1.5, -1)
    colour = np.array([210.0, 105.0, 55.0], np.float32) * brightness
    disc = colour * (shade * features)[..., None]
    noise = rng.normal(0, 2, (height, width, 3)).astype(np.float32)
    image = np.where((distance <= 1)[..., None], disc, background + noise)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def bright_pixels(rgb: np.ndarray, background: int = 0) -> int:
    return int(np.count_nonzero(rgb.max(axis=2) > background + 40))


# ------------------------------------------------------------------------- crop_fundus


@pytest.mark.parametrize(
    ("height", "width", "radius", "centre", "background"),
    [
        (300, 300, 125, None, 0),  # centred, black background
        (300, 300, 125, None, 25),  # dark-grey background
        (600, 900, 330, None, 0),  # clipped at the top and the bottom
        (600, 900, 300, (450, 270), 20),  # clipped at the top only
        (400, 700, 150, (250, 210), 30),  # off-centre, non-square
        (700, 400, 180, None, 0),  # portrait
    ],
)
def test_crop_is_square_around_the_whole_disc(height, width, radius, centre, background):
    rgb = synthetic_fundus(height, width, radius, centre, background)
    crop, mask = crop_fundus(rgb)
    side = crop.shape[0]
    assert crop.shape == (side, side, 3) and crop.dtype == np.uint8
    assert mask.shape == (side, side) and mask.dtype == bool
    assert abs(side - 2 * radius) <= 0.1 * 2 * radius
    # Every pixel of the disc made it into the crop.
    assert bright_pixels(crop, background) >= 0.99 * bright_pixels(rgb, background)
    # A disc that is not clipped is centred in the crop.
    ys, xs = np.nonzero(crop.max(axis=2) > background + 40)
    if 2 * radius <= min(height, width):
        assert abs(xs.mean() - side / 2) < 0.05 * side
        assert abs(ys.mean() - side / 2) < 0.05 * side
    # The mask covers the disc and not the corners.
    assert mask[side // 2, side // 2]
    assert not mask[0, 0] and not mask[-1, -1]


def test_crop_pads_a_fundus_clipped_at_top_and_bottom_with_black():
    rgb = synthetic_fundus(600, 900, 330)
    crop, mask = crop_fundus(rgb)
    side = crop.shape[0]
    assert side > 600  # wider than the photograph is high
    pad = (side - 600) // 2
    assert pad >= 20
    assert crop[: pad - 2].max() == 0 and crop[-(pad - 2) :].max() == 0
    assert not mask[: pad - 2].any() and not mask[-(pad - 2) :].any()


def test_crop_of_large_dim_photograph():
    rgb = synthetic_fundus(1300, 1950, 700, background=8, brightness=0.35)
    crop, _ = crop_fundus(rgb)
    assert abs(crop.shape[0] - 1400) <= 140


def _gradient(height: int, width: int) -> np.ndarray:
    ramp = np.linspace(120, 250, width, dtype=np.float32)
    return np.repeat(np.broadcast_to(ramp, (height, width))[..., None], 3, axis=2).astype(
        np.uint8
    )


@pytest.mark.parametrize(
    "rgb",
    [
        np.zeros((8, 8, 3), np.uint8),
        np.full((8, 8, 3), 255, np.uint8),
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((300, 500, 3), np.uint8),
        np.full((300, 500, 3), 255, np.uint8),
        np.zeros((2000, 12, 3), np.uint8),
        _gradient(240, 320),
        cv2.circle(_gradient(240, 320), (160, 120), 60, (20, 20, 20), -1),  # dark blob
    ],
    ids=["8x8-black", "8x8-white", "1x1", "black", "white", "thin", "bright", "dark-blob"],
)
def test_crop_falls_back_to_a_centred_square_without_a_fundus(rgb):
    crop, mask = crop_fundus(rgb)
    side = min(rgb.shape[:2])
    top, left = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
    assert np.array_equal(crop, rgb[top : top + side, left : left + side])
    assert mask.shape == (side, side) and mask.all()


@pytest.mark.parametrize(
    "rgb",
    [
        np.zeros((8, 8, 3), np.uint8),
        np.full((8, 8, 3), 255, np.uint8),
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((2000, 12, 3), np.uint8),
        np.random.default_rng(0).integers(0, 256, (120, 333, 3), dtype=np.uint8),
        np.random.default_rng(1).integers(0, 30, (64, 64, 3), dtype=np.uint8),
        synthetic_fundus(40, 30, 14),
    ],
    ids=["8x8-black", "8x8-white", "1x1", "thin", "noise", "dark-noise", "tiny-fundus"],
)
def test_fundus_never_crashes(rgb):
    crop, mask = crop_fundus(rgb)
    assert crop.shape[:2] == mask.shape and crop.shape[0] == crop.shape[1] >= 1
    out = Fundus()(rgb)
    assert out.shape == (256, 256, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_crop_works_on_a_grey_converted_fundus():
    rgb = synthetic_fundus(300, 400, 130)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    crop, _ = crop_fundus(grey)  # 2-D input is accepted and made RGB
    assert abs(crop.shape[0] - 260) <= 26
    out = Fundus()(np.repeat(grey[..., None], 3, axis=2))
    assert out.shape == (256, 256, 3)
    assert np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 1], out[..., 2])


# ------------------------------------------------------------------------------ Fundus


def test_fundus_output_shape_range_and_grey_outside():
    out = Fundus()(synthetic_fundus(400, 600, 180, background=25))
    assert out.shape == (256, 256, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
        assert np.all(corner == GREY)
    # The band between 0.9 and 1 of the radius is grey too (no bright ring).
    ring = out[128, 2:10]
    assert np.all(ring == GREY)
    assert not np.all(out[128, 100:156] == GREY)


def test_fundus_size_option():
    out = Fundus(size=64)(synthetic_fundus(200, 300, 90))
    assert out.shape == (64, 64, 3)


def test_fundus_mask_one_keeps_the_whole_disc():
    rgb = synthetic_fundus(300, 300, 125)
    # Texture, so that no pixel of the fundus comes out exactly grey.
    noise = np.random.default_rng(0).integers(0, 24, rgb.shape, dtype=np.uint8)
    rgb = np.where(rgb.max(axis=2, keepdims=True) > 30, cv2.add(rgb, noise), rgb)
    grey_full = np.mean(np.all(Fundus(mask=1.0)(rgb) == GREY, axis=2))
    grey_default = np.mean(np.all(Fundus()(rgb) == GREY, axis=2))
    assert grey_full < grey_default
    assert grey_full == pytest.approx(1 - np.pi / 4, abs=0.03)  # only the corners


def test_subtracting_the_local_average_evens_out_lighting():
    bright = synthetic_fundus(300, 300, 125, brightness=1.0)
    dim = synthetic_fundus(300, 300, 125, brightness=0.5)
    scaled_bright, scaled_dim = (Natural()(crop_fundus(x)[0]) for x in (bright, dim))
    before = np.abs(scaled_bright - scaled_dim).mean()
    fundus = Fundus()
    after = np.abs(fundus(bright) - fundus(dim)).mean()
    assert after < before / 4


def test_natural_rescales_only():
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    out = Natural()(rgb)
    assert out.shape == (17, 23, 3) and out.dtype == np.float32
    assert np.allclose(out * 255, rgb)


def test_preprocessing_outputs_are_deterministic():
    rgb = synthetic_fundus(300, 400, 130, background=20)
    assert np.array_equal(Fundus()(rgb), Fundus()(rgb.copy()))


def test_fundus_pixels_are_the_8_bit_image_the_float_one_is_made_of():
    rgb = synthetic_fundus(300, 400, 130, background=20)
    pixels = Fundus(size=96).pixels(rgb)
    assert pixels.dtype == np.uint8 and pixels.shape == (96, 96, 3)
    np.testing.assert_array_equal(Fundus(size=96)(rgb), pixels.astype(np.float32) / 255)


@pytest.mark.parametrize("cut", [0, 40, 90])
def test_mask_erosion_by_half_planes_matches_eroding_the_drawn_mask(cut):
    from kad.data.preprocessing import _disc, _eroded, _find_fundus, _fundus_mask, _square_crop

    rgb = synthetic_fundus(300 - 2 * cut, 400, 140, centre=(200, 150 - cut))
    found = _find_fundus(rgb)
    _, (left, top, side) = _square_crop(rgb, found)
    size, margin = 224, 11
    hull = (found[1] + 0.5 - (left, top)) * (size / side) - 0.5
    drawn = cv2.erode(_fundus_mask(size, hull).astype(np.uint8), _disc(2 * margin + 1),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    got = _eroded(size, hull, margin)
    assert np.count_nonzero(got != drawn) <= 0.01 * np.count_nonzero(drawn)
    if cut:  # the cuts are eroded, not only the disc
        assert np.count_nonzero(got) < 0.9 * np.count_nonzero(_eroded(size, hull[:0], margin))


def test_disc_overlap_counts_the_pixels_whose_centre_is_in_the_disc():
    from kad.data.preprocessing import _disc_overlap

    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = rng.integers(8, 120, 2)
        region = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        cx, cy = rng.uniform(-20, width + 20), rng.uniform(-20, height + 20)
        radius = rng.uniform(0, 150)
        yy, xx = np.ogrid[:height, :width]
        disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2
        union = np.count_nonzero(region.view(bool) | disc)
        expected = np.count_nonzero(region.view(bool) & disc) / union if union else 0.0
        assert _disc_overlap(region, (cx, cy, radius)) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------ specs and keys


def test_get_preprocessing_by_name_and_options():
    assert get_preprocessing("natural") == Natural()
    assert get_preprocessing("fundus") == Fundus()
    p = get_preprocessing("fundus:size=512,alpha=2")
    assert p == Fundus(size=512, alpha=2.0)
    assert isinstance(p.alpha, float)
    instance = Fundus(size=128)
    assert get_preprocessing(instance) is instance
    from kad.registry import PREPROCESSING, load, names

    assert set(names(PREPROCESSING)) == {"natural", "fundus"}
    assert all(issubclass(load(PREPROCESSING, n), Preprocessing) for n in names(PREPROCESSING))


def test_keys_spell_every_parameter_and_round_trip():
    assert Natural().key == "natural"
    assert Fundus().key == "fundus:alpha=4.0,blur=0.016666666666666666,mask=0.9,size=256"
    for p in (Natural(), Fundus(), Fundus(size=300, blur=0.02, alpha=3, mask=1)):
        assert get_preprocessing(p.key) == p
        assert get_preprocessing(p.key).key == p.key
    assert str(Fundus()) == Fundus().key


def test_key_changes_with_every_parameter():
    keys = {
        Fundus().key,
        Fundus(size=224).key,
        Fundus(blur=0.02).key,
        Fundus(alpha=2.0).key,
        Fundus(mask=0.8).key,
        Natural().key,
    }
    assert len(keys) == 6
    assert Fundus(alpha=4).key == Fundus(alpha=4.0).key  # int and float spell the same


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(KadError, match=r"unknown preprocessing 'fundsu'.*'fundus'.*natural"):
        get_preprocessing("fundsu")


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(KadError, match=r"'sigma'.*its options: size, blur, alpha, mask"):
        get_preprocessing("fundus:sigma=3")
    with pytest.raises(KadError, match=r"'size'.*its options: resize"):
        get_preprocessing("natural:size=3")


@pytest.mark.parametrize(
    ("spec", "value"),
    [
        ("fundus:size=16", "16"),
        ("fundus:size=31", "31"),
        ("fundus:size=big", "big"),
        ("fundus:blur=0", "0"),
        ("fundus:blur=-0.1", "-0.1"),
        ("fundus:mask=0", "0"),
        ("fundus:mask=1.5", "1.5"),
        ("fundus:alpha=0", "0"),
    ],
)
def test_invalid_values_raise_value_error_quoting_them(spec, value):
    with pytest.raises(ValueError, match=value):
        get_preprocessing(spec)
    with pytest.raises(KadError):  # and the CLI reports them as one line
        get_preprocessing(spec)


def test_invalid_values_in_the_constructor_raise_value_error():
    with pytest.raises(ValueError, match="size must be an integer of at least 32"):
        Fundus(size=10)
    with pytest.raises(ValueError, match="mask must be in"):
        Fundus(mask=0.0)


def test_preprocessings_are_frozen_and_hashable():
    p = Fundus()
    with pytest.raises(AttributeError):
        p.size = 3  # type: ignore[misc]
    assert len({Fundus(), Fundus(), Natural()}) == 2


# ----------------------------------------------------------------------------- preview


def test_preview_writes_one_row_per_image(tmp_path):
    paths = []
    for i, (h, w) in enumerate([(300, 300), (400, 600)]):
        path = tmp_path / f"eye_{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(synthetic_fundus(h, w, 0.45 * min(h, w)),
                                            cv2.COLOR_RGB2BGR))
        paths.append(path)
    out = save_preview(paths, tmp_path / "sub" / "preview.png", "fundus:size=128", size=96)
    assert out == tmp_path / "sub" / "preview.png"
    sheet = read_image(out)
    assert sheet.shape[1] > 2 * 96 and sheet.shape[0] > 2 * 96
    with pytest.raises(ValueError, match="at least one"):
        save_preview([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\.png"):
        save_preview(paths, tmp_path / "x.jpg")
    with pytest.raises(KadError, match="missing.png"):
        save_preview([tmp_path / "missing.png"], tmp_path / "y.png")


# --------------------------------------------------------------------------- real data


@pytest.mark.shared
def test_fundus_on_real_kaggle_images():
    if not KAGGLE_DR.is_dir():
        pytest.skip(f"real data not available at {KAGGLE_DR}")
    paths = sorted(KAGGLE_DR.glob("*.jpeg"))[:5]
    if len(paths) < 5:
        pytest.skip(f"fewer than 5 images in {KAGGLE_DR}")
    fundus = Fundus()
    for path in paths:
        rgb = read_image(path)
        crop, mask = crop_fundus(rgb)
        assert crop.shape[0] >= 200, f"{path.name}: crop of {crop.shape[0]} px"
        assert mask.mean() > 0.6, path.name
        out = fundus(rgb)
        assert out.shape == (256, 256, 3) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        assert out.std() > 0.02, f"{path.name}: preprocessed image is flat"


# ------------------------------------------------------------- sizes decoded and chosen


def test_large_jpeg_is_decoded_reduced_for_the_network_input(tmp_path, monkeypatch):
    from kad.data.datasets import FileSource
    from kad.features.extract import load_preprocessed

    yy, xx = np.mgrid[:600, :800]
    rgb = np.stack([xx % 256, yy % 256, (xx // 4 + yy // 4) % 256], axis=2).astype(np.uint8)
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    source = FileSource([path])
    seen = []
    original = FileSource.load_scaled

    def spy(self, i, min_side):
        image = original(self, i, min_side)
        seen.append((min_side, image.shape[:2]))
        return image

    monkeypatch.setattr(FileSource, "load_scaled", spy)
    got = load_preprocessed(source, 0, Natural(), 96)
    assert seen == [(96, (150, 200))]  # a quarter: the shorter side stays >= 96
    full = resize(Natural()(read_image(path)), 96)
    assert got.shape == full.shape == (96, 96, 3)
    assert np.abs(got - full).mean() < 2 / 255


def test_fundus_needs_twice_its_output_size_natural_the_input_size():
    assert Fundus().source_side(299) == 512
    assert Fundus(size=128).source_side(299) == 256
    assert Natural().source_side(224) == 224


def test_revisions_enter_the_feature_cache_key(monkeypatch):
    from kad.data.datasets import load_dataset
    from kad.features.extract import plan_extraction

    digits = load_dataset("digits")
    plan = plan_extraction(digits, "mobilenet_v2:alpha=0.35", "none", 32, runtime="keras")
    assert plan.inputs["preprocessing_revision"] == Natural().revision
    monkeypatch.setattr(Natural, "revision", property(lambda self: 99))
    again = plan_extraction(digits, "mobilenet_v2:alpha=0.35", "none", 32, runtime="keras")
    assert again.key != plan.key


@pytest.mark.parametrize(("backbone", "expected"), [
    ("inception_resnet_v2", 80), ("inception_v3", 80), ("mobilenet_v2:alpha=0.35", 80),
])
def test_tiny_images_get_a_small_input_size(backbone, expected):
    from kad.data.datasets import load_dataset
    from kad.features.backbones import get_backbone
    from kad.features.extract import default_input_size, plan_extraction

    digits = load_dataset("digits")  # 8x8 images
    assert default_input_size(digits, get_backbone(backbone)) == expected
    assert plan_extraction(digits, backbone, "none", runtime="keras").input_size == expected


def test_small_and_file_images_keep_the_native_input_size(tmp_path):
    from kad.data.datasets import ArraySource, Dataset, load_dataset
    from kad.features.backbones import get_backbone
    from kad.features.extract import default_input_size

    irv2 = get_backbone("inception_resnet_v2")
    cifar_like = Dataset(name="c", source=ArraySource(np.zeros((4, 32, 32, 3), np.uint8)),
                         ids=np.arange(4), target=np.zeros(4))
    assert default_input_size(cifar_like, irv2) == 299
    tiny = Dataset(name="t", source=ArraySource(np.zeros((4, 5, 5), np.uint8)),
                   ids=np.arange(4), target=np.zeros(4))
    assert default_input_size(tiny, irv2) == 75  # never below the backbone's minimum
    for sub in ("normal", "abnormal"):
        (tmp_path / sub).mkdir()
        for i in range(2):
            cv2.imwrite(str(tmp_path / sub / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
    files = load_dataset("folder", tmp_path, kind="natural")
    assert default_input_size(files, irv2) == 299  # files: sizes unknown until decoded


def test_fundus_search_statistics_are_numpys_to_the_last_bit():
    # The fundus search reads its background level and histogram with OpenCV; they are
    # exactly what np.percentile and np.bincount give, so the search finds what it found.
    from kad.data.preprocessing import _histogram, _percentile

    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 97, 1000, 4096):
        for low, high in ((0, 256), (30, 34), (200, 201)):
            values = rng.integers(low, high, n).astype(np.uint8)
            np.testing.assert_array_equal(_histogram(values), np.bincount(values, minlength=256))
            for q in (0, 20, 37.5, 50, 99.9, 100):
                assert _percentile(_histogram(values), q) == float(np.percentile(values, q))


def test_disc_overlap_counts_the_disc_pixel_by_pixel():
    from kad.data.preprocessing import _disc_overlap

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:60, :80]
    for _ in range(20):
        region = (rng.random((60, 80)) < 0.6).astype(np.uint8)
        cx, cy, radius = rng.uniform(-10, 90), rng.uniform(-10, 70), rng.uniform(0, 50)
        disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius ** 2
        both = np.count_nonzero(disc & (region > 0))
        union = np.count_nonzero(disc | (region > 0))
        assert _disc_overlap(region, (cx, cy, radius)) == pytest.approx(both / union)


@pytest.mark.parametrize(("spec", "size"), [("fundus:size=96", 96), ("fundus:size=64", 96),
                                            ("natural", 96), ("natural", 20)])
def test_pixels_into_a_batch_row_are_the_pixels_resized(spec, size):
    from kad.data.preprocessing import get_preprocessing

    prep = get_preprocessing(spec)
    rgb = synthetic_fundus(300, 400, 130, background=20)
    expected = resize(prep.pixels(rgb), size)
    batch = np.zeros((3, size, size, 3), np.uint8)
    assert np.shares_memory(prep.pixels_into(rgb, batch[1]), batch)
    np.testing.assert_array_equal(batch[1], expected)
    assert not batch[0].any() and not batch[2].any()
