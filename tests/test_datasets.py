"""Dataset loaders: layouts, labels, anomaly masks, patients, fingerprints and errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import CIFAR10_TAR, KAGGLE_DR, need
from kad.data.datasets import Dataset, dataset_names, load_dataset
from kad.data.datasets import natural as natural_module
from kad.data.datasets._cifar100 import COARSE_CLASSES, FINE_CLASSES, FINE_TO_COARSE
from kad.errors import DatasetError, KadError

# The coarse label of every fine label, as in CIFAR-100's meta file (independent check).
_OFFICIAL_COARSE_OF_FINE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6,
    13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16,
    12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]  # fmt: skip


def write_image(path: Path, value: int = 100, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size, size, 3), value, dtype=np.uint8)
    image[0, 0] = (value + 50) % 256
    assert cv2.imwrite(str(path), image)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def cifar_export(tmp_path: Path) -> Path:
    """``tmp_path/cifar10-jpeg/{train,test}/<class>/``: 3 classes, 3 train + 2 test each."""
    root = tmp_path / "cifar10-jpeg"
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("cat", "airplane", "bird")):
            for i in range(n):
                write_image(root / split / cls / f"{i:04d}.png", 20 * c + i)
    write_text(root / "train" / "bird" / "notes.txt", "not an image")
    write_text(root / "train" / "README", "about")
    return root


@pytest.fixture
def dr_dir(tmp_path: Path) -> Path:
    """Kaggle layout: 5 patients, both eyes, grades 0-4."""
    root = tmp_path / "dr"
    grades = {
        "10_left": 0, "10_right": 0, "13_left": 4, "13_right": 1, "15_left": 2,
        "15_right": 4, "16_left": 0, "16_right": 3, "20_L": 0, "20_R": 1,
    }  # fmt: skip
    lines = ["image,level"] + [f"{k},{v}" for k, v in grades.items()]
    write_text(root / "trainLabels.csv", "\n".join(lines) + "\n")
    for i, name in enumerate(grades):
        write_image(root / "images" / f"{name}.jpeg", 10 * i)
    write_text(root / "images" / "Thumbs.db", "x")
    write_image(root / "images" / "99_left.jpeg", 7)  # not in the CSV
    return root


@pytest.fixture
def rop_dir(tmp_path: Path) -> Path:
    root = tmp_path / "rop"
    rows = [
        ("a1", "Normal", "p1"), ("a2", "normal", "p1"), ("b1", "Pre-Plus", "p2"),
        ("b2", "preplus", "p2"), ("c1", "plus", "p3"), ("c2", "PRE_PLUS", "p3"),
        ("d1.png", "normal", "p4"), ("e1", "plus", "p5"),
    ]  # fmt: skip
    write_text(
        root / "labels.csv", "image,label,patient\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    )
    for i, (name, _, _) in enumerate(rows):
        folder = root if name == "e1" else root / "images"
        write_image(folder / (name if name.endswith(".png") else f"{name}.png"), 20 * i)
    return root


@pytest.fixture
def folder_dir(tmp_path: Path) -> Path:
    root = tmp_path / "screening"
    write_image(root / "normal" / "a.png", 1)
    write_image(root / "normal" / "site2" / "b.jpg", 2)
    write_image(root / "normal" / "c.png", 3)
    write_text(root / "normal" / "desc.txt", "x")
    write_image(root / "abnormal" / "d.png", 4)
    write_image(root / "abnormal" / "e.png", 5)
    return root


# -- natural images ----------------------------------------------------------------------


def test_cifar10_export(cifar_export: Path):
    for data_dir in (cifar_export, cifar_export.parent):
        ds = load_dataset("cifar10", data_dir)
        assert isinstance(ds, Dataset) and ds.name == "cifar10" and ds.kind == "natural"
        assert len(ds) == 15
        assert ds.classes == ["airplane", "bird", "cat"]  # CIFAR-10 label order
        assert ds.counts() == {"airplane": 5, "bird": 5, "cat": 5}
        assert ds.anomaly is None and ds.patient is None
        assert (ds.split == "train").sum() == 9 and (ds.split == "test").sum() == 6
        assert ds.ids[0] == "train/airplane/0000.png"
        assert ds.ids.tolist() == sorted(ds.ids.tolist(), key=lambda s: s.startswith("test"))
        skipped = dict(ds.skipped)
        notes = str(cifar_export / "train" / "bird" / "notes.txt")
        assert skipped[notes].startswith("not an image file")
        assert skipped[str(cifar_export / "train" / "README")] == "not in a class folder"
        image = ds.source.load(0)
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
        assert ds.source.describe(0).endswith("0000.png")
        assert "15 images" in ds.summary() and "skipped 2" in ds.summary()


def test_cifar10_export_errors(cifar_export: Path, tmp_path: Path):
    write_image(cifar_export / "test" / "kitten" / "0.png")
    with pytest.raises(DatasetError, match="kitten"):
        load_dataset("cifar10", cifar_export)
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(DatasetError, match="no image files in .*train"):
        load_dataset("cifar10", empty)
    only_train = tmp_path / "only"
    write_image(only_train / "train" / "cat" / "0.png")
    with pytest.raises(DatasetError, match="train/ and test/"):
        load_dataset("cifar10", only_train)


def test_cifar100_mapping_matches_official_labels():
    assert len(COARSE_CLASSES) == 20 and len(FINE_CLASSES) == 100
    assert not set(COARSE_CLASSES) & set(FINE_CLASSES)
    coarse = [COARSE_CLASSES.index(FINE_TO_COARSE[f]) for f in FINE_CLASSES]
    assert coarse == _OFFICIAL_COARSE_OF_FINE


def test_cifar100_export_fine_and_coarse_folders(tmp_path: Path):
    root = tmp_path / "c100"
    for split in ("train", "test"):
        write_image(root / split / "maple_tree" / "0.png")
        write_image(root / split / "oak_tree" / "0.png")
        write_image(root / split / "people" / "0.png")
        write_image(root / split / "whale" / "0.png")
    ds = load_dataset("cifar100", root)
    assert ds.classes == ["aquatic_mammals", "people", "trees"]
    assert ds.counts() == {"aquatic_mammals": 2, "people": 2, "trees": 4}
    write_image(root / "train" / "dragon" / "0.png")
    with pytest.raises(DatasetError, match="dragon"):
        load_dataset("cifar100", root)


def test_svhn_export_and_mat_files(tmp_path: Path):
    from scipy.io import savemat

    root = tmp_path / "svhn"
    for split in ("train", "test"):
        write_image(root / split / "0" / "a.png")
        write_image(root / split / "7" / "a.png")
    ds = load_dataset("svhn", root)
    assert ds.classes == ["0", "7"] and len(ds) == 4

    rng = np.random.default_rng(0)
    mats = tmp_path / "mats"
    mats.mkdir()
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [10], [9]][:n], dtype=np.uint8)
        savemat(mats / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "train":
            first = x[:, :, :, 0]
    ds = load_dataset("svhn", mats)
    assert len(ds) == 8 and ds.target[:5].tolist() == ["0", "1", "2", "0", "9"]
    assert ds.ids[5] == "test/00000" and ds.source.describe(5) == "test[0]"
    np.testing.assert_array_equal(ds.source.load(0), first)
    assert ds.fingerprint == load_dataset("svhn", mats).fingerprint


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_download_failure_says_what_to_do(monkeypatch, name):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(natural_module, "_keras_load_data", offline)
    monkeypatch.setattr(natural_module, "_svhn_download", offline)
    with pytest.raises(DatasetError, match="could not be downloaded") as info:
        load_dataset(name)
    assert "network is unreachable" in str(info.value) and "--data-dir" in str(info.value)


def test_digits():
    ds = load_dataset("digits")
    assert len(ds) == 1797 and ds.classes == [str(d) for d in range(10)]
    assert (ds.split == "test").sum() == 599 and (ds.split == "train").sum() == 1198
    for c in ds.classes:  # stratified: every class about 1/3 test
        share = (ds.split[ds.target == c] == "test").mean()
        assert abs(share - 1 / 3) < 0.02
    image = ds.source.load(0)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert ds.source.array.max() == 255  # 0..16 scaled to 0..255
    assert ds.anomaly is None and ds.kind == "natural"
    assert ds.fingerprint == load_dataset("digits").fingerprint
    with pytest.raises(DatasetError, match="digits"):
        load_dataset("digits", "/some/folder")


# -- diabetic retinopathy ----------------------------------------------------------------


def test_dr_defaults(dr_dir: Path):
    ds = load_dataset("dr", dr_dir)
    assert ds.kind == "fundus" and ds.split is None
    assert len(ds) == 6 and ds.classes == ["0", "4"]
    assert ds.counts() == {"0": 4, "4": 2}
    assert ds.anomaly.tolist() == [t == "4" for t in ds.target]
    assert ds.excluded == {"grade 1": 2, "grade 2": 1, "grade 3": 1}
    assert ds.ids[0] == "images/10_left.jpeg"
    patients = dict(zip(ds.ids.tolist(), ds.patient.tolist(), strict=True))
    assert patients["images/10_left.jpeg"] == patients["images/10_right.jpeg"] == "10"
    assert patients["images/20_L.jpeg"] == "20" and patients["images/15_right.jpeg"] == "15"
    skipped = dict(ds.skipped)
    assert skipped[str(dr_dir / "images" / "Thumbs.db")] .startswith("not an image file")
    assert "not listed in trainLabels.csv" in skipped[str(dr_dir / "images" / "99_left.jpeg")]
    assert "excluded grade 1: 2" in ds.summary()


def test_dr_grade_options(dr_dir: Path):
    ds = load_dataset("dr", dr_dir, anomaly_grades="3,4")
    assert ds.counts() == {"0": 4, "3": 1, "4": 2} and ds.anomaly.sum() == 3
    assert ds.excluded == {"grade 1": 2, "grade 2": 1}
    ds = load_dataset("dr", dr_dir, normal_grades=(0, 1), anomaly_grades=[2, "3", 4])
    assert len(ds) == 10 and ds.excluded == {}
    for bad in ("5", -1, "x", 4.5, None, True, ""):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            load_dataset("dr", dr_dir, anomaly_grades=bad)
    with pytest.raises(DatasetError, match="'9'"):  # also a KadError, for the CLI
        load_dataset("dr", dr_dir, anomaly_grades="9")
    with pytest.raises(ValueError, match="both"):
        load_dataset("dr", dr_dir, normal_grades="0,4")
    with pytest.raises(ValueError, match="no option.*'grades'"):
        load_dataset("dr", dr_dir, grades=4)


def test_dr_image_folder_variants(dr_dir: Path):
    (dr_dir / "images").rename(dr_dir / "train")
    assert len(load_dataset("dr", dr_dir)) == 6
    for path in (dr_dir / "train").iterdir():
        path.rename(dr_dir / path.name)
    (dr_dir / "train").rmdir()
    ds = load_dataset("dr", dr_dir)
    assert len(ds) == 6 and ds.ids[0] == "10_left.jpeg"
    assert str(dr_dir / "trainLabels.csv") not in dict(ds.skipped)


def test_dr_errors(dr_dir: Path, tmp_path: Path):
    csv = dr_dir / "trainLabels.csv"
    text = csv.read_text()
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("dr", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset("dr", csv)
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("dr")

    csv.write_text(text.replace("image,level", "image,grade"))
    with pytest.raises(DatasetError, match=r"level.*found columns: 'image', 'grade'"):
        load_dataset("dr", dr_dir)
    csv.write_text(text + "".join(f"{n}_left,0\n" for n in range(100, 107)))
    with pytest.raises(DatasetError, match=r"7 of the 17 images .* 100_left, .*104_left, \.\.\."):
        load_dataset("dr", dr_dir)
    csv.write_text(text.replace("16_left,0", "16_left,7"))
    with pytest.raises(DatasetError, match=r"line 8: level '7'.*allowed values: 0, 1, 2, 3, 4"):
        load_dataset("dr", dr_dir)
    csv.write_text(text + "10_left,0\n")
    with pytest.raises(DatasetError, match=r"twice: '10_left' \(lines 2 and 12\)"):
        load_dataset("dr", dr_dir)
    csv.write_text("image,level\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset("dr", dr_dir)
    csv.unlink()
    with pytest.raises(DatasetError, match="trainLabels.csv"):
        load_dataset("dr", dr_dir)


# -- retinopathy of prematurity ----------------------------------------------------------


def test_rop(rop_dir: Path):
    ds = load_dataset("rop", rop_dir)
    assert ds.counts() == {"normal": 3, "plus": 2} and ds.excluded == {"pre-plus": 3}
    assert ds.anomaly.tolist() == [False, False, True, False, True]
    assert ds.patient.tolist() == ["p1", "p1", "p3", "p4", "p5"]
    assert ds.ids.tolist() == [
        "images/a1.png", "images/a2.png", "images/c1.png", "images/d1.png", "e1.png"
    ]  # fmt: skip
    full = load_dataset("rop-all-grades", rop_dir)
    assert full.classes == ["normal", "pre-plus", "plus"] and full.excluded == {}
    assert full.anomaly.sum() == 5 and len(full) == 8
    assert full.fingerprint != ds.fingerprint


def test_rop_errors(rop_dir: Path):
    csv = rop_dir / "labels.csv"
    text = csv.read_text()
    csv.write_text(text.replace("c1,plus", "c1,severe"))
    with pytest.raises(DatasetError, match=r"line 6: label 'severe'.*normal, pre-plus, plus"):
        load_dataset("rop", rop_dir)
    csv.write_text(text.replace("a2,normal,p1", "a2,normal,"))
    with pytest.raises(DatasetError, match="patient column is empty on line.* 3"):
        load_dataset("rop", rop_dir)
    csv.write_text(text + "zz,normal,p9\n")
    with pytest.raises(DatasetError, match="1 of the 9 images.*zz"):
        load_dataset("rop", rop_dir)
    csv.write_text(text.replace("image,label", "file,label"))
    with pytest.raises(DatasetError, match="lacks the column.* image; found columns: 'file'"):
        load_dataset("rop", rop_dir)
    csv.rename(rop_dir / "consensus.csv")
    (rop_dir / "consensus.csv").write_text(text)
    assert len(load_dataset("rop", rop_dir)) == 5  # the only CSV is used
    write_text(rop_dir / "other.csv", "image,label\n")
    with pytest.raises(DatasetError, match="several CSV files"):
        load_dataset("rop", rop_dir)
    (rop_dir / "other.csv").unlink()
    (rop_dir / "consensus.csv").unlink()
    with pytest.raises(DatasetError, match="labels.csv"):
        load_dataset("rop", rop_dir)


# -- normal/ and abnormal/ folders -------------------------------------------------------


def test_folder(folder_dir: Path):
    ds = load_dataset("folder", folder_dir)
    assert ds.kind == "fundus" and ds.classes == ["normal", "abnormal"]
    assert ds.ids.tolist() == [
        "normal/a.png", "normal/c.png", "normal/site2/b.jpg", "abnormal/d.png", "abnormal/e.png"
    ]  # fmt: skip
    assert ds.anomaly.tolist() == [False, False, False, True, True]
    assert ds.patient is None
    assert dict(ds.skipped) == {str(folder_dir / "normal" / "desc.txt"): "not an image file (.txt)"}
    assert load_dataset("folder", folder_dir, kind="natural").kind == "natural"
    with pytest.raises(ValueError, match="'xray'"):
        load_dataset("folder", folder_dir, kind="xray")

    write_text(
        folder_dir / "patients.csv",
        "image,patient\nnormal/a.png,P1\nc,P1\nsite2/b.jpg,P2\nd.png,P3\nabnormal/e,P3\n",
    )
    ds = load_dataset("folder", folder_dir)
    assert ds.patient.tolist() == ["P1", "P1", "P2", "P3", "P3"]


def test_folder_variants_and_errors(folder_dir: Path):
    (folder_dir / "abnormal").rename(folder_dir / "anomaly")
    assert load_dataset("folder", folder_dir).anomaly.sum() == 2
    write_image(folder_dir / "abnormal" / "x.png")
    with pytest.raises(DatasetError, match="both abnormal/ and anomaly/"):
        load_dataset("folder", folder_dir)
    (folder_dir / "abnormal" / "x.png").unlink()
    (folder_dir / "abnormal").rmdir()
    for path in (folder_dir / "anomaly").iterdir():
        path.unlink()
    (folder_dir / "anomaly").rmdir()
    normal_only = load_dataset("folder", folder_dir)  # a screening set: normal images only
    assert len(normal_only) == 3 and not normal_only.anomaly.any()

    write_text(folder_dir / "patients.csv", "image,patient\na.png,P1\nc.png,P1\nzz.png,P2\n")
    with pytest.raises(DatasetError, match="zz.png"):
        load_dataset("folder", folder_dir)
    write_text(folder_dir / "patients.csv", "image,patient\na.png,P1\nc.png,P1\n")
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no row.*normal/site2/b.jpg"):
        load_dataset("folder", folder_dir)
    (folder_dir / "patients.csv").unlink()

    for path in sorted((folder_dir / "normal").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    with pytest.raises(DatasetError, match="no image files in .*normal"):
        load_dataset("folder", folder_dir)
    (folder_dir / "normal").rmdir()
    with pytest.raises(DatasetError, match="no normal/ subfolder"):
        load_dataset("folder", folder_dir)
    # images straight in the folder: a few are named, not every one
    for i in range(40):
        write_text(folder_dir / f"photo{i:02d}.jpg", "")
    with pytest.raises(DatasetError, match=r"no normal/ subfolder") as caught:
        load_dataset("folder", folder_dir)
    assert "photo39" not in str(caught.value) and f"({len(list(folder_dir.iterdir()))} in all)" \
        in str(caught.value)


# -- fingerprints, subsets, the registry -------------------------------------------------


def test_fingerprint_stable_and_sensitive(dr_dir: Path):
    first = load_dataset("dr", dr_dir).fingerprint
    assert first == load_dataset("dr", dr_dir).fingerprint
    script = ("import sys, kad.data.datasets as d; "
              "print(d.load_dataset('dr', sys.argv[1]).fingerprint)")
    other_process = subprocess.run(
        [sys.executable, "-c", script, str(dr_dir)], capture_output=True, text=True, check=True
    )
    assert other_process.stdout.strip() == first

    assert load_dataset("dr", dr_dir, anomaly_grades=(3, 4)).fingerprint != first
    csv = dr_dir / "trainLabels.csv"
    text = csv.read_text()
    csv.write_text(text.replace("10_left,0", "10_left,4"))
    assert load_dataset("dr", dr_dir).fingerprint != first
    csv.write_text(text)
    assert load_dataset("dr", dr_dir).fingerprint == first

    image = dr_dir / "images" / "10_left.jpeg"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_dataset("dr", dr_dir).fingerprint != first
    # An excluded image changing does not change the selection.
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    excluded = dr_dir / "images" / "13_right.jpeg"
    write_image(excluded, 200, size=16)
    assert load_dataset("dr", dr_dir).fingerprint == first


def test_subset(folder_dir: Path):
    ds = load_dataset("folder", folder_dir)
    by_mask = ds.subset(ds.anomaly)
    by_index = ds.subset(np.array([3, 4]))
    assert by_mask.fingerprint == by_index.fingerprint != ds.fingerprint
    assert by_mask.ids.tolist() == ["abnormal/d.png", "abnormal/e.png"]
    assert by_mask.anomaly.all() and by_mask.classes == ["abnormal"]
    assert by_mask.source.describe(0) == str(folder_dir / "abnormal" / "d.png")
    assert by_mask.kind == ds.kind and by_mask.skipped == ds.skipped
    assert ds.subset([4, 3]).fingerprint != by_index.fingerprint
    assert len(ds.subset([])) == 0

    digits = load_dataset("digits")
    part = digits.subset(np.flatnonzero(digits.split == "test")).subset([1, 0])
    rows = np.flatnonzero(digits.split == "test")[[1, 0]]
    assert part.ids.tolist() == digits.ids[rows].tolist()
    np.testing.assert_array_equal(part.source.load(0), digits.source.load(int(rows[0])))
    assert part.source.describe(0) == f"digits[{rows[0]}]"


def test_registry():
    expected = ["digits", "cifar10", "cifar100", "svhn", "dr", "rop", "rop-all-grades", "folder"]
    assert sorted(dataset_names()) == sorted(expected)
    with pytest.raises(KadError, match="unknown dataset 'cifar'.*cifar10"):
        load_dataset("cifar")


def test_load_dataset_takes_the_spec_spelling(dr_dir: Path):
    ds = load_dataset("dr:anomaly_grades=(3,4)", dr_dir)
    assert ds.options == load_dataset("dr", dr_dir, anomaly_grades=(3, 4)).options
    with pytest.raises(KadError, match="dataset 'dr' has no option 'grade'"):
        load_dataset("dr:grade=4", dr_dir)


def test_import_does_not_load_tensorflow():
    script = "import sys, kad.data.datasets; assert 'tensorflow' not in sys.modules; print('ok')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- real data (skipped when ../shared is absent) ------------------------------------------


@pytest.mark.shared
def test_real_kaggle_dr():
    ds = load_dataset("dr", need(KAGGLE_DR))
    assert len(ds) == 3046 and ds.counts() == {"0": 2912, "4": 134}
    assert ds.anomaly.sum() == 134
    assert ds.excluded == {"grade 1": 267, "grade 2": 639, "grade 3": 173}
    assert sum(ds.excluded.values()) == 1079 and ds.skipped == []
    ids = ds.ids.tolist()
    left, right = ids.index("images/10_left.jpeg"), ids.index("images/10_right.jpeg")
    assert ds.patient[left] == ds.patient[right] == "10"
    assert all(p and "_" not in p for p in ds.patient)
    assert ds.source.load(0).shape == (256, 256, 3)


@pytest.mark.shared
def test_real_cifar10_tar_subset(tmp_path: Path):
    tar_path = need(CIFAR10_TAR)
    wanted = {(s, c): 0 for s in ("train", "test") for c in ("bird", "frog")}
    members = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = member.name.split("/")
            key = tuple(parts[1:3])
            if member.isfile() and key in wanted and wanted[key] < 10:
                wanted[key] += 1
                members.append(member)
            if all(n == 10 for n in wanted.values()):
                break
        tar.extractall(tmp_path, members=members, filter="data")
    ds = load_dataset("cifar10", tmp_path)
    assert len(ds) == 40 and ds.classes == ["bird", "frog"]
    assert ((ds.split == "train") & (ds.target == "frog")).sum() == 10
    image = ds.source.load(0)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


# -- every input accounted for -------------------------------------------------------------


def test_a_broken_symlink_in_a_folder_is_a_named_skip(folder_dir: Path):
    (folder_dir / "normal" / "gone.png").symlink_to(folder_dir / "nowhere.png")
    (folder_dir / "normal" / "scan.heic").write_bytes(bytes(64))
    ds = load_dataset("folder:kind=natural", folder_dir)
    skipped = dict(ds.skipped)
    assert "broken symbolic link" in skipped[str(folder_dir / "normal" / "gone.png")]
    assert "unsupported image format .heic" in skipped[str(folder_dir / "normal" / "scan.heic")]
    assert len(ds) == 5
    summary = ds.summary()
    assert "gone.png" in summary and "skipped 3 file(s)" in summary and ".skipped" not in summary


def test_a_broken_symlink_listed_in_a_csv_never_stops_loading(dr_dir: Path):
    image = dr_dir / "images" / "10_left.jpeg"
    image.unlink()
    image.symlink_to(dr_dir / "elsewhere.jpeg")
    ds = load_dataset("dr", dr_dir)
    row = ds.ids.tolist().index("images/10_left.jpeg")
    assert ds.fingerprint
    with pytest.raises(KadError, match="10_left.jpeg.*broken symbolic link"):
        ds.source.load(row)


def test_a_labels_csv_with_a_byte_order_mark_is_read(tmp_path: Path):
    from kad.screening.workflow import read_labels

    path = tmp_path / "labels.csv"
    path.write_bytes("image,label\r\na.png,normal\r\nb.png,abnormal\r\n".encode("utf-8-sig"))
    assert read_labels(path) == {"a.png": 0, "b.png": 1}
