"""DICOM photographs in (kad.data.dicom): the files pydicom ships in its wheel, synthetic
ones, damaged ones, the pixel limit, patients from PatientID, and what happens without
the extra. (tests/test_screening.py scores DICOM photographs with a fitted model.)"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from kad.data import dicom  # noqa: E402
from kad.data.datasets import load_dataset  # noqa: E402
from kad.data.datasets.base import list_image_files, skip_reason  # noqa: E402
from kad.data.images import read_image  # noqa: E402
from kad.errors import ImageReadError  # noqa: E402
from kad.screening.results import collect_images, write_scores_csv  # noqa: E402
from synthetic import dicom_photograph, screening_folder  # noqa: E402

LIMIT = 64_000_000


def shipped(name: str) -> Path:
    """A test file inside pydicom's installed package (never one it would download)."""
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    assert path.is_file(), f"{name} is not shipped with pydicom {pydicom.__version__}"
    return path


# -- colour and grey ----------------------------------------------------------------------


def test_colour_encodings_decode_to_the_same_rgb_photograph():
    """pydicom's 100x100 colour bars in several encodings: RGB (RLE, JPEG Lossless, JPEG
    2000), YBR_FULL_422 uncompressed and YBR_FULL in a lossy JPEG Baseline all come out as
    the same RGB image (to within the lossy codecs' error); YCbCr left unconverted is ~90
    grey levels off."""
    reference = read_image(shipped("SC_rgb_rle.dcm"))
    assert reference.shape == (100, 100, 3) and reference.dtype == np.uint8
    assert reference[5, 50].tolist() == [255, 0, 0] and reference[25, 50].tolist() == [0, 255, 0]
    assert reference[45, 50].tolist() == [0, 0, 255]
    for name, tolerance in [("SC_rgb_jpeg_gdcm.dcm", 0), ("SC_rgb_gdcm_KY.dcm", 0),
                            ("SC_rgb_rle_16bit.dcm", 0),
                            ("SC_ybr_full_422_uncompressed.dcm", 1.0),
                            ("SC_rgb_jpeg_dcmtk.dcm", 1.0), ("SC_rgb_jls_lossy_line.dcm", 1.0)]:
        image = read_image(shipped(name))
        error = np.abs(image.astype(int) - reference).mean()
        assert image.shape == reference.shape and error <= tolerance, (name, error)


def test_grey_files_are_the_same_whatever_their_compression():
    """MONOCHROME2 16-bit MR with a window: uncompressed, JPEG-LS and JPEG 2000 lossless
    give one image, three equal channels, the window spread over 0-255."""
    image = read_image(shipped("MR_small.dcm"))
    assert image.shape == (64, 64, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert image.max() == 255 and len(np.unique(image)) > 100
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_RLE.dcm", "MR_small_bigendian.dcm"):
        assert np.array_equal(read_image(shipped(name)), image), name


def test_palette_colour_goes_through_its_table():
    image = read_image(shipped("examples_palette.dcm"))
    assert image.shape == (350, 800, 3)
    assert (image[..., 0] != image[..., 2]).mean() > 0.1  # coloured, not grey


def _ramp(tmp_path, name, **elements) -> Path:
    """A 16-bit MONOCHROME2 ramp 0..4095 across 64 columns, with ``elements`` set."""
    values = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (32, 1))
    path = dicom_photograph(tmp_path / name, values, photometric="MONOCHROME2")
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 11
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


def test_window_where_the_file_has_one_else_its_own_range(tmp_path):
    plain = read_image(_ramp(tmp_path, "plain.dcm"))[..., 0]
    assert plain[0, 0] == 0 and plain[0, -1] == 255  # min-max of the values
    assert np.all(np.diff(plain[0].astype(int)) > 0)
    windowed = read_image(_ramp(tmp_path, "window.dcm", WindowCenter=2048,
                                WindowWidth=1024))[..., 0]
    below, above = windowed[0, :24], windowed[0, 40:]  # values < 1536 and > 2560
    assert (below == 0).all() and (above == 255).all()
    assert 100 < windowed[0, 32] < 155


