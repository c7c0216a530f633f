"""The README's main job, timed: ``kad recipe table1 --dataset digits --weights none``.

Runs the command as a user runs it (``python -m kad``), in a fresh feature cache and
results folder, and prints its wall time, the CPU time of the process and its children,
the machine's load, and the network input size the feature cache entry records, so the
README states the size and the time this script measured.

Run from the repository root::

    python benchmarks/main_job.py
    python benchmarks/main_job.py --smoke     # --limit 10, one detector: seconds
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
import time
from pathlib import Path

COMMAND = ["recipe", "table1", "--dataset", "digits", "--weights", "none"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="10 images per class, one detector, one seed: seconds")
    args = parser.parse_args(argv)
    command = COMMAND + (["--limit", "10", "--detectors", "iforest", "--seeds", "1",
                          "--backbone", "mobilenet_v2:alpha=0.35"] if args.smoke else [])
    work = Path(tempfile.mkdtemp(prefix="kad-main-job-"))
    try:
        full = [sys.executable, "-m", "kad", *command, "--cache-dir", str(work / "cache"),
                "--out", str(work / "out")]
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(full, capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise SystemExit(f"the command exited with status {done.returncode}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        sizes = sorted({json.loads(meta.read_text())["inputs"]["image_size"]
                        for meta in (work / "cache").rglob("meta.json")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"kad {' '.join(command)}")
    print(f"network input size: {', '.join(f'{s} px' for s in sizes)}")
    print(f"wall time: {wall:.0f} s ({int(wall // 60)} min {wall % 60:.0f} s); CPU time "
          f"(process and children): {cpu:.0f} s; {os.cpu_count()} CPUs, load average "
          f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
