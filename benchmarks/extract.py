"""Benchmark kad's feature extraction against a plain ``model.predict``.

Ways of computing the features of every block for the same images, from the same
multi-output extractor model (:meth:`kad.features.backbones.Backbone.build_extractor`):

``kad:keras``, ``kad:openvino``
    :func:`kad.features.extract.extract_features` end to end from the dataset: decoding,
    preprocessing, inference on that runtime (:mod:`kad.features.runtime`) and the writes to the
    cache, into a fresh temporary cache folder. Images are decoded in kad's thread pool
    while the network runs. ``--runtimes`` picks which (default: both).
``predict``
    The images decoded and preprocessed first into one in-memory array (timed separately),
    then one ``model.predict(x, batch_size=...)`` call (timed alone).

Both variants build the model and run one batch through it before timing, so model
construction and graph tracing are counted for neither. Each variant runs in its own
child process (``--variant kad|predict``), which prints one JSON line, so its peak resident
memory (``VmHWM`` from ``/proc/self/status``, else ``ru_maxrss``) is its own; the peak of
anonymous memory (``RssAnon``, sampled) is reported too. Each variant runs at N images and
at ``--scale`` x N images: kad's memory should not depend on N, plain predict needs all
images in memory at once. Every variant's features are compared with those of ``predict``
(Keras float32): the largest difference in each block relative to that block's largest
value, the worst block reported.

``--engines local,shards2,ray1,ray2`` compares instead how the same extraction runs
(the ``engine`` column): ``local`` is one ``extract_features`` process, ``shards2`` two
processes computing ``--shard 0/2`` and ``1/2`` at the same time into one cache folder
(the second to finish merges), ``rayK`` one driver starting a local Ray with this machine's
CPUs and an inference pool of K actors. Every engine is timed from the start of its
processes to the complete, merged entry, model construction and Ray's start included;
peak memory is read per process (``VmHWM`` of every process the run started, Ray's
workers included). The entry is then verified against its checksums (``verify s``), the
cost of the check a later process pays before it uses the features.

Run from the repository root::

    python benchmarks/extract.py                       # digits, no data needed
    python benchmarks/extract.py --data-dir /tmp/cifar10/cifar10-jpeg --n 256
    python benchmarks/extract.py --backbone mobilenet_v2:alpha=0.35 --image-size 96

See ``benchmarks/README.md`` for what the columns mean and measured results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULT_PREFIX = "KAD_BENCH_RESULT "
VARIANTS = ("kad", "predict")
ENGINES = ("local", "shards2", "ray1", "ray2")
RUNTIMES = ("keras", "openvino")


# -- memory -------------------------------------------------------------------------------


def _status_kib() -> dict[str, int]:
    """The ``kB`` fields of ``/proc/self/status`` (empty where there is no /proc)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[key] = int(parts[0])
    except OSError:
        pass
    return fields


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (all of it: anonymous memory and
    mapped files)."""
    hwm = _status_kib().get("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)  # bytes on macOS


def rss_mib() -> float | None:
    return _mib(_status_kib().get("VmRSS"))


class AnonPeak:
    """Samples ``RssAnon`` (heap and stacks, no file pages) in a thread while the block runs.

    ``VmHWM`` also counts the resident pages of memory-mapped files, such as the feature
    cache entry kad writes into: clean page cache the kernel may reclaim, but RSS all the
    same. The anonymous peak shows the memory the process itself allocates.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_kib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        value = _status_kib().get("RssAnon")
        if value is not None and (self.peak_kib is None or value > self.peak_kib):
            self.peak_kib = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> AnonPeak:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def mib(self) -> float | None:
        return _mib(self.peak_kib)


# -- the two variants (child processes) ---------------------------------------------------


def default_dataset(args: argparse.Namespace) -> str:
    return args.dataset or ("cifar10" if args.data_dir else "digits")