def test_monochrome1_is_inverted(tmp_path):
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))
    two = read_image(dicom_photograph(tmp_path / "m2.dcm", grey, photometric="MONOCHROME2"))
    one = read_image(dicom_photograph(tmp_path / "m1.dcm", grey, photometric="MONOCHROME1"))
    assert np.array_equal(two[..., 0], grey)
    assert np.array_equal(one, 255 - two)


def test_bytes_and_files_without_the_extension_decode_alike(tmp_path):
    path = shipped("SC_rgb_jpeg_dcmtk.dcm")
    data = path.read_bytes()
    unnamed = tmp_path / "photo"  # found by the DICM marker, not the name
    unnamed.write_bytes(data)
    expected = read_image(path)
    assert np.array_equal(dicom.decode_dicom(data, "upload", LIMIT), expected)
    assert np.array_equal(read_image(unnamed), expected)
    assert np.array_equal(dicom.read_dicom(path, LIMIT), expected)


# -- what is refused, and why -------------------------------------------------------------


@pytest.mark.parametrize(("name", "reason"), [
    ("SC_rgb_rle_2frame.dcm", "multi-frame DICOM file (2 frames of 100x100 px)"),
    ("MR_truncated.dcm", "damaged DICOM pixel data"),
    ("rtplan.dcm", "no PhotometricInterpretation"),
    ("no_meta.dcm", "'DICM' marker is not at byte 128"),
])
def test_files_kad_cannot_screen_are_refused_with_the_reason(name, reason):
    path = shipped(name)
    with pytest.raises(ImageReadError, match=re.escape(reason)) as error:
        read_image(path)
    assert error.value.path == str(path)


def test_the_pixel_limit_is_checked_on_the_header_before_decoding(monkeypatch):
    def decode(*args):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(dicom, "_decode_pixels", decode)
    monkeypatch.setenv("KAD_MAX_IMAGE_PIXELS", "4000")  # MR_small is 64x64 = 4096
    with pytest.raises(ImageReadError, match=r"limit of 0.004 megapixels.*"
                                             r"KAD_MAX_IMAGE_PIXELS=4096"):
        read_image(shipped("MR_small.dcm"))
    monkeypatch.setenv("KAD_MAX_IMAGE_PIXELS", "100000")  # 30 frames of 320x240 = 2.3 MP
    with pytest.raises(ImageReadError, match=r"30 frames of 320x240 px"):
        read_image(shipped("examples_ybr_color.dcm"))


def test_a_compressed_image_larger_than_its_header_says_is_not_decoded(monkeypatch):
    """A JPEG of 1200x900 px inside a DICOM header of 100x100 px is refused from the JPEG's
    own header, before libjpeg would allocate its full size."""
    import io

    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(shipped("SC_rgb_jpeg_dcmtk.dcm"))
    ok, jpeg = cv2.imencode(".jpg", np.full((900, 1200, 3), 90, np.uint8))
    ds.PixelData = encapsulate([jpeg.tobytes()])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    monkeypatch.setattr(dicom, "_decode_pixels", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ImageReadError, match="1200x900 px, not the 100x100 px"):
        dicom.decode_dicom(buffer.getvalue(), "forged", LIMIT)


def test_truncated_and_corrupted_files_never_crash():
    """Cuts every 251 bytes and 60 seeded byte corruptions of a JPEG and a native file:
    each decodes to an RGB image or raises ImageReadError, nothing else."""
    rng = np.random.default_rng(0)
    outcomes = {"decoded": 0, "refused": 0}
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "MR_small.dcm"):
        data = shipped(name).read_bytes()
        variants = [data[:cut] for cut in range(0, len(data), 251)]
        for _ in range(60):
            damaged = np.frombuffer(data, dtype=np.uint8).copy()
            at = rng.integers(132, len(data), size=rng.integers(1, 8))
            damaged[at] = rng.integers(0, 256, size=len(at), dtype=np.uint8)
            variants.append(damaged.tobytes())
        for variant in variants:
            try:
                image = dicom.decode_dicom(variant, name, LIMIT)
            except ImageReadError as exc:
                assert exc.path == name and exc.reason
                outcomes["refused"] += 1
            else:
                assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
                outcomes["decoded"] += 1
    assert outcomes["refused"] > 30 and outcomes["decoded"] > 30


