"""Do kad's heatmaps point at lesions? Planted lesions, pointing game and pixel AUROC.

Normal (grade 0) Kaggle DR photographs are split by patient: ``--n-fit`` images fit one
pipeline per detector and block (MobileNetV2-0.35, ImageNet weights, fundus preprocessing
at kad's default 448 px; block "default" is kad's default representation, every block for
the detectors of pooled features and two for patch kNN), and ``--n`` images of
other patients each receive one synthetic lesion at a random position inside the fundus
(within 70% of its radius): a bright, yellowish exudate-like blob or a dark red
haemorrhage-like one, of radius 3, 5 or 8 pixels on the 256-pixel photographs, with a soft
edge. Every planted image is explained (:func:`kad.screening.heatmaps.explain`), the map is
taken back
onto the photograph (:meth:`~kad.screening.heatmaps.Heatmap.on_original`) and compared with the
lesion's mask there:

* pointing game: the map's maximum falls inside the lesion (strict), and within 15 pixels
  of it (the tolerance of Zhang et al. 2016), with Wilson 95% intervals;
* pixel AUROC: the map as a per-pixel lesion detector over the fundus disc, averaged over
  images, with a 95% t-interval;
* the centre-bias baseline: a map that is highest at the fundus centre and falls off with
  distance, measured on the same images;
* the lesion's effect on the score: the median of (planted score - clean score) over the
  planted images, in standard deviations of the training scores. A map that explains the
  score can only point at the lesion if the lesion moves the score.

Cost: for every detector and block, the time of :meth:`Pipeline.score` and of
:func:`explain` on the same planted images, measured side by side in this run, per image.

Run from the repository root (about 40 minutes on 2 cores with the defaults; patch kNN on
``block_2_add``, 12,544 locations per image, takes a third of it)::

    python benchmarks/heatmaps.py --n 100 --n-fit 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = (SHARED / "weights"
           / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
BLOCKS = ("block_2_add", "block_5_add", "block_9_add", "block_12_add", "block_15_add",
          "out_relu")
DETECTORS = ("patchknn", "knn", "mahalanobis", "ocsvm", "iforest")
RADII = (3, 5, 8)
KINDS = {"exudate": (250, 225, 110), "haemorrhage": (85, 18, 12)}


def plant(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """``rgb`` with one lesion planted inside the fundus, its mask, and its description."""
    from kad.data.preprocessing import fundus_box

    left, top, side = fundus_box(rgb)
    cx, cy, radius = left + side / 2, top + side / 2, side / 2
    angle, dist = rng.uniform(0, 2 * np.pi), 0.7 * radius * np.sqrt(rng.uniform())
    x, y = cx + dist * np.cos(angle), cy + dist * np.sin(angle)
    size = float(rng.choice(RADII))
    kind = str(rng.choice(list(KINDS)))
    yy, xx = np.mgrid[:rgb.shape[0], :rgb.shape[1]]
    distance = np.hypot(xx + 0.5 - x, yy + 0.5 - y)
    alpha = np.clip(size - distance + 0.5, 0.0, 1.0)[..., None] * 0.9
    out = rgb.astype(np.float32) * (1 - alpha) + np.array(KINDS[kind], np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), distance <= size, f"{kind} r={size:g}"


def wilson(hits: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(method="wilson")
    return ci.low, ci.high


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    mean = float(np.mean(values))
    half = float(stats.sem(values) * stats.t.ppf(0.975, len(values) - 1))
    return mean, mean - half, mean + half


def evaluate(maps: list[np.ndarray], masks, discs) -> dict:
    from kad.screening.heatmaps import pixel_auroc, pointing_game

    hits = [pointing_game(m, k) for m, k in zip(maps, masks, strict=True)]
    near = [pointing_game(m, k, tolerance=15) for m, k in zip(maps, masks, strict=True)]
    aurocs = np.array([pixel_auroc(m, k, d) for m, k, d in zip(maps, masks, discs,
                                                                strict=True)])
    return {"hits": int(sum(hits)), "near": int(sum(near)), "n": len(maps),
            "auroc": t_interval(aurocs)}


def row(name: str, result: dict, cost: str = "") -> str:
    """One line of the table: pointing games and pixel AUROC with their intervals."""
    n = result["n"]
    lo, hi = wilson(result["hits"], n)
    nlo, nhi = wilson(result["near"], n)
    mean, alo, ahi = result["auroc"]
    return (f"{name:<52} {100 * result['hits'] / n:5.1f} [{100 * lo:4.1f}-{100 * hi:5.1f}]  "
            f"{100 * result['near'] / n:5.1f} [{100 * nlo:4.1f}-{100 * nhi:5.1f}]  "
            f"{mean:.3f} [{alo:.3f}-{ahi:.3f}]  {cost}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=SHARED / "data" / "kaggle-dr-256")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--n", type=int, default=100, help="planted images")
    parser.add_argument("--n-fit", type=int, default=200, help="normal images to fit on")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--blocks", default=",".join(BLOCKS))
    parser.add_argument("--image-size", type=int, default=None,
                        help="network input size (default: kad's for fundus photographs, 448)")
    parser.add_argument("--grid", type=int, default=8, help="occlusion grid")
    parser.add_argument("--steps", type=int, default=16, help="integration steps")
    parser.add_argument("--occlusion-n", type=int, default=50,
                        help="explain only the first this many planted images with occlusion "
                             "(it costs 1 + grid² passes per image); 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a few images, one detector, coarse maps: seconds, not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.n_fit, args.grid, args.steps, args.occlusion_n = 3, 12, 2, 2, 1
        args.image_size = args.image_size or 96
        args.detectors, args.blocks = "knn", "block_12_add"

    from kad.data.datasets import ArraySource, load_dataset
    from kad.screening.fitting import fit_pipeline
    from kad.screening.heatmaps import choose_method, explain
    from kad.utils.specs import split_specs

    dataset = load_dataset("dr", args.data_dir)
    normal = np.flatnonzero(~dataset.anomaly)
    rng = np.random.default_rng(args.seed)
    patients = rng.permutation(np.unique(dataset.patient[normal]))
    order = np.concatenate([normal[dataset.patient[normal] == p] for p in patients])
    fit_rows = order[:args.n_fit]
    fit_patients = set(dataset.patient[fit_rows])
    rest = [i for i in order[args.n_fit:] if dataset.patient[i] not in fit_patients]
    test_rows = np.array(rest[:args.n])
    planted, clean, masks, discs, kinds = [], [], [], [], []
    from kad.data.preprocessing import fundus_box

    for i in test_rows:
        clean.append(dataset.source.load(int(i)))
        image, mask, kind = plant(clean[-1], rng)
        left, top, side = fundus_box(image)
        yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
        disc = np.hypot(xx + 0.5 - left - side / 2, yy + 0.5 - top - side / 2) <= 0.9 * side / 2
        planted.append(image)
        masks.append(mask)
        discs.append(disc)
        kinds.append(kind)
    source = ArraySource(np.stack(planted))
    print(f"fit: {len(fit_rows)} grade-0 images of {len(fit_patients)} patients; planted: "
          f"{len(test_rows)} grade-0 images of other patients, one lesion each "
          f"({', '.join(f'{k} {kinds.count(k)}' for k in sorted(set(kinds)))})")

    centre_maps = []
    for image in planted:
        left, top, side = fundus_box(image)
        yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
        centre_maps.append(-np.hypot(xx + 0.5 - left - side / 2, yy + 0.5 - top - side / 2))
    header = (f"{'detector / block (method)':<52} {'pointing %':<17}  {'within 15 px %':<17}  "
              f"{'pixel AUROC':<21}  lesion effect  cost per image: score, heatmap, ratio")
    lines = [header, row("centre bias", evaluate(centre_maps, masks, discs))]
    print(lines[0])
    print(lines[1], flush=True)
    cache = tempfile.mkdtemp(prefix="kad-heatmaps-bench-")
    best = None
    for detector in split_specs(args.detectors):
        for block in args.blocks.split(","):
            pipeline = fit_pipeline(
                dataset.subset(fit_rows), backbone="mobilenet_v2:alpha=0.35",
                weights=args.weights, preprocessing="fundus", image_size=args.image_size,
                representation="concat" if block == "default" else block,
                detector=detector, batch_size=32, cache_dir=cache)
            count = len(planted)
            options = {"grid": args.grid, "steps": args.steps, "keep_images": False}
            if choose_method(pipeline.detector) == "occlusion" and args.occlusion_n:
                count = min(count, args.occlusion_n)
            sub = ArraySource(np.stack(planted[:count]))
            first = ArraySource(np.stack(planted[:1]))  # warm-up: one (padded) batch each,
            pipeline.score(first)  # so graph tracing counts for neither
            explain(pipeline, first, **options)
            began = time.perf_counter()
            pipeline.score(sub)
            scoring = (time.perf_counter() - began) / count
            began = time.perf_counter()
            maps = explain(pipeline, sub, **options)
            heat = (time.perf_counter() - began) / count
            result = evaluate([m.on_original() for m in maps], masks[:count], discs[:count])
            # How much the lesion moves the score: planted minus clean, in SDs of the
            # training scores.
            moved = (np.array([m.score for m in maps])
                     - pipeline.score(ArraySource(np.stack(clean[:count]))).scores)
            effect = float(np.median(moved) / np.std(pipeline.training["scores"]))
            used = ("+".join(pipeline.blocks) if len(pipeline.blocks) <= 2
                    else f"{len(pipeline.blocks)} blocks")
            name = (f"{detector} / {'default: ' + used if block == 'default' else block} "
                    f"({maps[0].method})")
            line = row(name, result, f"{effect:+6.2f} SD     "
                                     f"{1000 * scoring:6.1f} ms, {1000 * heat:7.1f} ms, "
                                     f"x{heat / scoring:5.1f}" + (f"  (n={count})"
                                                                 if count < len(planted)
                                                                 else ""))
            print(line, flush=True)
            lines.append(line)
            share = result["hits"] / result["n"]
            if best is None or share > best[0]:
                best = (share, name)
    print(f"\nbest pair: {best[1]}, pointing game {100 * best[0]:.1f}%")
    del source


if __name__ == "__main__":
    main()
