"""Operating points on new patients: what kad fit reports against what happens.

On Kaggle DR fundus images (grade 0 normal, grade 4 abnormal, patient = the number before
``_left``/``_right``), a share of the patients is kept fully outside fitting. The rest form
a folder dataset (``normal/``, ``abnormal/`` and ``patients.csv``, as symbolic links in a
work folder, never in the repository) that is fitted the way ``kad fit`` does, with
:func:`kad.calibration.plan_fit_split` and :func:`kad.pipeline.fit_pipeline`:

``fpr``
    the block picked on the selection part, the threshold set by split-conformal
    calibration at ``--fpr`` on the calibration normals; printed: the threshold, its
    guarantee, and the false-positive rate observed on the outside normals.
``sensitivity``
    the same block, the threshold set at ``--sensitivity`` on the selection part (as ``kad
    fit`` did before: block picking and threshold from one set of images). Printed side by
    side: the figures at fitting (in-sample), the held-out assessment that ``kad fit`` now
    reports, and what is observed on the outside patients.

Each of ``--seeds`` redraws the split inside the fitting patients; the outside patients
stay the same. Every rate carries a Wilson 95% interval and its counts.

Run from the repository root (CPU is enough; about two minutes on two cores)::

    python benchmarks/calibration_dr.py --seeds 5 --json calibration.json

(``--data-dir`` and ``--weights`` default to Kaggle DR and the MobileNetV2-0.35 ImageNet
weights under ``../shared``.)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build_folders(data_dir: Path, work: Path, n_healthy: int, outside: float, seed: int):
    """``work/fit`` and ``work/outside`` folder datasets of grade-0 and grade-4 images,
    patients never in both; returns the counts."""
    grades = {}
    with open(data_dir / "trainLabels.csv") as fh:
        for row in csv.DictReader(fh):
            grades[row["image"]] = int(row["level"])
    images = data_dir / "images"
    present = {p.stem: p for p in images.iterdir() if p.is_file()}
    kept = {k: g for k, g in grades.items() if k in present and g in (0, 4)}
    patient = {k: k.split("_")[0] for k in kept}
    sick = sorted({patient[k] for k, g in kept.items() if g == 4})
    healthy = sorted(set(patient.values()) - set(sick))
    rng = np.random.default_rng(seed)
    healthy = list(rng.choice(healthy, size=min(n_healthy, len(healthy)), replace=False))
    chosen = set(healthy) | set(sick)
    out_healthy = set(rng.choice(healthy, size=round(outside * len(healthy)), replace=False))
    out_sick = set(rng.choice(sick, size=round(outside * len(sick)), replace=False))
    counts = {}
    for part, members in (("fit", chosen - out_healthy - out_sick),
                          ("outside", out_healthy | out_sick)):
        root = work / part
        rows = ["image,patient"]
        for sub in ("normal", "abnormal"):
            (root / sub).mkdir(parents=True)
        for key in sorted(k for k in kept if patient[k] in members):
            sub = "abnormal" if kept[key] == 4 else "normal"
            name = f"{sub}/{present[key].name}"
            (root / name).symlink_to(present[key].resolve())
            rows.append(f"{name},{patient[key]}")
            counts[(part, sub)] = counts.get((part, sub), 0) + 1
        (root / "patients.csv").write_text("\n".join(rows) + "\n")
        counts[(part, "patients")] = len(members)
    return {f"{a}/{b}": v for (a, b), v in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/kaggle-dr-256"))
    parser.add_argument("--weights", default="../shared/weights/mobilenet_v2_weights_tf_dim_"
                                             "ordering_tf_kernels_0.35_224_no_top.h5")
    parser.add_argument("--backbone", default="mobilenet_v2:alpha=0.35")
    parser.add_argument("--detector", default="iforest")
    parser.add_argument("--healthy-patients", type=int, default=220)
    parser.add_argument("--outside", type=float, default=0.35,
                        help="share of patients kept fully outside fitting")
    parser.add_argument("--calibration", type=float, default=0.2)
    parser.add_argument("--validation", type=float, default=0.25)
    parser.add_argument("--fpr", type=float, default=0.1)
    parser.add_argument("--sensitivity", type=float, default=0.95)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--outside-seed", type=int, default=0,
                        help="draws the healthy patients and which patients stay outside")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()

    from kad.calibration import Proportion, assess, plan_fit_split
    from kad.datasets import FileSource, load_dataset
    from kad.features import extract_features
    from kad.pipeline import fit_pipeline

    work = args.work or Path(tempfile.mkdtemp(prefix="kad-calibration-"))
    counts = build_folders(args.data_dir, work, args.healthy_patients, args.outside,
                           args.outside_seed)
    print("images:", json.dumps(counts))
    fit_ds = load_dataset("folder", work / "fit")
    out_ds = load_dataset("folder", work / "outside")
    cache = work / "cache"
    common = {"backbone": args.backbone, "weights": args.weights, "detector": args.detector,
              "cache_dir": cache, "batch_size": 32}
    features = extract_features(fit_ds, args.backbone, args.weights, cache_dir=cache,
                                batch_size=32)
    outside = extract_features(out_ds, args.backbone, args.weights, cache_dir=cache,
                               batch_size=32)
    out_rows = np.flatnonzero(outside.valid)
    out_y = np.asarray(out_ds.anomaly, int)[out_rows]
    print(f"outside: {int((out_y == 0).sum())} normal, {int(out_y.sum())} abnormal images of "
          f"{len(set(np.asarray(out_ds.patient)[out_rows]))} patients never used in fitting")
    results = []
    for seed in range(args.seeds):
        split = plan_fit_split(fit_ds, args.calibration, args.validation, seed=seed,
                               valid=features.valid)
        record = {"seed": seed, "split": split.describe()}
        for method in ("fpr", "sensitivity"):
            pipe = fit_pipeline(fit_ds, split=split, representation="picked",
                                features=features, **common,
                                **({"fpr": args.fpr} if method == "fpr"
                                   else {"sensitivity": args.sensitivity}))
            scores = pipe.score_features(outside.matrix(pipe.blocks, out_rows))
            if seed == 0 and method == "fpr":  # the streamed path gives the same scores
                files = [work / "outside" / i for i in np.asarray(out_ds.ids)[out_rows[:16]]]
                streamed = pipe.score(FileSource(files)).scores
                np.testing.assert_allclose(streamed, scores[:16], rtol=1e-5, atol=1e-6)
            observed = assess(scores, out_y, pipe.threshold.value, "outside patients")
            held = pipe.assessed()
            details = pipe.threshold.details
            entry = {
                "block": pipe.blocks[0], "threshold": pipe.threshold.value,
                "observed_fpr": Proportion.of(int((scores[out_y == 0] >
                                                   pipe.threshold.value).sum()),
                                              int((out_y == 0).sum())).__dict__,
                "observed": observed.as_dict(), "held_out": held.as_dict(),
            }
            if method == "fpr":
                entry["guarantee"] = details["guarantee"]
                entry["fpr_bound"] = details["fpr_bound"]
            else:
                entry["at_fitting"] = {k: details[k] for k in
                                       ("sensitivity", "sensitivity_ci95", "specificity",
                                        "specificity_ci95", "n_normal", "n_anomalous")}
            record[method] = entry
        results.append(record)
        _print(record)
    _summary(results)
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "args": {
            k: str(v) for k, v in vars(args).items()}, "runs": results}, indent=1))
    print(f"work folder: {work}")


def _rate(p) -> str:
    if p is None:
        return "—"
    return f"{p['value']:.1%} [{p['low']:.1%}, {p['high']:.1%}] ({p['k']}/{p['n']})"


def _print(record) -> None:
    fpr, sens = record["fpr"], record["sensitivity"]
    split = record["split"]
    print(f"\nseed {record['seed']}: train {split['train']}, calibration "
          f"{split['calibration']}, selection {split['selection']}, assessment "
          f"{split['assessment']}; block {fpr['block']}")
    print(f"  --fpr: threshold {fpr['threshold']:.4g}; {fpr['guarantee']}")
    print(f"         observed FPR on outside normals {_rate(fpr['observed_fpr'])}")
    print(f"         held-out sens {_rate(fpr['held_out']['sensitivity'])}, spec "
          f"{_rate(fpr['held_out']['specificity'])}")
    print(f"         outside  sens {_rate(fpr['observed']['sensitivity'])}, spec "
          f"{_rate(fpr['observed']['specificity'])}")
    fit = sens["at_fitting"]
    print(f"  --sensitivity: threshold {sens['threshold']:.4g}")
    print(f"         at fitting sens {fit['sensitivity']:.1%} ({fit['n_anomalous']}), spec "
          f"{fit['specificity']:.1%} ({fit['n_normal']}) [in-sample]")
    print(f"         held-out   sens {_rate(sens['held_out']['sensitivity'])}, spec "
          f"{_rate(sens['held_out']['specificity'])}")
    print(f"         outside    sens {_rate(sens['observed']['sensitivity'])}, spec "
          f"{_rate(sens['observed']['specificity'])}")


def _summary(results) -> None:
    def mean(get):
        values = [get(r) for r in results]
        values = [v for v in values if v is not None]
        return f"{np.mean(values):.1%}" if values else "—"

    def value(p):
        return None if p is None else p["value"]

    print(f"\nmean over {len(results)} seeds:")
    observed = mean(lambda r: r["fpr"]["observed_fpr"]["value"])
    print(f"  --fpr: observed FPR on outside normals {observed}"
          f" (bound {mean(lambda r: r['fpr']['fpr_bound'])})")
    for method in ("fpr", "sensitivity"):
        rows = [("held out", "held_out"), ("outside", "observed")]
        if method == "sensitivity":
            print(f"  {method}: at fitting sens "
                  f"{mean(lambda r: r['sensitivity']['at_fitting']['sensitivity'])}, spec "
                  f"{mean(lambda r: r['sensitivity']['at_fitting']['specificity'])}")
        for name, key in rows:
            print(f"  {method}: {name} sens "
                  f"{mean(lambda r, k=key, m=method: value(r[m][k]['sensitivity']))}, spec "
                  f"{mean(lambda r, k=key, m=method: value(r[m][k]['specificity']))}")


if __name__ == "__main__":
    main()
