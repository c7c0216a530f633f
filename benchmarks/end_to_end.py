"""kad end to end (image files to features) against bare OpenVINO inference, per stage.

For each case (a network, an input size and a set of image files) a child process builds
the OpenVINO runtime kad uses (:func:`kad.features.runtime.build_runtime`, warmed up on one
batch) and then times, interleaved ``--repeat`` times:

``bare``
    the compiled model on arrays made in advance: ``runtime.predict`` on the same number
    of full batches, nothing else. The fastest kad can be.
``kad``
    :func:`kad.features.extract.extract_features` from the files on disk to the features
    in a fresh cache folder (decoding, preprocessing, scaling, inference, writing), with
    the warmed-up runtime handed in, so building the network counts for neither.

``ratio`` is kad's images per second over bare inference's, from the medians. CPU time
holds on a shared machine where wall time does not, so the table also gives, in
milliseconds per image (medians): ``bare cpu`` and ``kad cpu``, the whole process (every
thread) during bare inference and during kad's run; ``loader``, the part of kad's spent
in its loader threads (decoding and preprocessing, each slice timed on its thread); and
``bound``, bare cpu over kad cpu, which bounds the ratio when both runs keep every core
busy. Then the CPU time of each stage, one image at a time on one thread: ``decode``
(the file to RGB pixels, large JPEGs decoded reduced as kad does), ``preprocess`` (the
fundus or natural preprocessing and the resize to the input size, the usability check
included) and ``scaling`` (from [0, 1] to the network's input, written into the batch;
where the network scales 8-bit images itself, only the copy into the 8-bit batch).

``--before PATH``: a checkout of another kad version (e.g. ``git worktree add --detach
/tmp/kad-base <commit>``) measured the same way in the same run, with ``PATH`` first on
``PYTHONPATH``: one child per timed repeat, the two versions alternating, so that a
change in the machine's load falls on both.

Cases (``--cases``, comma-separated): ``small224`` MobileNetV2-0.35 at 224 px on CIFAR-10
JPEG images (32 px; unpacked from ``--cifar-tar`` into a temporary folder), ``kaggle448``
the same network at 448 px on the 256 px Kaggle fundus photographs, ``idrid448`` at 448 px
on the 4288x2848 IDRiD photographs, ``irv2_299`` InceptionResNetV2 at 299 px on CIFAR-10
with random weights (the same compute). ``--smoke`` runs one tiny case on a few synthetic
images, in seconds, without ``../shared``.

Run from the repository root::

    python benchmarks/end_to_end.py --before /tmp/kad-base
    python benchmarks/end_to_end.py --cases kaggle448 --n 128 --repeat 5
    python benchmarks/end_to_end.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MNV2_WEIGHTS = (SHARED / "weights"
                / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
RESULT = "KAD_E2E_RESULT "

#: name: (backbone, weights, input size, images, preprocessing, batch size: the most images
#: per network call, lowered as kad lowers it to its memory budget)
CASES = {
    "small224": ("mobilenet_v2:alpha=0.35", str(MNV2_WEIGHTS), 224, "cifar", "natural", 64),
    "kaggle448": ("mobilenet_v2:alpha=0.35", str(MNV2_WEIGHTS), 448, "kaggle", "fundus:size=448",
                  32),
    "idrid448": ("mobilenet_v2:alpha=0.35", str(MNV2_WEIGHTS), 448, "idrid", "fundus:size=448",
                 16),
    "irv2_299": ("inception_resnet_v2", "none", 299, "cifar", "natural", 32),
    "smoke": ("mobilenet_v2:alpha=0.35", "none", 64, "synthetic", "fundus:size=64", 4),
}


# ----------------------------------------------------------------------------- images


def make_images(kind: str, n: int, root: Path, cifar_tar: Path) -> Path:
    """A folder dataset (``root/normal/``) of ``n`` image files of ``kind``."""
    folder = root / kind / "normal"
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "cifar":
        with tarfile.open(cifar_tar) as tar:
            taken = 0
            for member in tar:
                if taken >= n:
                    break
                if member.isfile() and member.name.endswith(".jpg") and "/test/" in member.name:
                    data = tar.extractfile(member).read()
                    (folder / f"{taken:05d}.jpg").write_bytes(data)
                    taken += 1
    elif kind in ("kaggle", "idrid"):
        if kind == "kaggle":
            found = sorted((SHARED / "data" / "kaggle-dr-256" / "images").glob("*.jpeg"))
        else:
            base = SHARED / "data" / "idrid-lesions"
            found = [*sorted((base / "lesion").glob("*.jpg")),
                     *sorted((base / "normal").glob("*.jpg"))]
        if not found:
            raise SystemExit(f"no {kind} photographs under {SHARED / 'data'}")
        for i in range(n):  # cycled where there are fewer
            source = found[i % len(found)]
            (folder / f"{i:05d}{source.suffix}").symlink_to(source)
    else:  # synthetic fundus-like photographs: a bright textured disc on black
        import cv2

        rng = np.random.default_rng(0)
        for i in range(n):
            image = np.zeros((120, 160, 3), np.uint8)
            cv2.circle(image, (80 + i % 7, 60), 50, (40, 90, 200), -1)
            image = cv2.add(image, rng.integers(0, 40, image.shape, dtype=np.uint8))
            cv2.imwrite(str(folder / f"{i:05d}.jpg"), image)
    return folder.parent


# ------------------------------------------------------------------------------ child


def child(args: argparse.Namespace) -> dict:
    import cv2

    import kad.features.runtime as runtime
    from kad.data.datasets import load_dataset
    from kad.features.extract import extract_features, load_preprocessed, plan_extraction
    from kad.features.extraction import _load_batch

    backbone, weights, size, _, prep, batch = CASES[args.case]
    kind = "natural" if prep == "natural" else "fundus"
    dataset = load_dataset("folder", args.images, kind=kind)
    n = len(dataset)
    work = Path(tempfile.mkdtemp(prefix="kad-e2e-", dir=args.tmp_dir))
    try:
        plan = plan_extraction(dataset, backbone, weights, size, prep, work, "openvino")
        try:  # 8-bit batches, scaled inside the compiled model, where this kad has them
            from kad.features.extraction import load_image_pixels, takes_pixels
            pixels = takes_pixels(plan)
        except ImportError:
            pixels = False
        try:  # the images per network call kad itself runs, where this kad bounds them
            from kad.features.batching import network_batch
            batch = network_batch(plan.backbone, size, batch)
        except ImportError:
            pass
        engine = runtime.build_runtime(plan.backbone, size, weights, "openvino", batch,
                                       args.model_cache, **({"pixels": True} if pixels else {}))
        rng = np.random.default_rng(0)
        x = (rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8) if pixels else
             rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
        engine.predict(x)
        runtime.build_runtime = lambda *_a, **_k: engine  # extract_features gets this one
        # The loader threads' own CPU time: every slice they load, timed on its thread.
        import kad.features.extraction as extraction

        loading = [0.0]
        lock = threading.Lock()
        load_into = extraction._load_into

        def timed_load_into(*a, **k):
            cpu = time.thread_time()
            try:
                return load_into(*a, **k)
            finally:
                with lock:
                    loading[0] += time.thread_time() - cpu

        extraction._load_into = timed_load_into
        batches = -(-n // batch)
        bare, bare_cpu, kad, kad_cpu, loader_cpu = [], [], [], [], []
        for r in range(args.repeat):
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(batches):
                engine.predict(x)
            bare.append(batches * batch / (time.perf_counter() - start))
            bare_cpu.append(1000 * (time.process_time() - cpu) / (batches * batch))
            start, cpu, loading[0] = time.perf_counter(), time.process_time(), 0.0
            extract_features(dataset, plan.backbone, weights, size, prep, batch_size=batch,
                             cache_dir=work / f"run{r}", runtime="openvino")
            kad.append(n / (time.perf_counter() - start))
            kad_cpu.append(1000 * (time.process_time() - cpu) / n)
            loader_cpu.append(1000 * loading[0] / n)
        extraction._load_into = load_into
        # Stages: one image at a time, one thread, CPU time.
        cv2.setNumThreads(1)
        source, p = dataset.source, plan.preprocessing
        side = p.source_side(size)
        scaled = getattr(source, "load_scaled", None)

        def decode(i):
            return source.load(i) if scaled is None or side is None else scaled(i, side)

        def stage(work_fn) -> float:
            best = float("inf")
            for _ in range(max(1, args.stage_repeat)):
                cpu = time.process_time()
                work_fn()
                best = min(best, time.process_time() - cpu)
            return 1000 * best / n

        load = load_image_pixels if pixels else load_preprocessed
        t_decode = stage(lambda: [decode(i) for i in range(n)])
        t_prep = stage(lambda: [load(source, i, p, size) for i in range(n)])
        t_load = stage(lambda: _load_batch(source, dataset.ids, plan, 0, n,
                                           **({"pixels": True} if pixels else {})))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"n": n, "batch": batch, "bare": bare, "kad": kad, "bare_cpu": bare_cpu,
            "kad_cpu": kad_cpu, "loader_cpu": loader_cpu, "decode": t_decode,
            "preprocess": t_prep - t_decode,
            "scaling": t_load - t_prep, "inference": statistics.median(bare_cpu),
            "runtime": engine.describe()}


# ----------------------------------------------------------------------------- parent


def spawn(args, case: str, images: Path, version: str, path: Path, model_cache: Path,
          repeat: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(path), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case,
               "--images", str(images), "--model-cache", str(model_cache),
               "--repeat", str(repeat or args.repeat), "--stage-repeat",
               str(args.stage_repeat)]
    if args.tmp_dir:
        command += ["--tmp-dir", args.tmp_dir]
    print(f"running {case} on {version} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=path)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return {"case": case, "version": version, **json.loads(line[len(RESULT):])}
    sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
    raise SystemExit(f"{case} on {version} exited with status {done.returncode}, no result")


def merge(runs: list[dict]) -> dict:
    """One result from children that each timed one repeat: the timed runs together, the
    stages the median of the children's."""
    merged = dict(runs[0])
    for key in ("bare", "kad", "bare_cpu", "kad_cpu", "loader_cpu"):
        merged[key] = [v for r in runs for v in r[key]]
    for key in ("decode", "preprocess", "scaling"):
        merged[key] = statistics.median(r[key] for r in runs)
    merged["inference"] = statistics.median(merged["bare_cpu"])
    return merged


