"""int8 against float32: speed of the network and AUROC of the default detector.

For each case the script builds one folder dataset (symbolic links in a temporary folder,
never in the repository), fits kad's default pipeline (kNN on every block concatenated,
:func:`kad.screening.fitting.fit_pipeline`) on the training normals twice, in float32 and
with ``precision="int8"`` (NNCF, calibrated on at most 300 of those training normals), and
scores the held-out test images with each. It prints:

``img/s`` and ``CPU ms/img``
    bare inference of the extractor (every block, pooled) on OpenVINO, the compiled model
    on arrays made in advance, float32 and int8 interleaved ``--repeat`` times in this
    process: images per second from the median wall time, and the median CPU time of the
    process (every thread) per image, which holds on a shared machine where wall time
    does not.
``speed-up``
    float32's median wall time over int8's (and, in brackets, the same for CPU time).
``AUROC``
    on the test images, with the Hanley-McNeil 95% interval, and the change int8 makes,
    with a 95% interval from a paired, stratified bootstrap of the test images (the same
    resampled images for both).

Cases (``--cases``):

``fundus``
    ``../shared/data/kaggle-dr-256``: grade 0 normal, grades 3-4 abnormal; patients are
    split in two at random (``--seed``): ``--train`` grade-0 photographs of patients
    without a grade 3-4 eye fit, and the other patients' photographs (``--test`` normals
    at most, every grade 3-4 one) are scored. MobileNetV2-0.35 with ImageNet weights
    (``../shared/weights``), 448 px, fundus preprocessing: kad's defaults for fundus
    photographs.
``cifar``
    CIFAR-10 one class (``--cifar-class``, default airplane) normal, the rest abnormal:
    ``--train`` training images of the class fit; ``--test`` test images of the class and
    as many of the other nine classes are scored. The same network at 224 px (kad's
    default for 32 px images), from ``../shared/data/cifar10-jpeg.tar``.
``irv2``
    InceptionResNetV2 at 299 px with random weights (the same compute as ImageNet's),
    speed only, calibrated on 32 CIFAR-10 images.

Run from the repository root (``pip install -e ".[tf,int8]"``)::

    python benchmarks/int8.py
    python benchmarks/int8.py --cases fundus --train 400 --test 300 --repeat 7
    python benchmarks/int8.py --smoke   # a few synthetic images, seconds: not a result
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KAD_SHARED", ROOT.parent / "shared"))
MNV2 = "mobilenet_v2:alpha=0.35"
MNV2_WEIGHTS = (SHARED / "weights"
                / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
KAGGLE = SHARED / "data" / "kaggle-dr-256"
CIFAR_TAR = SHARED / "data" / "cifar10-jpeg.tar"


# ---------------------------------------------------------------------- the datasets


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())


def fundus_folder(root: Path, n_train: int, n_test: int, seed: int) -> dict:
    """Grade-0 training photographs of half the patients (none with a grade 3-4 eye), and
    the other half's grade-0 (at most ``n_test``) and grade 3-4 photographs."""
    with open(KAGGLE / "trainLabels.csv", newline="") as fh:
        grade = {r["image"]: int(r["level"]) for r in csv.DictReader(fh)}
    images = {p.stem: p for p in (KAGGLE / "images").glob("*.jpeg")}
    grade = {k: g for k, g in grade.items() if k in images and g in (0, 3, 4)}
    patient = {k: k.rsplit("_", 1)[0] for k in grade}
    sick = {patient[k] for k, g in grade.items() if g >= 3}
    patients = sorted(set(patient.values()))
    rng = np.random.default_rng(seed)
    test_patients = set(rng.permutation(patients)[: len(patients) // 2].tolist())
    train = sorted(k for k, g in grade.items() if g == 0 and patient[k] not in test_patients
                   and patient[k] not in sick)
    test_normal = sorted(k for k, g in grade.items() if g == 0 and patient[k] in test_patients)
    test_sick = sorted(k for k, g in grade.items() if g >= 3 and patient[k] in test_patients)
    train = [train[i] for i in sorted(rng.permutation(len(train))[:n_train])]
    test_normal = [test_normal[i] for i in sorted(rng.permutation(len(test_normal))[:n_test])]
    rows = ["image,patient"]
    for part, keys in (("train", train), ("test", test_normal)):
        for k in keys:
            _link(images[k], root / "normal" / f"{part}_{k}.jpeg")
            rows.append(f"normal/{part}_{k}.jpeg,{patient[k]}")
    for k in test_sick:
        _link(images[k], root / "abnormal" / f"test_{k}.jpeg")
        rows.append(f"abnormal/test_{k}.jpeg,{patient[k]}")
    (root / "patients.csv").write_text("\n".join(rows) + "\n")
    return {"train": len(train), "test normal": len(test_normal), "test abnormal": len(test_sick),
            "patients": f"{len(patients) - len(test_patients)} + {len(test_patients)}"}


def cifar_folder(root: Path, normal_class: str, n_train: int, n_test: int, seed: int) -> dict:
    """``n_train`` training images of ``normal_class``; ``n_test`` of its test images and
    ``n_test`` test images of the nine other classes (drawn evenly at random)."""
    rng = np.random.default_rng(seed)
    with tarfile.open(CIFAR_TAR) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by = {}
        for m in members:
            parts = Path(m.name).parts  # cifar10-jpeg/<split>/<class>/<n>.jpg
            by.setdefault((parts[-3], parts[-2]), []).append(m)
        others = sorted({c for _, c in by} - {normal_class})
        if normal_class not in {c for _, c in by}:
            raise SystemExit(f"no class {normal_class!r} in {CIFAR_TAR}")
        chosen = {
            "normal/train": _pick(by[("train", normal_class)], n_train, rng),
            "normal/test": _pick(by[("test", normal_class)], n_test, rng),
            "abnormal/test": [m for c in others
                              for m in _pick(by[("test", c)], -(-n_test // len(others)), rng)
                              ][:n_test],
        }
        for part, found in chosen.items():
            folder = root / part.split("/")[0]
            folder.mkdir(parents=True, exist_ok=True)
            for m in found:
                name = f"{part.split('/')[1]}_{Path(m.name).parts[-2]}_{Path(m.name).name}"
                (folder / name).write_bytes(tar.extractfile(m).read())
    return {"train": len(chosen["normal/train"]), "test normal": len(chosen["normal/test"]),
            "test abnormal": len(chosen["abnormal/test"])}


def _pick(items: list, n: int, rng) -> list:
    items = sorted(items, key=lambda m: m.name)
    return [items[i] for i in sorted(rng.permutation(len(items))[:n])]


def synthetic_folder(root: Path, n: int) -> dict:
    """Smoke mode: flat-ish textured images, a few with a bright spot (seconds)."""
    import cv2

    rng = np.random.default_rng(0)
    counts = {"train": n, "test normal": n // 2, "test abnormal": n // 2}
    for part, folder, k in (("train", "normal", n), ("test", "normal", n // 2),
                            ("test", "abnormal", n // 2)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(k):
            image = rng.integers(60, 120, (40, 40, 3), dtype=np.uint8)
            if folder == "abnormal":
                cv2.circle(image, (20, 20), 8, (250, 250, 250), -1)
            cv2.imwrite(str(root / folder / f"{part}_{i:03d}.png"), image)
    return counts


# ---------------------------------------------------------------------- measuring


def time_inference(engines: dict, batch: np.ndarray, repeat: int) -> dict:
    """Median wall and CPU seconds of ``engine.predict(batch)`` for each engine,
    interleaved ``repeat`` times after one warm-up run each."""
    for engine in engines.values():
        engine.predict(batch)
    wall = {k: [] for k in engines}
    cpu = {k: [] for k in engines}
    for _ in range(repeat):
        for name, engine in engines.items():
            w, c = time.perf_counter(), time.process_time()
            engine.predict(batch)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in engines}


def auroc_change(labels: np.ndarray, a: np.ndarray, b: np.ndarray, seed: int = 0,
                 n_boot: int = 1000) -> tuple[float, float, float]:
    """AUROC(b) - AUROC(a) and its 95% interval from a paired, stratified bootstrap."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    diffs = []
    for _ in range(n_boot):
        rows = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        diffs.append(roc_auc_score(labels[rows], b[rows]) - roc_auc_score(labels[rows], a[rows]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(roc_auc_score(labels, b) - roc_auc_score(labels, a)), float(low), float(high)


def measure_case(name: str, folder: Path, kind: str, backbone: str, weights: str,
                 size: int, batch: int, repeat: int, cache: Path, auroc: bool,
                 n_boot: int = 1000) -> dict:
    from sklearn.metrics import roc_auc_score

    from kad.data.datasets import load_dataset
    from kad.features.extract import extract_features, plan_extraction
    from kad.features.extraction import _load_batch, plan_quantization
    from kad.features.runtime import build_runtime
    from kad.screening.calibration import auroc_interval
    from kad.screening.fitting import fit_pipeline

    dataset = load_dataset("folder", folder, kind=kind)
    ids = np.asarray(dataset.ids, dtype=str)
    train = np.flatnonzero(np.char.find(ids, "/train_") >= 0)
    test = np.flatnonzero(np.char.find(ids, "/test_") >= 0)
    labels = np.asarray(dataset.anomaly, dtype=int)[test]
    settings = {"backbone": backbone, "weights": weights, "image_size": size,
                "batch_size": batch, "cache_dir": cache}
    result = {"case": name, "size": size, "backbone": backbone}
    started = time.perf_counter()
    float_pipe = fit_pipeline(dataset, train_rows=train, runtime="openvino", **settings)
    result["float fit s"] = time.perf_counter() - started
    started = time.perf_counter()
    int8_pipe = fit_pipeline(dataset, train_rows=train, precision="int8", **settings)
    result["int8 fit s"] = time.perf_counter() - started  # calibration and quantization
    result["calibration images"] = int8_pipe.quantization["images"]
    plan = plan_extraction(dataset, backbone, weights, size, cache_dir=cache,
                           runtime="openvino")
    quantization = plan_quantization(dataset, train, plan)
    engines = {
        "float32": build_runtime(plan.backbone, size, weights, "openvino", batch, cache),
        "int8": build_runtime(plan.backbone, size, weights, "openvino", batch, cache,
                              quantization=quantization),
    }
    images = _load_batch(dataset.source, ids, plan, 0, min(batch, len(dataset)))[1]
    images = np.resize(images, (batch, *images.shape[1:]))  # a full batch of real inputs
    for key, (wall, cpu) in time_inference(engines, images, repeat).items():
        result[f"{key} img/s"] = batch / wall
        result[f"{key} cpu ms"] = 1000 * cpu / batch
    if auroc:
        scores, features = {}, {}
        for key, pipe, q in (("float32", float_pipe, None), ("int8", int8_pipe, quantization)):
            features[key] = extract_features(
                dataset, batch_size=batch, runtime="openvino", quantization=q,
                **{k: v for k, v in settings.items() if k != "batch_size"})
            scores[key] = pipe.detector.anomaly_score(
                pipe.representation.cached(features[key], test))
            value = float(roc_auc_score(labels, scores[key]))
            result[f"{key} auroc"] = (value, *auroc_interval(value, int(labels.sum()),
                                                             int((labels == 0).sum())))
        errors = [np.linalg.norm(features["int8"].matrix(b)[test]
                                 - features["float32"].matrix(b)[test])
                  / np.linalg.norm(features["float32"].matrix(b)[test])
                  for b in features["float32"].blocks]
        result["feature error"] = (float(min(errors)), float(np.median(errors)),
                                   float(max(errors)))
        result["auroc change"] = auroc_change(labels, scores["float32"], scores["int8"],
                                              n_boot=n_boot)
    return result


def _row(r: dict) -> str:
    speed = r["int8 img/s"] / r["float32 img/s"]
    cpu = r["float32 cpu ms"] / r["int8 cpu ms"]
    line = (f"{r['case']:<8} {r['size']:>4} {r['float32 img/s']:>9.1f} {r['int8 img/s']:>9.1f} "
            f"{speed:>5.2f}x ({cpu:.2f}x) {r['float32 cpu ms']:>9.2f} {r['int8 cpu ms']:>9.2f}")
    if "auroc change" in r:
        f, i, d = r["float32 auroc"], r["int8 auroc"], r["auroc change"]
        line += (f"  {f[0]:.3f} [{f[1]:.3f}, {f[2]:.3f}]  {i[0]:.3f} [{i[1]:.3f}, {i[2]:.3f}]"
                 f"  {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="fundus,cifar")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--cifar-class", default="airplane")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="resamples of the paired bootstrap of the AUROC change")
    parser.add_argument("--smoke", action="store_true",
                        help="a few synthetic images, seconds: not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.train, args.repeat, args.bootstrap = "smoke", 6, 1, 20
    print(f"int8 against float32 on OpenVINO ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start); bare inference of every block, interleaved "
          f"{args.repeat} times, medians", flush=True)
    results, described = [], []
    with tempfile.TemporaryDirectory(prefix="kad-int8-") as work:
        work = Path(work)
        for case in args.cases.split(","):
            folder = work / case
            if case == "fundus":
                counts = fundus_folder(folder, args.train, args.test, args.seed)
                spec = ("fundus", MNV2, str(MNV2_WEIGHTS), 448, 32, True)
            elif case == "cifar":
                counts = cifar_folder(folder, args.cifar_class, args.train, args.test,
                                      args.seed)
                spec = ("natural", MNV2, str(MNV2_WEIGHTS), 224, 64, True)
            elif case == "irv2":
                counts = cifar_folder(folder, args.cifar_class, 32, 8, args.seed)
                spec = ("natural", "inception_resnet_v2", "none", 299, 32, False)
            elif case == "smoke":
                counts = synthetic_folder(folder, args.train)
                spec = ("natural", MNV2, "none", 32, 8, True)
            else:
                raise SystemExit(f"unknown case {case!r}: fundus, cifar, irv2 or smoke")
            kind, backbone, weights, size, batch, auroc = spec
            described.append(f"{case}: {backbone} ({'ImageNet' if weights != 'none' else 'random'}"
                             f" weights) at {size} px, batch {batch}; "
                             + ", ".join(f"{k} {v}" for k, v in counts.items()))
            print(described[-1], flush=True)
            result = measure_case(case, folder, kind, backbone, weights, size, batch,
                                  args.repeat, work / "cache", auroc, args.bootstrap)
            print(f"  fit: float32 {result['float fit s']:.0f} s, int8 "
                  f"{result['int8 fit s']:.0f} s (calibration on "
                  f"{result['calibration images']} training images and quantization "
                  f"included)", flush=True)
            if "feature error" in result:
                low, mid, high = result["feature error"]
                print(f"  int8 features against float32 on the test images, relative error "
                      f"per block: {low:.3f} to {high:.3f} (median {mid:.3f})", flush=True)
            results.append(result)
    print()
    print(f"{'case':<8} {'px':>4} {'f32 img/s':>9} {'int8 img/s':>9} speed-up (CPU) "
          f"{'f32 CPU ms':>9} {'int8 CPU ms':>9}  AUROC float32 [95%]   AUROC int8 [95%]"
          "      change [95% paired bootstrap]")
    for r in results:
        print(_row(r))
    print("measured on: " + "; ".join(described))
    print("command: python benchmarks/int8.py " + " ".join(argv if argv is not None else []))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
