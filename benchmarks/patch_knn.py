"""Patch kNN's cost: scoring per image against kNN on the same pooled features, and fitting
against the number of normal images.

The maps are synthetic and of the realistic shape (MobileNetV2-0.35 at 448 px, the blocks
kad's pipeline gives patch kNN: ``block_5_add``'s 56x56x16 and ``block_12_add``'s 28x28x32
stacked on the 56x56 grid, ``block_channels=(16, 32)``): a few smooth latent factors mixed
into each block's channels, plus noise, so that locations have the low intrinsic dimension
of real features. The detectors are used directly on these arrays; the network's own cost
(the same for every detector of one network) is not in the timings.

Scoring: ``--n-test`` images are scored by kNN (``kad_plugins.shallow.KNNDetector`` on the
spatial means of the same maps), by patch kNN's exact search and, where hnswlib is
installed, by its approximate index; the variants take turns (``--repeat`` rounds), so
that contention from other jobs weighs on each alike, and the median round is kept. Wall
and CPU time (``time.process_time``, every thread) per image, and each variant's ratio to
kNN. The approximate index is compared with the exact search: recall@1 (share of
locations whose nearest bank vector it found) and the images' score error.

Fitting: patch kNN fitted on ``--normals`` images (bank ``--bank``), wall and CPU seconds,
and seconds per image (constant when fitting is linear in the number of images).

Coreset: the greedy k-centre that ``sampling="coreset"`` runs (``_greedy_coreset``) on
``--coreset-rows`` locations of such maps (200,000 by default: the pool it searches at
most, as for ``kad fit``'s lesion maps model at 896 px) for a bank of ``--coreset-bank``
(10,000, that model's), wall and CPU seconds and pool locations per CPU second.

Run from the repository root::

    python benchmarks/patch_knn.py                 # the realistic sizes, a few minutes
    python benchmarks/patch_knn.py --smoke         # a few seconds
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def synthetic_maps(n: int, rng: np.random.Generator, side: int, channels: tuple[int, ...],
                   factors: int = 8) -> np.ndarray:
    """``(n, side, side, sum(channels))`` float32: smooth latent factors mixed per block."""
    coarse = max(1, side // 4)
    latent = rng.normal(size=(n, coarse, coarse, factors)).astype(np.float32)
    latent = np.repeat(np.repeat(latent, -(-side // coarse), axis=1), -(-side // coarse),
                       axis=2)[:, :side, :side]
    mixing = np.random.default_rng(12345)  # the same "network" for every call
    parts = [latent @ mixing.normal(size=(factors, c)).astype(np.float32) for c in channels]
    maps = np.concatenate(parts, axis=-1)
    return maps + rng.normal(0, 0.3, size=maps.shape).astype(np.float32)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def patch_detector(index: str, **params):
    from kad_plugins.patch_knn import PatchKNNDetector

    det = PatchKNNDetector(**params)
    if "index" in det.get_params():
        det.set_params(index=index)
    elif index != "exact":
        raise SystemExit("this PatchKNNDetector has no approximate index")
    return det


def has_hnswlib() -> bool:
    try:
        import hnswlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=56)
    parser.add_argument("--channels", default="16,32", help="each block's channels")
    parser.add_argument("--bank", type=int, default=50000)
    parser.add_argument("--n-fit", type=int, default=40, help="normals fitted for scoring")
    parser.add_argument("--n-test", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--normals", default="20,40,80", help="fitting: numbers of normals")
    parser.add_argument("--index", default="auto",
                        help="exact, hnsw or auto (hnsw too when hnswlib is installed)")
    parser.add_argument("--skip-scoring", action="store_true", help="no scoring table")
    parser.add_argument("--skip-fit", action="store_true", help="no fitting table")
    parser.add_argument("--coreset-rows", type=int, default=200_000,
                        help="coreset: locations searched")
    parser.add_argument("--coreset-bank", type=int, default=10_000,
                        help="coreset: locations chosen")
    parser.add_argument("--skip-coreset", action="store_true", help="no coreset timing")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.side, args.bank, args.n_fit, args.n_test = 12, 2000, 10, 4
        args.repeat, args.normals = 1, "5,10"
        args.coreset_rows, args.coreset_bank = 2_000, 200
    channels = tuple(int(c) for c in args.channels.split(","))
    indexes = (["exact", "hnsw"] if args.index == "auto" and has_hnswlib()
               else ["exact"] if args.index == "auto" else args.index.split(","))
    rng = np.random.default_rng(0)
    params = {"bank_size": args.bank, "block_channels": channels}

    if not args.skip_scoring:
        scoring(args, rng, channels, params, indexes)
    if not args.skip_fit:
        fitting(args, rng, channels, params)
    if not args.skip_coreset:
        coreset(args, rng, channels)


def scoring(args, rng: np.random.Generator, channels: tuple[int, ...], params: dict,
            indexes: list[str]) -> None:
    """kNN and patch kNN scoring the same images, taking turns."""
    from kad_plugins.shallow import KNNDetector

    train = synthetic_maps(args.n_fit, rng, args.side, channels)
    test = synthetic_maps(args.n_test, rng, args.side, channels)
    print(f"maps {test.shape[1:]}, blocks {channels}, bank {args.bank}, "
          f"{args.n_fit} normals fitted, {args.n_test} images scored, {args.repeat} rounds")
    knn = KNNDetector().fit(train.mean(axis=(1, 2)))
    patches = {}
    for index in indexes:
        patches[index], wall, cpu = timed(lambda i=index: patch_detector(i, **params).fit(train))
        print(f"  fitted patch kNN ({index}): {wall:.1f} s wall, {cpu:.1f} s CPU")
        if index != "exact":  # the graph is built on first use: timed apart
            _, wall, cpu = timed(lambda i=index: patches[i].anomaly_score(test[:1]))
            print(f"  built its {index} index: {wall:.1f} s wall, {cpu:.1f} s CPU")
    rounds: dict[str, list] = {name: [] for name in ["knn", *indexes]}
    scores = {}
    for _ in range(args.repeat):  # the variants take turns
        _, wall, cpu = timed(lambda: knn.anomaly_score(test.mean(axis=(1, 2))))
        rounds["knn"].append((wall, cpu))
        for index, det in patches.items():
            scores[index], wall, cpu = timed(lambda d=det: d.anomaly_score(test))
            rounds[index].append((wall, cpu))
    per_image = {name: np.median(np.array(r), axis=0) / args.n_test
                 for name, r in rounds.items()}
    print(f"\n{'scoring, per image':24s} {'wall ms':>9s} {'CPU ms':>9s} "
          f"{'wall/kNN':>9s} {'CPU/kNN':>9s}")
    base = per_image["knn"]
    for name, (wall, cpu) in per_image.items():
        label = "kNN (pooled)" if name == "knn" else f"patch kNN ({name})"
        print(f"{label:24s} {1e3 * wall:9.2f} {1e3 * cpu:9.2f} {wall / base[0]:9.1f}x "
              f"{cpu / max(base[1], 1e-9):9.1f}x")
    if "hnsw" in patches and "exact" in patches:
        exact, approx = patches["exact"], patches["hnsw"]
        found = near = 0
        for m in test:
            e, a = exact.distances(m), approx.distances(m)
            found += int(np.sum(np.isclose(a, e, rtol=1e-9, atol=0)))
            near += e.size
        from scipy.stats import spearmanr

        error = np.abs(scores["hnsw"] - scores["exact"])
        print(f"hnsw vs exact: recall@1 {found / near:.4f} (locations x blocks), image "
              f"score error median {np.median(error):.2e}, max {error.max():.2e} "
              f"(score spread {np.std(scores['exact']):.2e}), rank correlation "
              f"{spearmanr(scores['hnsw'], scores['exact']).statistic:.4f}")


def coreset(args, rng: np.random.Generator, channels: tuple[int, ...]) -> None:
    """The greedy coreset's cost at ``--coreset-rows`` locations, ``--coreset-bank``
    chosen: the locations as patch kNN projects them for its bank (the blocks here are
    narrower than ``max_dims``: as they are), searched on 32 random directions."""
    from kad_plugins.patch_knn import _greedy_coreset

    per_map = args.side * args.side
    maps = synthetic_maps(-(-args.coreset_rows // per_map), rng, args.side, channels)
    locations = np.ascontiguousarray(maps.reshape(-1, maps.shape[-1])[:args.coreset_rows])
    chosen, wall, cpu = timed(lambda: _greedy_coreset(locations, args.coreset_bank, 0,
                                                      lambda _: None))
    print(f"\ncoreset: {args.coreset_bank} of {len(locations)} locations "
          f"({locations.shape[1]} channels): {wall:.1f} s wall, {cpu:.1f} s CPU, "
          f"{len(locations) / max(cpu, 1e-9):,.0f} locations per CPU second "
          f"({len(chosen)} chosen)")


def fitting(args, rng: np.random.Generator, channels: tuple[int, ...], params: dict) -> None:
    """Patch kNN fitted on each of ``--normals`` numbers of images."""
    print(f"\n{'fitting, exact':24s} {'wall s':>9s} {'CPU s':>9s} {'wall s/img':>11s} "
          f"{'CPU s/img':>10s}")
    for n in (int(v) for v in args.normals.split(",")):
        maps = synthetic_maps(n, rng, args.side, channels)
        _, wall, cpu = timed(lambda m=maps: patch_detector("exact", **params).fit(m))
        print(f"{n:4d} normals{'':12s} {wall:9.1f} {cpu:9.1f} {wall / n:11.2f} {cpu / n:10.2f}")


if __name__ == "__main__":
    main()
