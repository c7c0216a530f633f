"""CPU time per image of kad's decoding and preprocessing, on one core.

What :func:`kad.features.extract.load_preprocessed` costs for one image, from the file to the
network's input size, with OpenCV limited to one thread and CPU time (not wall time)
measured, so the numbers hold on a machine shared with other jobs:

``fundus 256``
    Kaggle fundus photographs as stored (256 px JPEG), fundus preprocessing.
``fundus full-size``
    3888x2592 JPEG photographs made from them the way a fundus camera frames them (the
    fundus enlarged to 2300 px, off-centre on black, quality 95), fundus preprocessing.
    Decoded in full (``full decode``: ``source.load``) and at the reduced size kad uses
    (``kad``: ``source.load_scaled`` where the library has it), side by side.
``natural 224``
    CIFAR-10 JPEG images (32 px) to 224 px, natural preprocessing.

Run from the repository root (needs ``../shared``)::

    python benchmarks/preprocess.py
    python benchmarks/preprocess.py --n 200 --full-size 8

To measure an older kad the same way, put its source first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
KAGGLE = SHARED / "data" / "kaggle-dr-256" / "images"
CIFAR_TAR = SHARED / "data" / "cifar10-jpeg.tar"


def full_size_photograph(rgb: np.ndarray, path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    canvas = np.zeros((2592, 3888, 3), np.uint8)
    big = cv2.resize(rgb, (2300, 2300), interpolation=cv2.INTER_LINEAR)
    top, left = int(rng.integers(0, 292)), int(rng.integers(200, 1500))
    canvas[top:top + 2300, left:left + 2300] = big[: 2592 - top]
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
    path.write_bytes(data.tobytes())


def cpu_ms_per_image(work, items, repeat: int) -> float:
    """The smallest, over ``repeat`` passes, CPU milliseconds per item of ``work(item)``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for item in items:
            work(item)
        best = min(best, (time.process_time() - start) / len(items) * 1000.0)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="256 px and CIFAR images")
    parser.add_argument("--full-size", type=int, default=6, help="full-size photographs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--smoke", action="store_true", help="a few images, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.full_size, args.repeat = 4, 2, 1
    if not KAGGLE.is_dir():
        raise SystemExit(f"needs the Kaggle images at {KAGGLE}")

    import kad
    from kad.data.datasets import FileSource
    from kad.data.images import read_image
    from kad.data.preprocessing import Fundus, Natural
    from kad.features.extract import load_preprocessed

    cv2.setNumThreads(1)
    size = args.input_size
    kaggle = sorted(KAGGLE.glob("*.jpeg"))[:: max(1, 4000 // args.n)][: args.n]
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="kad-bench-prep-") as tmp:
        tmp = Path(tmp)
        fundus_source = FileSource(kaggle)
        rows.append(("fundus 256", "kad", cpu_ms_per_image(
            lambda i: load_preprocessed(fundus_source, i, Fundus(), size),
            range(len(kaggle)), args.repeat)))

        full = []
        for i, path in enumerate(kaggle[: args.full_size]):
            full.append(tmp / f"full{i}.jpg")
            full_size_photograph(read_image(path), full[-1], seed=i)
        source = FileSource(full)
        prep = Fundus()
        rows.append(("fundus full-size", "full decode", cpu_ms_per_image(
            lambda i: load_preprocessed(_Whole(source), i, prep, size),
            range(len(full)), args.repeat)))
        rows.append(("fundus full-size", "kad", cpu_ms_per_image(
            lambda i: load_preprocessed(source, i, prep, size),
            range(len(full)), args.repeat)))
        rows.append(("  of which decode", "full decode", cpu_ms_per_image(
            source.load, range(len(full)), args.repeat)))

        if CIFAR_TAR.is_file():
            with tarfile.open(CIFAR_TAR) as tar:
                members = []
                for member in tar:
                    if member.isfile() and member.name.endswith(".jpg"):
                        members.append(member)
                    if len(members) == args.n:
                        break
                tar.extractall(tmp, members=members, filter="data")
            cifar = FileSource([tmp / m.name for m in members])
            rows.append(("natural 224", "kad", cpu_ms_per_image(
                lambda i: load_preprocessed(cifar, i, Natural(), size),
                range(len(cifar)), args.repeat)))

    print(f"kad {kad.__version__} from {Path(kad.__file__).parent}, OpenCV {cv2.__version__}, "
          f"one thread, network input {size} px")
    print(f"{'images':<18} {'decoding':<12} {'CPU ms/image':>12}")
    for name, how, ms in rows:
        print(f"{name:<18} {how:<12} {ms:>12.2f}")
    by = {(name, how): ms for name, how, ms in rows}
    if ("fundus full-size", "kad") in by:
        ratio = by[("fundus full-size", "full decode")] / by[("fundus full-size", "kad")]
        print(f"full-size photographs, full decode / kad: {ratio:.2f}x")


class _Whole:
    """A source that always decodes in full: the same files without ``load_scaled``."""

    def __init__(self, source):
        self.source = source

    def load(self, i: int) -> np.ndarray:
        return self.source.load(i)

    def describe(self, i: int) -> str:
        return self.source.describe(i)


if __name__ == "__main__":
    sys.exit(main())