def report(results: list[dict]) -> None:
    header = (f"{'case':<10} {'version':<7} {'images':>6} {'batch':>5} {'bare img/s':>10} "
              f"{'kad img/s':>9} {'ratio':>6} {'bare cpu':>8} {'kad cpu':>7} {'loader':>6} "
              f"{'bound':>5} {'decode':>7} {'preproc':>7} {'scaling':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        bare, kad = statistics.median(r["bare"]), statistics.median(r["kad"])
        bare_cpu, kad_cpu = statistics.median(r["bare_cpu"]), statistics.median(r["kad_cpu"])
        loader = statistics.median(r["loader_cpu"])
        print(f"{r['case']:<10} {r['version']:<7} {r['n']:>6} {r['batch']:>5} {bare:>10.1f} "
              f"{kad:>9.1f} {kad / bare:>6.2f} {bare_cpu:>8.2f} {kad_cpu:>7.2f} {loader:>6.2f} "
              f"{bare_cpu / kad_cpu:>5.2f} {r['decode']:>7.2f} {r['preprocess']:>7.2f} "
              f"{r['scaling']:>7.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="small224,kaggle448,idrid448,irv2_299")
    parser.add_argument("--n", type=int, default=128, help="images per case (default: "
                        "%(default)s; IRV2 and IDRiD take a quarter)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved timed runs")
    parser.add_argument("--stage-repeat", type=int, default=2)
    parser.add_argument("--before", type=Path, help="another kad checkout to compare")
    parser.add_argument("--cifar-tar", type=Path, default=SHARED / "data" / "cifar10-jpeg.tar")
    parser.add_argument("--tmp-dir")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--smoke", action="store_true", help="a few synthetic images, seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.case = args.child
        print(RESULT + json.dumps(child(args)), flush=True)
        return
    if args.smoke:
        args.cases, args.n, args.repeat, args.stage_repeat = "smoke", 8, 1, 1
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"--cases: unknown {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(CASES)}")
    load_before = os.getloadavg()[0]
    versions = [("after", ROOT)] + ([("before", args.before.resolve())] if args.before else [])
    root = Path(tempfile.mkdtemp(prefix="kad-e2e-images-", dir=args.tmp_dir))
    results = []
    try:
        for case in cases:
            kind = CASES[case][3]
            n = args.n if case in ("small224", "kaggle448", "smoke") else max(8, args.n // 4)
            images = make_images(kind, n, root / case, args.cifar_tar)
            model_cache = root / "models" / case
            # Both versions on the same files, before first; with --before, one child per
            # repeat, the versions alternating, so that both see the same machine.
            if len(versions) == 1:
                results.append(spawn(args, case, images, *versions[0], model_cache))
                continue
            runs: dict[str, list[dict]] = {}
            for _ in range(args.repeat):
                for version, path in versions[::-1]:
                    runs.setdefault(version, []).append(
                        spawn(args, case, images, version, path, model_cache, repeat=1))
            results += [merge(found) for found in runs.values()]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{os.cpu_count()} CPUs, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; img/s are wall-clock medians of {args.repeat} "
          f"interleaved runs. CPU ms per image: 'bare cpu' and 'kad cpu' the whole process "
          f"(every thread) during bare inference and during kad's run, 'loader' the loader "
          f"threads' share of kad's, 'bound' bare cpu / kad cpu (the ratio's bound when both "
          f"cores are busy); the stages one image at a time on one thread\n")
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