def load_images(args: argparse.Namespace, n: int):
    """The first ``n`` images of the dataset (cycled when it holds fewer)."""
    from kad.data.datasets import load_dataset

    dataset = load_dataset(default_dataset(args), args.data_dir)
    if n > len(dataset):
        print(f"note: {dataset.name} holds {len(dataset)} images; repeating them to get {n}",
              file=sys.stderr)
    return dataset.subset(np.arange(n) % len(dataset))


def build_model(args: argparse.Namespace, warm_up):
    """``(backbone, size, model, names, seconds)``: the extractor model, built and run
    once on a batch of zeros by ``warm_up(model, batch)``."""
    from kad.features.backbones import get_backbone

    start = time.perf_counter()
    backbone = get_backbone(args.backbone)
    size = backbone.input_size(args.image_size)
    model, names = backbone.build_extractor(size, args.weights)
    warm_up(model, np.zeros((args.batch_size, size, size, 3), dtype=np.float32))
    return backbone, size, model, names, time.perf_counter() - start


def block_sums(outputs) -> list[float]:
    """Sum of absolute values of every block's features: a cheap fingerprint to check
    that both variants computed the same thing."""
    return [float(np.abs(np.asarray(o, dtype=np.float64)).sum()) for o in outputs]


def dump_features(args: argparse.Namespace, outputs) -> None:
    """Save every block's features for the parent to compare (``--dump``)."""
    if args.dump:
        np.savez(args.dump, *[np.asarray(o, dtype=np.float32) for o in outputs])


def run_kad(args: argparse.Namespace) -> dict:
    """Time :func:`kad.features.extract.extract_features` end to end, ``--repeat`` times."""
    import kad.features.runtime
    from kad.features.backbones import get_backbone
    from kad.features.extract import extract_features

    dataset = load_images(args, args.n)
    start = time.perf_counter()
    backbone = get_backbone(args.backbone)
    size = backbone.input_size(args.image_size)
    model_cache = tempfile.mkdtemp(prefix="kad-bench-models-", dir=args.tmp_dir)
    engine = kad.features.runtime.build_runtime(backbone, size, args.weights, args.runtime,
                                       args.batch_size, model_cache)
    engine.predict(np.zeros((args.batch_size, size, size, 3), dtype=np.float32))
    setup = time.perf_counter() - start
    # extract_features builds its runtime: hand it the warmed-up one.
    kad.features.runtime.build_runtime = lambda *_args, **_kwargs: engine
    base = rss_mib()
    times, cpu, caches = [], [], []
    try:
        with AnonPeak() as anon:
            for _ in range(args.repeat):
                caches.append(tempfile.mkdtemp(prefix="kad-bench-", dir=args.tmp_dir))
                start, start_cpu = time.perf_counter(), time.process_time()
                features = extract_features(
                    dataset, backbone, args.weights, size, batch_size=args.batch_size,
                    workers=args.workers, cache_dir=caches[-1], runtime=args.runtime)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
        peak = peak_rss_mib()  # before the fingerprint below reads the whole entry
        sums = block_sums(features.block(b) for b in features.blocks)
        dump_features(args, (features.block(b) for b in features.blocks))
    finally:
        for cache in [*caches, model_cache]:
            shutil.rmtree(cache, ignore_errors=True)
    return {"run_s": times, "prep_s": None, "setup_s": setup, "base_mib": base,
            "peak_mib": peak, "anon_peak_mib": anon.mib, "sums": sums, "cpu_s": cpu,
            "prep_cpu_s": None}


