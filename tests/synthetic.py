"""Small synthetic image sets whose answer is known."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def screening_folder(root: Path, n_normal: int = 60, n_abnormal: int = 20,
                     size: int = 48, seed: int = 0) -> Path:
    """``normal/`` smooth gradients and ``abnormal/`` speckled ones, two images per patient
    listed in ``patients.csv``."""
    rng = np.random.default_rng(seed)
    rows = ["image,patient"]
    for sub, n in (("normal", n_normal), ("abnormal", n_abnormal)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            gradient = np.linspace(60, 160, size, dtype=np.float32)[None, :, None]
            image = np.repeat(np.repeat(gradient, size, axis=0), 3, axis=2)
            image += rng.normal(0, 3, image.shape)
            if sub == "abnormal":
                image += rng.choice([0, 120], size=image.shape, p=[0.85, 0.15])
            name = f"{sub}/{sub}{i}.png"
            cv2.imwrite(str(root / name), np.clip(image, 0, 255).astype(np.uint8))
            rows.append(f"{name},p{i // 2}{sub[0]}")
    (root / "patients.csv").write_text("\n".join(rows) + "\n")
    return root


def multi_photo_folder(root: Path, n_patients: int = 40, photos: int = 4, size: int = 32,
                       seed: int = 0, first: int = 0) -> Path:
    """``normal/PPP_K.png``: ``photos`` near-identical photographs (a little noise and
    brightness apart) of each of ``n_patients`` patients, whose images differ; no
    patients.csv. Patients are numbered from ``first``."""
    rng = np.random.default_rng(seed)
    (root / "normal").mkdir(parents=True, exist_ok=True)
    for p in range(first, first + n_patients):
        coarse = rng.uniform(40, 200, (4, 4, 3)).astype(np.float32)
        base = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        for k in range(photos):
            image = base + rng.normal(0, 2, base.shape) + rng.normal(0, 2)
            cv2.imwrite(str(root / "normal" / f"{p:03d}_{k}.png"),
                        np.clip(image, 0, 255).astype(np.uint8))
    return root


def dicom_photograph(path: Path, rgb: np.ndarray, patient: str | None = None, *,
                     photometric: str = "RGB") -> Path:
    """Write the ``(H, W, 3)`` ``uint8`` RGB array ``rgb`` (or an ``(H, W)`` grey one, with
    ``photometric`` MONOCHROME1/2) as an uncompressed DICOM ophthalmic photograph, with
    ``patient`` as its PatientID (needs pydicom: the ``dicom`` extra)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    photography = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = photography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = photography
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OP"
    if patient is not None:
        ds.PatientID = patient
    ds.set_pixel_data(np.ascontiguousarray(rgb), photometric_interpretation=photometric,
                      bits_stored=8 * np.dtype(rgb.dtype).itemsize)
    ds.save_as(path, enforce_file_format=True)
    return path


def pattern_images(root: Path, n: int = 6, size: int = 48) -> list[Path]:
    """``n`` PNG images computed from arithmetic alone (no random numbers, so the same
    pixels with any NumPy): smooth gradients like :func:`screening_folder`'s normals, every
    other one with a regular speckle of bright dots like its abnormal images."""
    root.mkdir(parents=True, exist_ok=True)
    rows, cols = np.mgrid[0:size, 0:size]
    files = []
    for i in range(n):
        ramp = 60 + (100 + 4 * i) * cols / (size - 1)
        image = np.stack([ramp + 3 * np.sin(rows * (i + 1) / 5 + c) for c in range(3)], -1)
        if i % 2:
            image += 120 * (((rows * 7 + cols * 3 + i) % (5 + i)) == 0)[..., None]
        files.append(root / f"pattern{i}.png")
        cv2.imwrite(str(files[-1]), np.clip(np.round(image), 0, 255).astype(np.uint8))
    return files
def report_case(root: Path, seed: int = 0) -> Path:
    """Six photographs to score, as a grader's report shows them: ``sub1/x.jpeg`` (speckled,
    abnormal) and ``sub2/x.jpeg`` (smooth, normal) share a name; the others are wide,
    tall and square, normal and abnormal. Returns the folder."""
    rng = np.random.default_rng(seed)
    shapes = {"sub1/x.jpeg": (48, 48, True), "sub2/x.jpeg": (48, 48, False),
              "sub1/wide.png": (40, 72, False), "sub2/tall.png": (72, 40, True),
              "sub2/deeper/square.png": (48, 48, False), "speckled.png": (56, 56, True)}
    for name, (height, width, abnormal) in shapes.items():
        gradient = np.linspace(60, 160, width, dtype=np.float32)[None, :, None]
        image = np.repeat(np.repeat(gradient, height, axis=0), 3, axis=2)
        image += rng.normal(0, 3, image.shape)
        if abnormal:  # a speckled patch: where the heatmap should point
            patch = image[height // 4: height // 2, width // 4: width // 2]
            patch += rng.choice([0, 120], size=patch.shape, p=[0.7, 0.3])
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), np.clip(image, 0, 255).astype(np.uint8))
    return root
