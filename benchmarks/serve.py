"""``kad serve`` under load, on the loopback interface: failures, latency and throughput
against ``kad score`` on the same images, then the same with malformed uploads mixed in.

What it does, from the repository root:

1. Fits a model with ``kad fit`` on ``--n-fit`` normal photographs (the first grade-0
   images of ``../shared/data/kaggle-dr-256``; synthetic gradients without it), with
   MobileNetV2-0.35 and the ImageNet weights of ``../shared/weights`` (random weights,
   ``--weights none``, without them) at ``--image-size`` px, ``--batch-size`` images a
   batch. The next ``--n-images`` photographs are the images sent.
2. Measures ``kad score``'s throughput on those images: :meth:`Pipeline.score` over them,
   repeated to ``--score-images`` (256) images, in a child process (the model
   loaded and its network run once before timing, as a running service has). It runs
   before and after the service phases and the median is kept, so that the two share the
   machine's load alike.
3. Starts ``kad serve`` on 127.0.0.1 in a child process and runs ``--clients`` concurrent
   clients (httpx2), each sending ``--requests`` requests of one image in turn. It
   reports failed requests (not 200, or an image not scored, or a score different from
   ``kad score``'s for that file: must be 0), p50 and p99 latency, throughput, and the
   throughput as a ratio of ``kad score``'s.
4. Runs the clients again, a quarter as many requests each, while as many more clients
   send malformed uploads in turn (a body that is not multipart, a truncated JPEG, a body
   over the size limit, an unexpected form field): the good requests must still all
   succeed; the malformed ones must get their 4xx refusals (or, for the truncated JPEG, an
   ``unreadable`` row), never a 5xx.

Run::

    python benchmarks/serve.py                 # 8 clients x 200 requests, a few minutes
    python benchmarks/serve.py --smoke         # 2 clients x 4 requests, tiny model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DR = SHARED / "data" / "kaggle-dr-256"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "TF_CPP_MIN_LOG_LEVEL": "3"}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _kad(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kad", *args], check=True, env=_env(),
                   stdout=subprocess.DEVNULL)


def prepare(work: Path, n_fit: int, n_images: int) -> tuple[Path, list[Path], str]:
    """``(folder to fit on, images to send, where they come from)``."""
    import shutil

    normal = work / "fit" / "normal"
    normal.mkdir(parents=True)
    sent = work / "sent"
    sent.mkdir()
    if (DR / "trainLabels.csv").is_file():
        lines = (DR / "trainLabels.csv").read_text().splitlines()[1:]
        healthy = [row.split(",")[0] for row in lines if row.strip().endswith(",0")]
        for name in healthy[:n_fit]:
            shutil.copy(DR / "images" / f"{name}.jpeg", normal)
        for name in healthy[n_fit:n_fit + n_images]:
            shutil.copy(DR / "images" / f"{name}.jpeg", sent)
        where = "kaggle-dr-256 grade-0 photographs (256 px JPEG)"
    else:
        import cv2

        rng = np.random.default_rng(0)
        for i in range(n_fit + n_images):
            image = np.linspace(40, 200, 64)[None, :, None] + rng.normal(0, 8, (64, 64, 3))
            folder = normal if i < n_fit else sent
            cv2.imwrite(str(folder / f"{i}.png"), np.clip(image, 0, 255).astype(np.uint8))
        where = "synthetic 64 px gradients (../shared is absent)"
    return work / "fit", sorted(sent.iterdir()), where


# ----------------------------------------------------------------- kad score, child process


def score_child(model: str, files: list[str], total: int) -> None:
    """Print ``{"seconds", "images", "scores"}``: Pipeline.score over ``files`` repeated
    to ``total`` images, after one warm-up batch."""
    from kad.data.datasets import FileSource
    from kad.screening.pipeline import load_pipeline

    pipeline = load_pipeline(model)
    pipeline.score(FileSource(files[:1]))  # network built and run once, as in a service
    repeated = [files[i % len(files)] for i in range(total)]
    began = time.perf_counter()
    result = pipeline.score(FileSource(repeated))
    seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "images": total,
                      "scores": {f: float(s) for f, s in zip(repeated, result.scores,
                                                             strict=True)}}))


def kad_score(model: Path, files: list[Path], total: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--score-child", str(model),
                           "--total", str(total), *map(str, files)],
                          capture_output=True, text=True, env=_env(), check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, args, log: Path) -> subprocess.Popen:
    """``kad serve`` in a child process, its log (one line per request) in ``log``."""
    with open(log, "w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "kad", "serve", str(model), "--port", str(port),
             "--max-wait-ms", str(args.max_wait_ms), "--max-upload-mb", "4",
             "--max-concurrent", str(4 * args.clients)],
            env=_env(), stdout=subprocess.DEVNULL, stderr=sink)
    import httpx2

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kad serve stopped: {log.read_text()[-2000:]}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx2.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("kad serve did not answer within 300 s")


async def good_client(http, url: str, files: list[Path], n: int, offset: int,
                      expected: dict, out: list) -> None:
    for k in range(n):
        path = files[(offset + k) % len(files)]
        began = time.perf_counter()
        ok = False
        try:
            answer = await http.post(url, files=[("image", (path.name, path.read_bytes(),
                                                            "image/jpeg"))])
            image = answer.json()["images"][0] if answer.status_code == 200 else {}
            ok = image.get("status") == "scored" and image.get("score") == expected[str(path)]
        except Exception:  # noqa: BLE001 (a failed request is counted, whatever it was)
            ok = False
        out.append((time.perf_counter() - began, ok))


MALFORMED = ("not multipart", "truncated JPEG", "over the size limit", "unexpected field")


async def bad_client(http, url: str, sample: bytes, n: int, offset: int, out: list) -> None:
    over = sample * (5 * 2**20 // len(sample) + 1)  # just over the service's 4 MiB
    for k in range(n):
        kind = MALFORMED[(offset + k) % len(MALFORMED)]
        if kind == "not multipart":
            answer = await http.post(url, content=b"\xff\xd8" + sample[:500],
                                     headers={"content-type": "image/jpeg"})
        elif kind == "truncated JPEG":
            answer = await http.post(url, files=[("image", ("cut.jpg", sample[:len(sample) // 2],
                                                            "image/jpeg"))])
        elif kind == "over the size limit":
            answer = await http.post(url, files=[("image", ("big.jpg", over,
                                                            "image/jpeg"))])
        else:
            answer = await http.post(url, files=[("photo", ("a.jpg", sample, "image/jpeg"))])
        unreadable = (answer.status_code == 200
                      and answer.json()["images"][0]["status"] == "unreadable")
        out.append((kind, answer.status_code, unreadable or 400 <= answer.status_code < 500))


async def load(port: int, files: list[Path], expected: dict, clients: int, requests: int,
               bad_clients: int = 0) -> tuple[list, list, float]:
    import httpx2

    url = f"http://127.0.0.1:{port}/score"
    good: list = []
    bad: list = []
    limits = httpx2.Limits(max_connections=clients + bad_clients + 4)
    async with httpx2.AsyncClient(timeout=120, limits=limits) as http:
        sample = files[0].read_bytes()
        began = time.perf_counter()
        await asyncio.gather(
            *(good_client(http, url, files, requests, c * requests, expected, good)
              for c in range(clients)),
            *(bad_client(http, url, sample, requests, c, bad) for c in range(bad_clients)))
        seconds = time.perf_counter() - began
    return good, bad, seconds


def summary(good: list, seconds: float) -> dict:
    latencies = sorted(1000 * t for t, _ in good)
    return {"requests": len(good), "failed": sum(not ok for _, ok in good),
            "p50_ms": statistics.median(latencies),
            "p99_ms": float(np.percentile(latencies, 99)),
            "img_per_s": len(good) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--n-fit", type=int, default=60)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--score-images", type=int, default=256,
                        help="images kad score's throughput is measured on (the sent ones, "
                             "repeated)")
    parser.add_argument("--smoke", action="store_true", help="2 clients x 4 requests, 32 px")
    parser.add_argument("--score-child", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_child:
        score_child(args.score_child, args.files, args.total)
        return
    if args.smoke:
        args.clients, args.requests, args.n_fit, args.n_images = 2, 4, 30, 4
        args.image_size, args.batch_size = 32, 2
    weights = str(WEIGHTS) if WEIGHTS.is_file() and not args.smoke else "none"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder, files, where = prepare(work, args.n_fit, args.n_images)
        model = work / "model.kad"
        _kad("fit", "--dataset", "folder:kind=natural" if args.smoke else "folder",
             "--data-dir", str(folder), "--backbone", "mobilenet_v2:alpha=0.35", "--weights",
             weights, "--image-size", str(args.image_size), "--batch-size",
             str(args.batch_size), "--cache-dir", str(work / "cache"), "--out", str(model),
             "--no-heatmap-scale")  # requests draw their heatmaps on their own scale
        total = args.clients * args.requests
        print(f"model: MobileNetV2-0.35, weights {Path(weights).name}, {args.image_size} px, "
              f"batch {args.batch_size}, fitted on {args.n_fit} images; sending {len(files)} "
              f"{where}; {os.cpu_count()} CPUs, shared with other jobs")
        score_total = min(total, args.score_images)
        before = kad_score(model, files, score_total)
        port = free_port()
        say(f"kad score: {before['images'] / before['seconds']:.1f} img/s; starting kad serve")
        server = start_server(model, port, args, work / "serve.log")
        try:
            good, _, seconds = asyncio.run(load(port, files, before["scores"], args.clients,
                                                args.requests))
            say(f"load phase: {len(good)} requests in {seconds:.0f} s; now with malformed "
                "uploads")
            mixed_good, mixed_bad, mixed_seconds = asyncio.run(load(
                port, files, before["scores"], args.clients, max(1, args.requests // 4),
                bad_clients=args.clients))
        finally:
            server.terminate()
            server.wait(30)
        after = kad_score(model, files, score_total)
    score_rate = statistics.median([before["images"] / before["seconds"],
                                    after["images"] / after["seconds"]])
    plain, mixed = summary(good, seconds), summary(mixed_good, mixed_seconds)
    print(f"kad score: {score_rate:.1f} img/s (before {before['images'] / before['seconds']:.1f},"
          f" after {after['images'] / after['seconds']:.1f})")
    print("| phase | requests | failed | p50 ms | p99 ms | img/s | / kad score |")
    print("|---|---|---|---|---|---|---|")
    for label, row in ((f"{args.clients} clients x {args.requests}", plain),
                       (f"the same, {args.clients} more sending malformed uploads", mixed)):
        print(f"| {label} | {row['requests']} | {row['failed']} | {row['p50_ms']:.0f} | "
              f"{row['p99_ms']:.0f} | {row['img_per_s']:.1f} | "
              f"{row['img_per_s'] / score_rate:.2f} |")
    by_kind: dict = {}
    for kind, status, refused in mixed_bad:
        by_kind.setdefault(kind, []).append((status, refused))
    for kind, seen in by_kind.items():
        statuses = sorted({s for s, _ in seen})
        print(f"malformed, {kind}: {len(seen)} sent, answered {statuses}, "
              f"{sum(not r for _, r in seen)} not refused")
    if plain["failed"] or mixed["failed"] or any(not r for _, _, r in mixed_bad):
        raise SystemExit("FAILED: some requests failed or a malformed one was not refused")


if __name__ == "__main__":
    main()