def test_without_the_extra_dicom_files_are_skipped_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(dicom, "has_pydicom", lambda: False)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(shipped("SC_rgb_rle.dcm"), folder / "eye.dcm")
    cv2.imwrite(str(folder / "eye.png"), np.full((16, 16, 3), 90, np.uint8))
    (folder / "._eye.dcm").write_bytes(bytes(300))  # macOS metadata, not an image
    images, skipped = list_image_files(folder)
    assert images == [folder / "eye.png"]
    assert skipped[1] == (str(folder / "eye.dcm"), skip_reason(folder / "eye.dcm"))
    assert "not an image file" in skipped[0][1]
    assert 'pip install "kad[dicom]"' in skipped[1][1]
    with pytest.raises(ImageReadError, match=r'kad\[dicom\]'):  # named explicitly
        read_image(folder / "eye.dcm")
    files, not_scored = collect_images([folder])  # kad score's inputs, and its scores.csv
    assert files == [folder / "eye.png"] and [n.status for n in not_scored] == ["skipped"] * 2
    write_scores_csv(tmp_path / "scores.csv", [], not_scored)
    with open(tmp_path / "scores.csv", newline="") as fh:
        row = list(csv.DictReader(fh))[1]
    assert row["file"] == str(folder / "eye.dcm") and row["status"] == "skipped"
    assert 'pip install "kad[dicom]"' in row["reason"]


# -- patients ------------------------------------------------------------------------------


def _dicom_folder(root: Path, n_normal: int = 24, n_abnormal: int = 8, seed: int = 1) -> Path:
    """:func:`synthetic.screening_folder` (two images per patient) in ``root/png``, and the
    same pixels as DICOM photographs in ``root/dicom`` with the patient as PatientID (and
    no patients.csv)."""
    png = screening_folder(root / "png", n_normal=n_normal, n_abnormal=n_abnormal, seed=seed)
    with open(png / "patients.csv", newline="") as fh:
        patients = {row["image"]: row["patient"] for row in csv.DictReader(fh)}
    for name, patient in patients.items():
        target = (root / "dicom" / name).with_suffix(".dcm")
        target.parent.mkdir(parents=True, exist_ok=True)
        rgb = cv2.cvtColor(cv2.imread(str(png / name)), cv2.COLOR_BGR2RGB)
        dicom_photograph(target, rgb, f"PID-{patient}")
    return root


def test_patients_come_from_patient_id_unless_told_otherwise(tmp_path):
    from kad.screening.calibration import plan_fit_split

    root = _dicom_folder(tmp_path, n_normal=12, n_abnormal=4)
    folder = root / "dicom"
    cv2.imwrite(str(folder / "normal" / "extra.png"), np.full((48, 48, 3), 90, np.uint8))
    ds = load_dataset("folder:kind=natural", folder)
    patient = dict(zip(ds.ids.tolist(), ds.patient.tolist(), strict=True))
    assert patient["normal/normal0.dcm"] == patient["normal/normal1.dcm"] == "PID-p0n"
    assert patient["abnormal/abnormal3.dcm"] == "PID-p1a"
    assert patient["normal/extra.png"] == "normal/extra.png"  # a patient of its own
    split = plan_fit_split(ds, seed=3)
    parts = {int(i): name for name, rows in split.parts().items() for i in rows}
    for pid in set(ds.patient.tolist()):
        assert len({parts.get(int(i)) for i in np.flatnonzero(ds.patient == pid)}) == 1
    assert split.by_patient

    by_pattern = load_dataset("folder:kind=natural", folder, patient_pattern=r"^([a-z]+)")
    assert set(by_pattern.patient.tolist()) == {"normal", "abnormal", "extra"}
    rows = ["image,patient"] + [f"{i},x{n % 3}" for n, i in enumerate(ds.ids.tolist())]
    (folder / "patients.csv").write_text("\n".join(rows) + "\n")
    by_csv = load_dataset("folder:kind=natural", folder)
    assert set(by_csv.patient.tolist()) == {"x0", "x1", "x2"}
