"""Retinal fundus datasets, where normal and anomaly are defined by grades or folders.

* ``dr``: the Kaggle Diabetic Retinopathy layout, ``trainLabels.csv`` (``image,level``)
  and an image folder; grade 0 is normal and grade 4 an anomaly unless told otherwise.
* ``rop`` / ``rop-all-grades``: a labels CSV (``image,label[,patient]``) with labels
  normal, pre-plus and plus; ``rop`` leaves pre-plus out, ``rop-all-grades`` counts it as
  an anomaly.
* ``folder``: ``normal/`` and ``abnormal/`` subfolders, optionally ``patients.csv``.

Only file names and sizes are looked at here (and the PatientID in DICOM headers); images
are decoded later.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from kad.data.datasets.base import (
    Dataset,
    DatasetOptionError,
    FileSource,
    check_data_dir,
    first_few,
    list_image_files,
    read_table,
    relative_ids,
    skip_reason,
)
from kad.errors import DatasetError

__all__ = ["DR_GRADES", "ROP_LABELS", "load_dr", "load_folder", "load_rop", "load_rop_all_grades"]

DR_GRADES: tuple[str, ...] = ("0", "1", "2", "3", "4")
ROP_LABELS: tuple[str, ...] = ("normal", "pre-plus", "plus")
_ROP_SPELLINGS = {"normal": "normal", "preplus": "pre-plus", "plus": "plus"}
_EYE_SUFFIX = re.compile(r"_(left|right|l|r)$", re.IGNORECASE)
_ABNORMAL_FOLDERS = ("abnormal", "anomaly", "anomalous")


def patient_from_name(name: str) -> str:
    """The patient part of an eye image name: ``"10_left"`` -> ``"10"``."""
    return _EYE_SUFFIX.sub("", name)


# -- CSV files ---------------------------------------------------------------------------


def _check_unique(path: Path, rows: list[tuple[int, dict[str, str]]]) -> None:
    seen: dict[str, int] = {}
    duplicates = []
    for line, values in rows:
        name = values["image"]
        if name in seen:
            duplicates.append(f"{name!r} (lines {seen[name]} and {line})")
        seen.setdefault(name, line)
    if duplicates:
        raise DatasetError(
            f"labels file {path} lists {len(duplicates)} image(s) twice: {first_few(duplicates)}; "
            "keep one row per image"
        )


def _find_csv(folder: Path, preferred: str, columns: str) -> Path:
    """``folder/preferred``, or else the only ``*.csv`` in ``folder``."""
    if (folder / preferred).is_file():
        return folder / preferred
    found = sorted(p for p in folder.glob("*.csv") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(
            f"no labels file in {folder}: expected {preferred} with columns {columns}"
        )
    raise DatasetError(
        f"{folder} holds several CSV files ({first_few(p.name for p in found)}) and no "
        f"{preferred}; name the labels file {preferred}"
    )


# -- finding the files a CSV names -------------------------------------------------------


class _Finder:
    """Resolves image names from a CSV to files, with or without their extension, by
    listing each folder once. Remembers which files were used, to report the others."""

    def __init__(self) -> None:
        self._listings: dict[Path, tuple[set[str], dict[str, list[str]]]] = {}
        self.used: set[Path] = set()

    def _listing(self, folder: Path) -> tuple[set[str], dict[str, list[str]]]:
        if folder not in self._listings:
            from kad.data.images import is_image_file

            names: set[str] = set()
            stems: dict[str, list[str]] = {}
            if folder.is_dir():
                with os.scandir(folder) as entries:
                    for entry in entries:
                        # A broken link is listed too: it is reported when it is read,
                        # like any unreadable image, and never stops the run.
                        if entry.is_file() or (entry.is_symlink() and not entry.is_dir()):
                            names.add(entry.name)
                            if is_image_file(entry.name):
                                stems.setdefault(Path(entry.name).stem, []).append(entry.name)
            self._listings[folder] = (names, stems)
        return self._listings[folder]

    def find(self, folder: Path, name: str) -> Path | None:
        relative = PurePosixPath(name.replace("\\", "/"))
        parent = folder.joinpath(*relative.parent.parts)
        names, stems = self._listing(parent)
        if relative.name in names:
            found = parent / relative.name
        else:
            candidates = sorted(stems.get(relative.name, []))
            if len(candidates) > 1:
                raise DatasetError(
                    f"image {name!r} is ambiguous in {parent}: {', '.join(candidates)}; "
                    "give the file name with its extension in the labels file"
                )
            if not candidates:
                return None
            found = parent / candidates[0]
        self.used.add(found)
        return found

    def unused(self, reason: str, ignore: set[Path]) -> list[tuple[str, str]]:
        """Files in the folders that provided images but were not used."""
        folders = {p.parent for p in self.used}
        skipped = []
        for folder in sorted(folders):
            for name in sorted(self._listings[folder][0]):
                path = folder / name
                if path in self.used or path in ignore:
                    continue
                skipped.append((str(path), skip_reason(path) or reason))
        return skipped


def _resolve(
    csv_path: Path, rows: list[tuple[int, dict[str, str]]], folders: list[Path]
) -> tuple[list[Path], list[tuple[str, str]]]:
    """The file of every row, looked up in ``folders`` in turn; missing files are an error."""
    finder = _Finder()
    paths: list[Path] = []
    missing: list[str] = []
    for _, values in rows:
        found = None
        for folder in folders:
            found = finder.find(folder, values["image"])
            if found is not None:
                break
        if found is None:
            missing.append(values["image"])
        else:
            paths.append(found)
    if missing:
        where = " or ".join(str(f) for f in folders)
        raise DatasetError(
            f"{len(missing)} of the {len(rows)} images listed in {csv_path} do not exist in "
            f"{where}: {first_few(missing)}; check --data-dir, or remove those rows"
        )
    repeated = [str(p) for p, k in Counter(paths).items() if k > 1]
    if repeated:
        raise DatasetError(
            f"labels file {csv_path} names the same file on several rows: {first_few(repeated)}"
        )
    return paths, finder.unused(f"not listed in {csv_path.name}", {csv_path})


# -- diabetic retinopathy ----------------------------------------------------------------


def _parse_grades(value: Any, option: str) -> tuple[int, ...]:
    """``4``, ``(3, 4)``, ``"3,4"`` -> sorted tuple of DR grades; ValueError otherwise."""
    if isinstance(value, str):
        items: list[Any] = [t for t in re.split(r"[\s,;+()\[\]]+", value) if t]
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, (tuple, list, set, frozenset, np.ndarray)):
        items = list(value)
    else:
        items = [None]
    grades = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit() or int(text) > 4:
            raise DatasetOptionError(
                f"{option} must be DR grades 0-4 as an int, a tuple or a string like '3,4'; "
                f"got {value!r}"
            )
        grades.append(int(text))
    if not grades:
        raise DatasetOptionError(f"{option} must name at least one DR grade (0-4); got {value!r}")
    return tuple(sorted(set(grades)))


def load_dr(
    data_dir: str | os.PathLike | None = None,
    normal_grades: Any = (0,),
    anomaly_grades: Any = (4,),
) -> Dataset:
    """Kaggle Diabetic Retinopathy: ``trainLabels.csv`` (``image,level``) next to an image
    folder (``images/``, ``train/`` or ``data_dir`` itself). Grades in neither
    ``normal_grades`` nor ``anomaly_grades`` are left out and counted in ``excluded``.
    Patient ids are the image names without their ``_left``/``_right`` suffix."""
    normal = _parse_grades(normal_grades, "normal_grades")
    anomalous = _parse_grades(anomaly_grades, "anomaly_grades")
    both = sorted(set(normal) & set(anomalous))
    if both:
        raise DatasetOptionError(
            f"grade(s) {both} are in both normal_grades={normal} and anomaly_grades={anomalous}"
        )
    root = check_data_dir(
        data_dir, "dr", "the Kaggle DR folder (trainLabels.csv and images/ or train/)"
    )
    csv_path = _find_csv(root, "trainLabels.csv", "image,level")
    rows = read_table(csv_path, ("image", "level"))
    _check_unique(csv_path, rows)
    grades = []
    for line, values in rows:
        level = values["level"]
        if level not in DR_GRADES:
            raise DatasetError(
                f"{csv_path}, line {line}: level {level!r} is not a DR grade; "
                f"allowed values: {', '.join(DR_GRADES)}"
            )
        grades.append(int(level))
    folders = [d for d in (root / "images", root / "train") if d.is_dir()][:1] or [root]
    paths, skipped = _resolve(csv_path, rows, folders)

    keep = [i for i, g in enumerate(grades) if g in normal or g in anomalous]
    counts = Counter(g for g in grades if g not in normal and g not in anomalous)
    if not keep:
        raise DatasetError(
            f"no image in {csv_path} has a grade in normal_grades={normal} or "
            f"anomaly_grades={anomalous} (grades found: {sorted(set(grades))})"
        )
    kept = [paths[i] for i in keep]
    return Dataset(
        name="dr",
        source=FileSource(kept),
        ids=relative_ids(kept, root),
        target=[str(grades[i]) for i in keep],
        anomaly=[grades[i] in anomalous for i in keep],
        patient=[patient_from_name(p.stem) for p in kept],
        kind="fundus",
        skipped=skipped,
        excluded={f"grade {g}": counts[g] for g in sorted(counts)},
        class_order=DR_GRADES,
        options={"normal_grades": list(normal), "anomaly_grades": list(anomalous)},
    )


# -- retinopathy of prematurity ----------------------------------------------------------


def _load_rop(data_dir: Any, name: str, all_grades: bool) -> Dataset:
    root = check_data_dir(data_dir, name, "a folder with labels.csv (image,label[,patient])")
    csv_path = _find_csv(root, "labels.csv", "image,label[,patient]")
    rows = read_table(csv_path, ("image", "label"), ("patient",))
    _check_unique(csv_path, rows)
    labels = []
    for line, values in rows:
        label = _ROP_SPELLINGS.get(re.sub(r"[\s_-]+", "", values["label"].lower()))
        if label is None:
            raise DatasetError(
                f"{csv_path}, line {line}: label {values['label']!r} is not an ROP grade; "
                f"allowed values: {', '.join(ROP_LABELS)}"
            )
        labels.append(label)
    has_patient = "patient" in rows[0][1]
    if has_patient:
        blank = [str(line) for line, values in rows if not values["patient"]]
        if blank:
            raise DatasetError(
                f"{csv_path}: the patient column is empty on line(s) {first_few(blank)}; fill "
                "it in, or drop the column if patients are unknown"
            )
    base = csv_path.parent
    paths, skipped = _resolve(csv_path, rows, [base, base / "images"])
    anomalous = {"plus", "pre-plus"} if all_grades else {"plus"}
    keep = [i for i, label in enumerate(labels) if all_grades or label != "pre-plus"]
    n_excluded = len(labels) - len(keep)
    kept = [paths[i] for i in keep]
    return Dataset(
        name=name,
        source=FileSource(kept),
        ids=relative_ids(kept, root),
        target=[labels[i] for i in keep],
        anomaly=[labels[i] in anomalous for i in keep],
        patient=[rows[i][1]["patient"] for i in keep] if has_patient else None,
        kind="fundus",
        skipped=skipped,
        excluded={"pre-plus": n_excluded} if n_excluded else {},
        class_order=ROP_LABELS,
        options={"anomaly": sorted(anomalous)},
    )


def load_rop(data_dir: str | os.PathLike | None = None) -> Dataset:
    """ROP, normal vs plus; pre-plus images are left out (counted in ``excluded``)."""
    return _load_rop(data_dir, "rop", all_grades=False)


def load_rop_all_grades(data_dir: str | os.PathLike | None = None) -> Dataset:
    """ROP, normal vs pre-plus and plus."""
    return _load_rop(data_dir, "rop-all-grades", all_grades=True)


# -- normal/ and abnormal/ folders -------------------------------------------------------


def _patients(csv_path: Path, ids: list[str], class_dirs: dict[str, str]) -> list[str]:
    """Patient of every image from ``patients.csv``; its ``image`` column may give the path
    relative to the data folder or to the class folder, with or without extension."""
    keys: dict[str, set[int]] = {}
    for i, rel in enumerate(ids):
        path = PurePosixPath(rel)
        inner = PurePosixPath(*path.parts[1:])
        for key in {rel, str(path.with_suffix("")), str(inner), str(inner.with_suffix(""))}:
            keys.setdefault(key, set()).add(i)
    rows = read_table(csv_path, ("image", "patient"))
    _check_unique(csv_path, rows)
    patient: list[str | None] = [None] * len(ids)
    missing = []
    for line, values in rows:
        matches = keys.get(values["image"].replace("\\", "/"), set())
        if len(matches) > 1:
            raise DatasetError(
                f"{csv_path}, line {line}: image {values['image']!r} matches several files "
                f"({first_few(sorted(ids[i] for i in matches))}); give its path, e.g. "
                f"{ids[min(matches)]}"
            )
        if not matches:
            missing.append(values["image"])
            continue
        (i,) = matches
        if patient[i] is not None:
            raise DatasetError(f"{csv_path}, line {line}: image {ids[i]} is listed twice")
        patient[i] = values["patient"]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) listed in {csv_path} do not exist under "
            f"{', '.join(class_dirs.values())}: {first_few(missing)}"
        )
    unassigned = [ids[i] for i, p in enumerate(patient) if p is None]
    if unassigned:
        raise DatasetError(
            f"{len(unassigned)} image(s) have no row in {csv_path}: {first_few(unassigned)}; "
            "give every image a patient, or remove patients.csv"
        )
    return [p for p in patient if p is not None]


def patients_from_names(ids, pattern: str) -> list[str]:
    """The patient of every image from its file name: the first capture group of the
    regular expression ``pattern`` (searched in the name, e.g. ``^(\\d+)_`` for the digits
    before the first underscore), or its whole match when it has no group. A name it does
    not match is an error naming a few of them."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise DatasetOptionError(f"--patient-pattern {pattern!r} is not a valid regular "
                                 f"expression: {exc}") from exc
    patients, unmatched = [], []
    for ident in ids:
        name = PurePosixPath(str(ident)).name
        found = regex.search(name)
        value = (found.group(1) if regex.groups else found.group(0)) if found else None
        if not value:
            unmatched.append(name)
        patients.append(value)
    if unmatched:
        raise DatasetError(f"--patient-pattern {pattern!r} finds no patient id in "
                           f"{len(unmatched)} file name(s): {first_few(unmatched)}")
    return patients


