"""Input size, block and detector chosen from evidence: the grid on real data.

For each dataset the script extracts MobileNetV2-0.35 ImageNet features at every
``--sizes`` (cached under ``--cache-dir``, one entry per size), runs
:func:`kad.screening.selection.nested_selection` over the grid of
:func:`kad.screening.selection.candidate_grid`
(every block and the concatenation at each size, the concatenation across sizes, each
with every detector) and prints, per (size, block choice, detector), the test AUROC mean ±
std over splits:

``concat``
    every block concatenated, no labels needed (the paper's representation);
``picked block``
    the block with the best validation AUROC at that size for that detector (the paper's
    Table 2, picked inside the training folds);

then kad's pick over the whole grid (``picked triple``), the extraction time per image at
each size measured side by side in this run, and the paper's numbers (InceptionResNetV2).

Datasets:

``dr``
    ``../shared/data/kaggle-dr-256``: grade 0 normal, grade 4 anomaly, 5 patient-level
    folds (``--seeds`` repetitions, default 1). With ``--fundus-at-input``, the features at
    the largest size are also extracted with the fundus preprocessing working at that size
    (``fundus:size=input``) instead of 256 px, and their concatenation is compared.
``cifar10``
    an image-folder export (``--cifar-dir``, from ``../shared/data/cifar10-jpeg.tar``),
    ``--cifar-limit`` images per class and split (default 150: 1,500 training and 1,500
    test images), each class normal in turn.

The labelled validation set is 3% of the dataset in anomalies (as in the paper's Table 2)
plus the split's held-out normal images. Run from the repository root::

    tar xf ../shared/data/cifar10-jpeg.tar -C /tmp
    python benchmarks/evidence.py --cifar-dir /tmp/cifar10-jpeg --cache-dir /tmp/kad-cache

See ``benchmarks/README.md`` for the measured results.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KAD_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
BACKBONE = "mobilenet_v2:alpha=0.35"
#: The paper's numbers (InceptionResNetV2, Isolation Forest): Table 1 "Ours" and Table 2.
PAPER = {"dr": {"concat": "74.5 ± 1.7"},
         "cifar10": {"concat": "88.2 ± 6.6", "picked block": "88.2 ± 6.6"}}


def pct(values) -> str:
    values = np.asarray(list(values), dtype=float) * 100
    return f"{values.mean():5.1f} ± {values.std():4.1f}"


def time_per_image(dataset, sizes_preps, n: int, batch_size: int, repeat: int) -> dict:
    """Seconds per image to decode, preprocess and run the network, at each (size,
    preprocessing), on the same first ``n`` images, interleaved ``repeat`` times (fastest
    kept); the network is built and run once on a batch before timing."""
    from kad.features.extract import plan_extraction, stream_features

    subset = dataset.subset(np.arange(min(n, len(dataset))))
    models = {}
    for size, prep in sizes_preps:
        plan = plan_extraction(subset, BACKBONE, str(WEIGHTS), size, prep)
        model, _ = plan.backbone.build_extractor(size, str(WEIGHTS))
        model.predict_on_batch(np.zeros((batch_size, size, size, 3), np.float32))
        models[(size, prep)] = (model, plan)
    best = {key: float("inf") for key in models}
    for _ in range(repeat):
        for key, (model, plan) in models.items():
            start = time.perf_counter()
            for _ in stream_features(model, subset.source, subset.ids, plan, batch_size):
                pass
            best[key] = min(best[key], (time.perf_counter() - start) / len(subset))
    return best


def run_dataset(name, dataset, sizes, detectors, folds, seeds, cache_dir, batch_size,
                extra_prep=None, progress=True) -> dict:
    from kad.data.protocols import splits
    from kad.screening.selection import (
        CONCAT,
        candidate_grid,
        extract_sizes,
        nested_selection,
        summarise_candidates,
    )

    started = time.perf_counter()
    features = extract_sizes(dataset, BACKBONE, str(WEIGHTS), sizes, None,
                             batch_size=batch_size, cache_dir=cache_dir)
    valid = features.valid
    todo = splits(dataset, seeds, folds, valid)
    n_val = max(1, int(round(0.03 * int(valid.sum()))))
    grid = candidate_grid(features, detectors)
    from kad.utils.progress import Progress

    class Show(Progress):  # a line every 30 s: how many splits are done
        last = 0.0

        def on_task_update(self, task, done, total):
            if task == "splits" and time.perf_counter() - self.last > 30:
                self.last = time.perf_counter()
                print(f"  {name}: {done}/{total} splits, "
                      f"{time.perf_counter() - started:.0f} s", flush=True)

    results = nested_selection(features, todo, grid, n_val,
                               progress=Show() if progress else None)
    rows = []
    for size in features.sizes:
        for det in detectors:
            concat = [r.selection.score_of(next(c for c in grid if c.detector == det and
                                                c.representation == f"{CONCAT}@{size}"))
                      for r in results]
            block = [r.selection.best_of(lambda c, s=size, d=det: c.detector == d and
                                         c.sizes == (s,) and c.block != CONCAT)
                     for r in results]
            rows.append({"size": str(size), "choice": "concat", "detector": det,
                         "aurocs": [s.test_auroc for s in concat]})
            rows.append({"size": str(size), "choice": "picked block", "detector": det,
                         "aurocs": [s.test_auroc for s in block],
                         "picks": [s.candidate.block for s in block]})
    if len(features.sizes) > 1:
        across = ",".join(f"{CONCAT}@{s}" for s in features.sizes)
        for det in detectors:
            scores = [r.selection.score_of(next(c for c in grid if c.detector == det and
                                                c.representation == across))
                      for r in results]
            rows.append({"size": "+".join(map(str, features.sizes)), "choice": "concat",
                         "detector": det, "aurocs": [s.test_auroc for s in scores]})
    rows.append({"size": "any", "choice": "picked triple", "detector": "any",
                 "aurocs": [r.test["auroc"] for r in results],
                 "picks": [r.picked.label for r in results]})
    if extra_prep:  # the largest size again, preprocessed at the network's resolution
        size = max(features.sizes)
        other = extract_sizes(dataset, BACKBONE, str(WEIGHTS), [size], extra_prep,
                              batch_size=batch_size, cache_dir=cache_dir)
        concat_grid = candidate_grid(other, detectors, blocks=False)
        more = nested_selection(other, todo, concat_grid, n_val)
        for det in detectors:
            scores = [r.selection.score_of(next(c for c in concat_grid if c.detector == det))
                      for r in more]
            rows.append({"size": f"{size} ({extra_prep})", "choice": "concat", "detector": det,
                         "aurocs": [s.test_auroc for s in scores]})
    return {"dataset": name, "n_images": len(dataset), "n_valid": int(valid.sum()),
            "n_splits": len(todo), "n_validation_anomalies": n_val, "sizes": features.sizes,
            "detectors": detectors, "n_candidates": len(grid), "rows": rows,
            "candidates": summarise_candidates(results),
            "cache": {s: f.key for s, f in features.by_size.items()},
            "seconds": time.perf_counter() - started}


def print_dataset(result: dict, timing: dict) -> None:
    print(f"\n{result['dataset']}: {result['n_valid']} images, {result['n_splits']} splits, "
          f"{result['n_validation_anomalies']} labelled validation anomalies, "
          f"{result['n_candidates']} candidates, {result['seconds']:.0f} s")
    print(f"{'size px':<28} {'block choice':<14} {'detector':<14} {'AUROC % (test)':>15}"
          f" {'ms/image':>9}")
    for row in result["rows"]:
        ms = timing.get(row["size"])
        ms_text = f"{1000 * ms:9.1f}" if ms is not None else f"{'':>9}"
        print(f"{row['size']:<28} {row['choice']:<14} {row['detector']:<14} "
              f"{pct(row['aurocs']):>15} {ms_text}")
    for choice, value in PAPER.get(result["dataset"], {}).items():
        print(f"{'paper (InceptionResNetV2)':<28} {choice:<14} {'iforest':<14} {value:>15}")
    picks = next(r for r in result["rows"] if r["choice"] == "picked triple")["picks"]
    counts = {p: picks.count(p) for p in dict.fromkeys(picks)}
    print("picked triples: " + "; ".join(f"{k} ×{v}" for k, v in counts.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="dr,cifar10")
    parser.add_argument("--sizes", default="224,448")
    parser.add_argument("--detectors", default="iforest,knn,mahalanobis")
    parser.add_argument("--dr-dir", type=Path, default=SHARED / "data" / "kaggle-dr-256")
    parser.add_argument("--cifar-dir", type=Path, default=None)
    parser.add_argument("--cifar-limit", type=int, default=150)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--fundus-at-input", action="store_true")
    parser.add_argument("--time-images", type=int, default=64)
    parser.add_argument("--time-repeat", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="the fundus set at 32 px, few images: seconds, not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        args.datasets, args.sizes, args.detectors = "dr", "32", "knn"
        args.folds, args.time_images, args.time_repeat, args.batch_size = 2, 4, 1, 4

    from kad.data.datasets import load_dataset
    from kad.data.protocols import subsample
    from kad.screening.selection import parse_sizes
    from kad.utils.specs import split_specs

    if not WEIGHTS.is_file():
        raise SystemExit(f"{WEIGHTS} is missing: the benchmark needs the MobileNetV2-0.35 "
                         "ImageNet file (see ../shared/weights/README.md)")
    sizes = parse_sizes(args.sizes)
    detectors = split_specs(args.detectors)
    out = {"load_average_start": os.getloadavg(), "backbone": BACKBONE, "results": []}
    for name in args.datasets.split(","):
        if name == "dr":
            dataset = load_dataset("dr", args.dr_dir)
            if args.smoke:
                dataset = dataset.subset(subsample(dataset, 12))
            extra = "fundus:size=input" if args.fundus_at_input else None
        elif name == "cifar10":
            if args.cifar_dir is None:
                raise SystemExit("--cifar-dir: an image-folder export of CIFAR-10 "
                                 "(tar xf ../shared/data/cifar10-jpeg.tar -C /tmp)")
            dataset = load_dataset("cifar10", args.cifar_dir)
            dataset = dataset.subset(subsample(dataset, args.cifar_limit))
            extra = None
        else:
            raise SystemExit(f"unknown dataset {name!r}: dr or cifar10")
        result = run_dataset(name, dataset, sizes, detectors, args.folds, args.seeds,
                             args.cache_dir, args.batch_size, extra)
        variants = [(s, None) for s in sizes]
        if extra:
            variants.append((max(sizes), extra))
        timed = time_per_image(dataset, variants, args.time_images, args.batch_size,
                               args.time_repeat)
        timing = {str(s): t for (s, p), t in timed.items() if p is None}
        timing["+".join(map(str, sizes))] = sum(timing[str(s)] for s in sizes)
        if extra:
            timing[f"{max(sizes)} ({extra})"] = timed[(max(sizes), extra)]
        result["seconds_per_image"] = timing
        print_dataset(result, timing)
        out["results"].append(result)
    out["load_average_end"] = os.getloadavg()
    print(f"\nload average at start {out['load_average_start'][0]:.1f}, at end "
          f"{out['load_average_end'][0]:.1f} (2 shared cores): times are comparable within "
          "this run only")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
