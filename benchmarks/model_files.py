"""What a model file without pickle costs: save and load times and file sizes of kad's
format against ``pickle`` of the same fitted detector, side by side in one run.

For every shallow built-in detector (or those named with ``--detectors``), fitted on
``--n`` random feature vectors of ``--dim`` dimensions (about the size of
Inception-ResNet-v2's pooled blocks), the script times, best of ``--repeat``:

* ``kad``: :meth:`BaseDetector.save` to a file and :func:`load_detector` from it;
* ``pickle``: ``pickle.dump`` to a file and ``pickle.load`` from it (what format 1 did,
  without its zip and manifest).

It checks that both reloaded detectors score the training data bit-identically to the
fitted one, and prints the ratios kad / pickle. Run: ``python benchmarks/model_files.py``.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np


def best_of(repeat: int, func) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", default="iforest,ocsvm,knn,mahalanobis")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true",
                        help="two detectors on 200 x 16 features, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.detectors, args.n, args.dim, args.repeat = "iforest,knn", 200, 16, 1

    from kad.detectors.base import load_detector
    from kad.registry import get_detector
    from kad.utils.artifact import library_versions

    x = np.random.default_rng(0).normal(size=(args.n, args.dim)).astype(np.float32)
    print(f"{args.n} x {args.dim} float32 features, best of {args.repeat}; "
          f"{library_versions()}")
    header = (f"{'detector':<12}{'kad save s':>11}{'pickle s':>10}{'ratio':>7}"
              f"{'kad load s':>12}{'pickle s':>10}{'ratio':>7}{'kad MiB':>9}{'pickle MiB':>11}"
              f"{'ratio':>7}")
    print(header)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.detectors.split(","):
            det = get_detector(name).fit(x)
            expected = det.anomaly_score(x)
            kad_file, pkl_file = Path(folder) / f"{name}.kad", Path(folder) / f"{name}.pkl"

            def pickle_save(det=det, pkl_file=pkl_file):
                with open(pkl_file, "wb") as fh:
                    pickle.dump(det, fh, protocol=pickle.HIGHEST_PROTOCOL)

            def pickle_load(pkl_file=pkl_file):
                with open(pkl_file, "rb") as fh:
                    return pickle.load(fh)

            kad_save = best_of(args.repeat, lambda det=det, f=kad_file: det.save(f))
            pkl_save = best_of(args.repeat, pickle_save)
            kad_load = best_of(args.repeat, lambda f=kad_file: load_detector(f))
            pkl_load = best_of(args.repeat, pickle_load)
            for loaded in (load_detector(kad_file), pickle_load()):
                np.testing.assert_array_equal(loaded.anomaly_score(x), expected)
            kad_mib = kad_file.stat().st_size / 2**20
            pkl_mib = pkl_file.stat().st_size / 2**20
            print(f"{name:<12}{kad_save:>11.3f}{pkl_save:>10.3f}{kad_save / pkl_save:>7.1f}"
                  f"{kad_load:>12.3f}{pkl_load:>10.3f}{kad_load / pkl_load:>7.1f}"
                  f"{kad_mib:>9.2f}{pkl_mib:>11.2f}{kad_mib / pkl_mib:>7.2f}")
    print("scores after reloading: bit-identical for both formats")


if __name__ == "__main__":
    main()