def run_predict(args: argparse.Namespace) -> dict:
    """Decode and preprocess every image into one array, then time ``model.predict``."""
    from kad.features.extract import load_preprocessed, plan_extraction

    dataset = load_images(args, args.n)
    backbone, size, model, _, setup = build_model(
        args, lambda m, batch: m.predict(batch, batch_size=args.batch_size, verbose=0))
    plan = plan_extraction(dataset, backbone, args.weights, size)
    base = rss_mib()
    times, cpu = [], []
    with AnonPeak() as anon:
        start, start_cpu = time.perf_counter(), time.process_time()
        x = np.empty((args.n, size, size, 3), dtype=np.float32)
        for i in range(args.n):
            x[i] = load_preprocessed(dataset.source, i, plan.preprocessing, size)
        for lo in range(0, args.n, args.batch_size):  # in slices: no full-size temporaries
            x[lo:lo + args.batch_size] = backbone.preprocess(x[lo:lo + args.batch_size])
        prep, prep_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        for _ in range(args.repeat):
            outputs = None
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs = model.predict(x, batch_size=args.batch_size, verbose=0)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    peak = peak_rss_mib()
    sums = block_sums(outputs)
    dump_features(args, outputs)
    return {"run_s": times, "prep_s": prep, "setup_s": setup, "base_mib": base,
            "peak_mib": peak, "anon_peak_mib": anon.mib, "sums": sums, "cpu_s": cpu,
            "prep_cpu_s": prep_cpu}


# -- engines: local, shards, Ray ----------------------------------------------------------


def run_engine(args: argparse.Namespace) -> dict:
    """One engine's extraction (a child process; a shard runs as one child of two)."""
    from kad.features.cache import verify_entry
    from kad.features.extract import extract_features, plan_extraction

    dataset = load_images(args, args.n)
    options = {"batch_size": args.batch_size, "cache_dir": args.cache, "workers": args.workers}
    start = time.perf_counter()
    if args.variant == "shard":
        from kad.features.shards import parse_shard

        features = extract_features(dataset, args.backbone, args.weights, args.image_size,
                                    shard=parse_shard(args.shard), **options)
    elif args.variant.startswith("ray"):
        import ray

        from kad.features.ray_engine import extract_with_ray

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
        plan = plan_extraction(dataset, args.backbone, args.weights, args.image_size,
                               cache_dir=args.cache)
        features = extract_with_ray(dataset, plan, batch_size=args.batch_size,
                                    actors=int(args.variant[3:]))
        ray.shutdown()
    else:
        features = extract_features(dataset, args.backbone, args.weights, args.image_size,
                                    **options)
    seconds = time.perf_counter() - start
    result = {"extract_s": seconds, "merged": "shard" not in features.meta}
    if result["merged"]:
        checked = verify_entry(features.path)
        result.update(verify_s=checked.seconds, verify_bytes=checked.bytes_read,
                      ok=checked.ok, sums=block_sums(features.block(b)
                                                     for b in features.blocks))
    return result


