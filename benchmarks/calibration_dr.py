"""Operating points on new patients: what kad fit reports against what happens.

Kaggle DR fundus images (grade 0 normal, grade 4 abnormal, patient = the number before
``_left``/``_right``) of ``--healthy-patients`` patients with two grade-0 eyes and every
patient with a grade-4 eye form one folder dataset (``normal/``, ``abnormal/`` and
``patients.csv``, as symbolic links in a work folder, never in the repository); features
are extracted once. Each of ``--repeats`` runs then

1. keeps an ``--outside`` share of the patients (healthy and sick drawn separately) fully
   outside fitting;
2. divides the other patients with :func:`kad.screening.calibration.plan_fit_split` (``rows=``) and
   fits twice with :func:`kad.screening.fitting.fit_pipeline`, as ``kad fit`` does:

   ``fpr``
       block picked on the selection part, threshold by split-conformal calibration at
       ``--fpr`` on the calibration normals: the threshold, its guarantee, the held-out
       (assessment) figures, and the false-positive rate observed on the outside normals;
   ``sensitivity``
       the same block, the threshold at ``--sensitivity`` on the selection part. Side by
       side: the figures at fitting (in-sample: the images that set the threshold, what
       ``kad fit`` used to report), the held-out assessment ``kad fit`` reports now, and
       what is observed on the outside patients.

Every rate carries a Wilson 95% interval and its counts; the means over runs carry the
standard error over runs. The first run also checks that the streamed scoring path
(:meth:`Pipeline.score`) gives the scores computed from the cached features.

Run from the repository root (CPU is enough; a few minutes on two cores)::

    python benchmarks/calibration_dr.py --repeats 20 --json calibration.json

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


def build_folder(data_dir: Path, root: Path, n_healthy: int, seed: int,
                 n_sick: int | None = None) -> dict:
    """A folder dataset of grade-0 and grade-4 images under ``root`` (every patient with a
    grade-4 eye, or ``n_sick`` of them); returns the counts."""
    grades = {}
    with open(data_dir / "trainLabels.csv") as fh:
        for row in csv.DictReader(fh):
            grades[row["image"]] = int(row["level"])
    present = {p.stem: p for p in (data_dir / "images").iterdir() if p.is_file()}
    kept = {k: g for k, g in grades.items() if k in present and g in (0, 4)}
    patient = {k: k.split("_")[0] for k in kept}
    sick = sorted({patient[k] for k, g in kept.items() if g == 4})
    healthy = sorted(set(patient.values()) - set(sick))
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(healthy, size=min(n_healthy, len(healthy)), replace=False))
    if n_sick is not None:
        sick = sorted(rng.choice(sick, size=min(n_sick, len(sick)), replace=False))
    chosen |= set(sick)
    rows = ["image,patient"]
    counts = {"normal": 0, "abnormal": 0, "patients": len(chosen)}
    for sub in ("normal", "abnormal"):
        (root / sub).mkdir(parents=True)
    for key in sorted(k for k in kept if patient[k] in chosen):
        sub = "abnormal" if kept[key] == 4 else "normal"
        name = f"{sub}/{present[key].name}"
        (root / name).symlink_to(present[key].resolve())
        rows.append(f"{name},{patient[key]}")
        counts[sub] += 1
    (root / "patients.csv").write_text("\n".join(rows) + "\n")
    return counts


def outside_rows(dataset, share: float, seed: int) -> np.ndarray:
    """Rows of a ``share`` of the healthy and of the sick patients, drawn with ``seed``."""
    patient = np.asarray(dataset.patient)
    anomaly = np.asarray(dataset.anomaly, bool)
    sick = np.unique(patient[anomaly])
    healthy = np.setdiff1d(np.unique(patient), sick)
    rng = np.random.default_rng(1000 + seed)
    out = np.r_[rng.choice(healthy, size=round(share * len(healthy)), replace=False),
                rng.choice(sick, size=round(share * len(sick)), replace=False)]
    return np.flatnonzero(np.isin(patient, out))


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--selection", type=float, default=0.25)
    parser.add_argument("--fpr", type=float, default=0.1)
    parser.add_argument("--sensitivity", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--smoke", action="store_true",
                        help="a few patients, one repeat, 32 px: seconds, not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        args.healthy_patients, args.repeats, args.fpr = 16, 1, 0.25

    from kad.data.datasets import FileSource, load_dataset
    from kad.features.extract import extract_features
    from kad.screening.calibration import Proportion, assess, plan_fit_split
    from kad.screening.fitting import fit_pipeline

    work = args.work or Path(tempfile.mkdtemp(prefix="kad-calibration-"))
    counts = build_folder(args.data_dir, work / "pool", args.healthy_patients, 0,
                          8 if args.smoke else None)
    print("images:", json.dumps(counts))
    dataset = load_dataset("folder", work / "pool")
    cache = work / "cache"
    features = extract_features(dataset, args.backbone, args.weights, cache_dir=cache,
                                batch_size=32)
    labels = np.asarray(dataset.anomaly, int)
    patients = np.asarray(dataset.patient)
    sick_patient = np.isin(patients, patients[labels == 1])
    common = {"backbone": args.backbone, "weights": args.weights, "detector": args.detector,
              "cache_dir": cache, "batch_size": 32, "features": features,
              "representation": "picked",
              "heatmap_scale": False}  # thresholds are measured here, not heatmaps
    results = []
    for run in range(args.repeats):
        out_rows = outside_rows(dataset, args.outside, run)
        out_rows = out_rows[features.valid[out_rows]]
        out_y = labels[out_rows]
        split = plan_fit_split(dataset, args.calibration, args.selection, seed=run,
                               valid=features.valid,
                               rows=np.setdiff1d(np.arange(len(dataset)), out_rows))
        record = {"run": run, "split": split.describe(),
                  "outside": {"normal": int((out_y == 0).sum()), "abnormal": int(out_y.sum())}}
        for method in ("fpr", "sensitivity"):
            pipe = fit_pipeline(dataset, split=split, **common,
                                **({"fpr": args.fpr} if method == "fpr"
                                   else {"sensitivity": args.sensitivity}))
            scores = pipe.detector.anomaly_score(
                pipe.representation.cached(features, out_rows))
            if run == 0 and method == "fpr":  # the streamed path gives the same scores
                files = [work / "pool" / i for i in np.asarray(dataset.ids)[out_rows[:16]]]
                streamed = pipe.score(FileSource(files)).scores
                np.testing.assert_allclose(streamed, scores[:16], rtol=1e-5, atol=1e-6)
            flags = scores > pipe.threshold.value
            healthy = (out_y == 0) & ~sick_patient[out_rows]
            entry = {
                "block": pipe.blocks[0], "threshold": pipe.threshold.value,
                "observed_fpr": Proportion.of(int(flags[out_y == 0].sum()),
                                              int((out_y == 0).sum())).__dict__,
                # calibration normals come from patients without an abnormal eye only
                "observed_fpr_healthy_patients": Proportion.of(
                    int(flags[healthy].sum()), int(healthy.sum())).__dict__,
                "observed_fpr_fellow_eyes": _maybe(Proportion.of(
                    int(flags[(out_y == 0) & ~healthy].sum()),
                    int(((out_y == 0) & ~healthy).sum()))),
                "observed": assess(scores, out_y, pipe.threshold.value,
                                   "outside patients").as_dict(),
                "held_out": pipe.assessed().as_dict(),
            }
            details = pipe.threshold.details
            if method == "fpr":
                entry.update(guarantee=details["guarantee"], fpr_bound=details["fpr_bound"])
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


def _maybe(proportion):
    return None if proportion is None else proportion.__dict__


def _rate(p) -> str:
    if p is None:
        return "—"
    return f"{p['value']:.1%} [{p['low']:.1%}, {p['high']:.1%}] ({p['k']}/{p['n']})"


def _print(record) -> None:
    fpr, sens = record["fpr"], record["sensitivity"]
    split = record["split"]
    print(f"\nrun {record['run']}: train {split['train']}, calibration "
          f"{split['calibration']}, selection {split['selection']}, assessment "
          f"{split['assessment']}, outside {record['outside']}; block {fpr['block']}")
    print(f"  --fpr: threshold {fpr['threshold']:.4g}; {fpr['guarantee']}")
    print(f"         observed FPR on outside normals {_rate(fpr['observed_fpr'])}: "
          f"healthy patients {_rate(fpr['observed_fpr_healthy_patients'])}, normal fellow "
          f"eyes of patients with an abnormal eye {_rate(fpr['observed_fpr_fellow_eyes'])}")
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
    """Mean ± standard error over runs of every rate."""
    def mean(get):
        values = [v for v in (get(r) for r in results) if v is not None]
        if not values:
            return "—"
        se = np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
        return f"{np.mean(values):.1%} ± {se:.1%}"

    def value(p):
        return None if p is None else p["value"]

    print(f"\nmean ± standard error over {len(results)} runs:")
    observed = mean(lambda r: r["fpr"]["observed_fpr"]["value"])
    print(f"  --fpr: observed FPR on outside normals {observed}"
          f" (guaranteed at most {mean(lambda r: r['fpr']['fpr_bound'])})")
    healthy = mean(lambda r: r["fpr"]["observed_fpr_healthy_patients"]["value"])
    fellow = mean(lambda r: value(r["fpr"]["observed_fpr_fellow_eyes"]))
    print(f"  --fpr: of which healthy patients {healthy}, normal fellow eyes of patients "
          f"with an abnormal eye {fellow}")
    for method in ("fpr", "sensitivity"):
        if method == "sensitivity":
            print(f"  {method}: at fitting (in-sample) sens "
                  f"{mean(lambda r: r['sensitivity']['at_fitting']['sensitivity'])}, spec "
                  f"{mean(lambda r: r['sensitivity']['at_fitting']['specificity'])}")
        for name, key in (("held out (reported)", "held_out"), ("outside (observed)",
                                                                "observed")):
            print(f"  {method}: {name} sens "
                  f"{mean(lambda r, k=key, m=method: value(r[m][k]['sensitivity']))}, spec "
                  f"{mean(lambda r, k=key, m=method: value(r[m][k]['specificity']))}")


if __name__ == "__main__":
    main()