def dicom_patients(paths: list[Path], ids: list[str]) -> list[str] | None:
    """The patient of every image from the PatientID of its DICOM header, or None when no
    image is a DICOM file with a PatientID. An image without one (not DICOM, or a blank
    PatientID) is a patient of its own, named by its id (as when no image has one)."""
    from kad.data.dicom import is_dicom, patient_id

    found = [patient_id(path) if is_dicom(path) else None for path in paths]
    if not any(found):
        return None
    return [value or ident for value, ident in zip(found, ids, strict=True)]


def load_folder(data_dir: str | os.PathLike | None = None, kind: str = "fundus",
                patient_pattern: str | None = None) -> Dataset:
    """Images in ``normal/`` and ``abnormal/`` (or ``anomaly/``, ``anomalous/``), searched
    recursively; ``abnormal/`` may be absent (a normal-only set to fit a screening model).
    An optional ``patients.csv`` (``image,patient``) gives patient ids, or
    ``patient_pattern`` derives them from the file names (:func:`patients_from_names`);
    without either, DICOM files give theirs from their PatientID (:func:`dicom_patients`)."""
    if kind not in ("fundus", "natural"):
        raise DatasetOptionError(f"folder dataset kind must be 'fundus' or 'natural', got {kind!r}")
    root = check_data_dir(data_dir, "folder", "a folder with normal/ and abnormal/ subfolders")
    subdirs = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}
    if "normal" not in subdirs:
        found = first_few(sorted(p.name for p in root.iterdir())) or "nothing"
        raise DatasetError(
            f"{root} has no normal/ subfolder (found: {found}); put normal images in "
            "normal/ and anomalies in abnormal/"
        )
    abnormal = [subdirs[n] for n in _ABNORMAL_FOLDERS if n in subdirs]
    if len(abnormal) > 1:
        raise DatasetError(
            f"{root} has both {abnormal[0].name}/ and {abnormal[1].name}/; keep one folder "
            "of anomalies"
        )
    class_dirs = {"normal": subdirs["normal"]} | ({"abnormal": abnormal[0]} if abnormal else {})
    paths: list[Path] = []
    targets: list[str] = []
    skipped: list[tuple[str, str]] = []
    for target, folder in class_dirs.items():
        images, others = list_image_files(folder)
        if target == "normal" and not images:
            raise DatasetError(f"no image files in {folder}; the normal/ folder must not be empty")
        paths += images
        targets += [target] * len(images)
        skipped += others
    used = {p.resolve() for p in class_dirs.values()}
    for entry in sorted(root.iterdir()):
        if entry.name.lower() == "patients.csv" or entry.resolve() in used:
            continue
        reason = "not a normal/ or abnormal/ folder" if entry.is_dir() else "not in a class folder"
        skipped.append((str(entry), reason))
    ids = relative_ids(paths, root)
    patients_csv = next((p for p in root.iterdir() if p.name.lower() == "patients.csv"), None)
    if patients_csv and patient_pattern:
        raise DatasetOptionError(f"{root} has a patients.csv and --patient-pattern was given: "
                                 "give the patients one way")
    names = {t: f"{d.name}/" for t, d in class_dirs.items()}
    return Dataset(
        name="folder",
        source=FileSource(paths),
        ids=ids,
        target=targets,
        anomaly=[t == "abnormal" for t in targets],
        patient=(patients_from_names(ids, patient_pattern) if patient_pattern
                 else _patients(patients_csv, ids, names) if patients_csv
                 else dicom_patients(paths, ids)),
        kind=kind,
        skipped=skipped,
        class_order=("normal", "abnormal"),
        options={"kind": kind},
    )