def _children(root: int) -> set[int]:
    """``root`` and every process below it, from ``/proc``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = {root}, [root]
    while todo:
        pid = todo.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def spawn_engine(args: argparse.Namespace, engine: str) -> dict:
    """Run one engine in fresh processes; wall time to the complete entry and the peak
    memory of every process it started."""
    cache = tempfile.mkdtemp(prefix="kad-bench-", dir=args.tmp_dir)
    base = child_command(args, "local", args.n) + ["--cache", cache]
    if engine == "shards2":
        commands = [base[:base.index("--variant") + 1] + ["shard"]
                    + base[base.index("--variant") + 2:] + ["--shard", f"{i}/2"]
                    for i in range(2)]
    else:
        commands = [base[:base.index("--variant") + 1] + [engine]
                    + base[base.index("--variant") + 2:]]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    print(f"running engine {engine} on {args.n} images ...", file=sys.stderr, flush=True)
    peaks: dict[int, int] = {}
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for c in commands]
    outputs = [[] for _ in procs]
    readers = [threading.Thread(target=lambda p=p, o=o: o.append(p.communicate()))
               for p, o in zip(procs, outputs, strict=True)]
    for reader in readers:
        reader.start()
    while any(p.poll() is None for p in procs):
        for proc in procs:
            for pid in _children(proc.pid):
                value = _hwm_kib(pid)
                if value is not None:
                    peaks[pid] = max(peaks.get(pid, 0), value)
        time.sleep(0.2)
    wall = time.perf_counter() - start
    for reader in readers:
        reader.join()
    shutil.rmtree(cache, ignore_errors=True)
    results = []
    for proc, ((stdout, stderr),) in zip(procs, outputs, strict=True):
        lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
        if not lines:
            sys.stderr.write(stdout[-3000:] + stderr[-3000:])
            raise SystemExit(f"engine {engine} exited with status {proc.returncode} and no "
                             f"result")
        results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
    merged = next(r for r in results if r["merged"])
    return {"engine": engine, "n": args.n, "wall_s": wall, "processes": len(peaks),
            "max_process_mib": max(peaks.values()) / 1024.0,
            "sum_process_mib": sum(peaks.values()) / 1024.0, **merged}


def print_engines(results: list[dict]) -> None:
    header = (f"{'engine':<8} {'images':>6} {'wall s':>7} {'img/s':>7} {'x local':>7} "
              f"{'procs':>5} {'max MiB':>8} {'sum MiB':>8} {'verify s':>8} {'GB/s':>5}")
    print(header)
    print("-" * len(header))
    local = next((r for r in results if r["engine"] == "local"), results[0])
    for r in results:
        rate = r["n"] / r["wall_s"]
        print(f"{r['engine']:<8} {r['n']:>6} {r['wall_s']:>7.1f} {rate:>7.2f} "
              f"{rate / (local['n'] / local['wall_s']):>7.2f} {r['processes']:>5} "
              f"{r['max_process_mib']:>8.0f} {r['sum_process_mib']:>8.0f} "
              f"{r['verify_s']:>8.3f} {r['verify_bytes'] / r['verify_s'] / 1e9:>5.2f}")
    print()
    for r in results:
        same = np.allclose(r["sums"], local["sums"], rtol=0, atol=0)
        print(f"{r['engine']}: entry verified {'ok' if r['ok'] else 'DAMAGED'}, features "
              f"{'identical to' if same else 'DIFFERENT from'} local; checking the "
              f"checksums costs {100 * r['verify_s'] / r['wall_s']:.1f}% of the extraction")


# -- the driver ---------------------------------------------------------------------------


def variants(args: argparse.Namespace) -> list[str]:
    return [f"kad:{r}" for r in args.runtimes] + ["predict"]


def child_command(args: argparse.Namespace, variant: str, n: int,
                  dump: Path | None = None) -> list[str]:
    kind, _, runtime = variant.partition(":")
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", kind,
               "--runtime", runtime or "keras",
               "--n", str(n), "--backbone", args.backbone, "--weights", str(args.weights),
               "--batch-size", str(args.batch_size), "--repeat", str(args.repeat),
               "--dataset", default_dataset(args)]
    for flag, value in (("--data-dir", args.data_dir), ("--image-size", args.image_size),
                        ("--workers", args.workers), ("--tmp-dir", args.tmp_dir),
                        ("--dump", dump)):
        if value is not None:
            command += [flag, str(value)]
    return command


def spawn(args: argparse.Namespace, variant: str, n: int, dump: Path | None = None) -> dict:
    """Run one variant in a fresh Python process and return its JSON result."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    print(f"running {variant} on {n} images ...", file=sys.stderr, flush=True)
    done = subprocess.run(child_command(args, variant, n, dump), capture_output=True,
                          text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return {"variant": variant, "n": n, **json.loads(line[len(RESULT_PREFIX):])}
    sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
    raise SystemExit(f"the {variant} child exited with status {done.returncode} and no result")


def warm_page_cache(args: argparse.Namespace, n: int) -> None:
    """Read the image files once so that neither variant pays for the first disk read."""
    from kad.data.datasets import FileSource

    source = load_images(args, n).source
    if isinstance(source, FileSource):
        for path in source.paths:
            path.read_bytes()


def throughput(result: dict) -> float:
    return result["n"] / min(result["run_s"])


def cpu_per_image(result: dict) -> float:
    """CPU milliseconds (every thread of the process) per image in the fastest timed run:
    on a shared machine, what the work costs, whatever share of the cores it got."""
    fastest = int(np.argmin(result["run_s"]))
    return 1000.0 * result["cpu_s"][fastest] / result["n"]


def _fmt(value: float | None, width: int, digits: int) -> str:
    return "-".rjust(width) if value is None else f"{value:{width}.{digits}f}"


def agreement(dumps: dict[str, Path], reference: str = "predict") -> dict[str, float]:
    """For every variant: the largest difference from the reference's features, in each
    block relative to that block's largest absolute value, worst block."""
    with np.load(dumps[reference]) as ref:
        expected = [ref[k] for k in sorted(ref.files, key=lambda k: int(k.split("_")[1]))]
    found = {}
    for variant, path in dumps.items():
        with np.load(path) as got:
            blocks = [got[k] for k in sorted(got.files, key=lambda k: int(k.split("_")[1]))]
        found[variant] = max(float(np.abs(b - a).max() / max(np.abs(a).max(), 1e-12))
                             for a, b in zip(expected, blocks, strict=True))
    return found


def print_report(args: argparse.Namespace, results: list[dict],
                 errors: dict[str, float] | None = None) -> None:
    header = (f"{'variant':<13} {'images':>6} {'setup s':>8} {'prep s':>7} {'run s':>7} "
              f"{'img/s':>7} {'e2e img/s':>9} {'cpu ms/img':>10} {'base MiB':>9} "
              f"{'peak MiB':>9} {'anon MiB':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        run = min(r["run_s"])
        e2e = r["n"] / (run + (r["prep_s"] or 0.0))
        print(f"{r['variant']:<13} {r['n']:>6} {r['setup_s']:>8.1f} "
              f"{_fmt(r['prep_s'], 7, 1)} {run:>7.2f} {throughput(r):>7.2f} {e2e:>9.2f} "
              f"{cpu_per_image(r):>10.1f} {_fmt(r['base_mib'], 9, 0)} "
              f"{r['peak_mib']:>9.0f} {_fmt(r['anon_peak_mib'], 9, 0)}")
    by = {(r["variant"], r["n"]): r for r in results}
    n, big = args.n, args.n * args.scale
    plain = by[("predict", n)]
    e2e_plain = n / (min(plain["run_s"]) + plain["prep_s"])
    print()
    for variant in variants(args)[:-1]:
        kad = by[(variant, n)]
        print(f"{variant} end to end / plain predict: "
              f"{throughput(kad) / throughput(plain):.2f}x; / plain preprocess + predict: "
              f"{throughput(kad) / e2e_plain:.2f}x; CPU time per image, plain predict / "
              f"{variant}: {cpu_per_image(plain) / cpu_per_image(kad):.2f}x")
    if args.scale > 1:
        for variant in variants(args):
            ratio = by[(variant, big)]["peak_mib"] / by[(variant, n)]["peak_mib"]
            print(f"peak memory {variant}({args.scale}N) / {variant}(N): {ratio:.2f}x")
        for variant in variants(args)[:-1]:
            anon = [by[(variant, m)]["anon_peak_mib"] for m in (n, big)]
            if None not in anon:
                print(f"peak anonymous memory {variant}({args.scale}N) / {variant}(N): "
                      f"{anon[1] / anon[0]:.2f}x")
    for variant, error in (errors or {}).items():
        if variant != "predict":
            print(f"features {variant} vs Keras predict: largest difference {error:.1e} of "
                  f"the block's scale ({'ok' if error <= 1e-4 else 'ABOVE 1e-4'})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="kad feature extraction vs plain model.predict: throughput and peak "
                    "memory, on the same images.")
    parser.add_argument("--dataset", help="kad dataset name (default: cifar10 with "
                        "--data-dir, else the embedded digits)")
    parser.add_argument("--data-dir", help="dataset folder, e.g. a CIFAR-10 image-folder "
                        "export holding train/<class>/ and test/<class>/")
    parser.add_argument("--backbone", default="inception_resnet_v2",
                        help="backbone spec (default: %(default)s)")
    parser.add_argument("--weights", default="none", help="'none' (random: same compute), "
                        "'imagenet' or a weights file (default: %(default)s)")
    parser.add_argument("--image-size", type=int,
                        help="input size in pixels (default: the backbone's native size)")
    parser.add_argument("--n", type=int, default=256, help="images (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=2, help="also run on scale x N images "
                        "to compare peak memory; 1 skips it (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="kad runtimes to time, comma-separated (default: %(default)s)")
    parser.add_argument("--workers", type=int, help="kad's decoding threads (default: kad's)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed runs per child; the fastest counts (default: %(default)s)")
    parser.add_argument("--tmp-dir", help="where kad's temporary cache goes (default: the "
                        "system's temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--engines", help="compare engines instead: a comma-separated list "
                        f"of {', '.join(ENGINES)}")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # children
    parser.add_argument("--runtime", default="keras", help=argparse.SUPPRESS)  # children
    parser.add_argument("--dump", type=Path, help=argparse.SUPPRESS)  # children
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="8 digits at 32 px through "
                        "MobileNetV2-0.35 on OpenVINO and Keras predict, in seconds")
    args = parser.parse_args(argv)
    if args.smoke and not args.variant:
        args.backbone, args.image_size, args.n, args.scale = "mobilenet_v2:alpha=0.35", 32, 8, 1
        args.batch_size, args.runtimes = 4, "openvino"
    args.runtimes = [r.strip() for r in str(args.runtimes).split(",") if r.strip()]
    unknown = set(args.runtimes) - set(RUNTIMES)
    if unknown:
        parser.error(f"--runtimes: unknown {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(RUNTIMES)}")
    if args.n < 1 or args.scale < 1 or args.batch_size < 1 or args.repeat < 1:
        parser.error("--n, --scale, --batch-size and --repeat must be at least 1")
    if args.engines and set(args.engines.split(",")) - set(ENGINES):
        parser.error(f"--engines takes {', '.join(ENGINES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.variant:
        run = {"kad": run_kad, "predict": run_predict}.get(args.variant, run_engine)
        print(RESULT_PREFIX + json.dumps(run(args)), flush=True)
        return
    if args.engines:
        warm_page_cache(args, args.n)
        results = [spawn_engine(args, e) for e in args.engines.split(",")]
        print(f"\ndataset {default_dataset(args)}, backbone {args.backbone}, weights "
              f"{args.weights}, batch {args.batch_size}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}\n")
        print_engines(results)
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                             "results": results}, indent=1))
        return
    sizes = [args.n] + ([args.n * args.scale] if args.scale > 1 else [])
    warm_page_cache(args, max(sizes))
    dumps_dir = Path(tempfile.mkdtemp(prefix="kad-bench-features-", dir=args.tmp_dir))
    try:
        results, dumps = [], {}
        for n in sizes:
            for variant in variants(args):  # interleaved: the load hits every variant alike
                dump = dumps_dir / f"{variant.replace(':', '-')}.npz" if n == args.n else None
                results.append(spawn(args, variant, n, dump))
                if dump is not None:
                    dumps[variant] = dump
        errors = agreement(dumps)
    finally:
        shutil.rmtree(dumps_dir, ignore_errors=True)
    print(f"\ndataset {default_dataset(args)}, backbone {args.backbone}, weights "
          f"{args.weights}, batch {args.batch_size}, {os.cpu_count()} CPUs\n")
    print_report(args, results, errors)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
