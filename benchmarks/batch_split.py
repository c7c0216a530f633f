"""Images per OpenVINO call: the same network at batches that do and do not split evenly
into its inference requests.

OpenVINO's runtime in kad splits each batch into one slice per inference request, the last
padded (:class:`kad.features.runtime.OpenVINORuntime`). A batch of 17 on two requests runs
two slices of 9, one image of them padding; kad's memory bound
(:mod:`kad.features.batching`) therefore rounds a lowered batch down to a multiple of 4.
This script builds the network once per batch, feeds each the same random 8-bit images
(the network's 8-bit input, as the loader feeds it), taking turns ``--repeat`` times, and
prints for each batch the median images per second, the median CPU time per image (every
thread) and the ratio of its rate to the first batch's.

Run from the repository root::

    python benchmarks/batch_split.py                         # MobileNetV2-0.35, 448 px: 17, 16
    python benchmarks/batch_split.py --size 299 --backbone inception_resnet_v2 --weights none \
        --batches 31,28
    python benchmarks/batch_split.py --smoke                 # 64 px, a few seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WEIGHTS = (ROOT.parent / "shared" / "weights"
           / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v2:alpha=0.35")
    parser.add_argument("--weights", default=str(WEIGHTS) if WEIGHTS.exists() else "none")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batches", default="17,16", help="batches to compare, the first "
                                                          "the reference")
    parser.add_argument("--images", type=int, default=272, help="images per timed round")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="64 px, a few images, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.images, args.repeat, args.batches = 64, 24, 1, "5,4"

    from kad.features.backbones import get_backbone
    from kad.features.runtime import build_runtime

    backbone = get_backbone(args.backbone)
    batches = [int(b) for b in args.batches.split(",")]
    cache = tempfile.mkdtemp(prefix="kad-batch-split-")
    runtimes = {b: build_runtime(backbone, args.size, args.weights, "openvino", b,
                                 cache_dir=cache, pixels=True) for b in batches}
    rng = np.random.default_rng(0)
    images = {b: rng.integers(0, 256, (b, args.size, args.size, 3), dtype=np.uint8)
              for b in batches}
    rates = {b: [] for b in batches}
    cpu = {b: [] for b in batches}
    for b in batches:  # warm-up: the first call compiles and allocates
        runtimes[b].predict(images[b])
    for _ in range(args.repeat):
        for b in batches:
            done, began, cpu_began = 0, time.perf_counter(), time.process_time()
            while done < args.images:
                runtimes[b].predict(images[b])
                done += b
            rates[b].append(done / (time.perf_counter() - began))
            cpu[b].append(1000 * (time.process_time() - cpu_began) / done)
    print(f"{backbone.spec} at {args.size} px, {args.images} images per round, "
          f"{args.repeat} rounds taking turns, medians")
    print(f"{'batch':>5}  {'img/s':>7}  {'CPU ms/img':>10}  {'rate / first':>12}  runtime")
    first = float(np.median(rates[batches[0]]))
    for b in batches:
        rate = float(np.median(rates[b]))
        print(f"{b:>5}  {rate:>7.1f}  {float(np.median(cpu[b])):>10.2f}  {rate / first:>12.2f}  "
              f"{runtimes[b].describe()}")


if __name__ == "__main__":
    main()
