"""A model file scored with TensorFlow beside its export scored with kad's core and OpenVINO.

Runs ``kad score MODEL IMAGES`` with the training environment's Python and
``kad score EXPORT IMAGES`` with a scoring environment's Python (one without TensorFlow,
e.g. ``pip install 'kad[openvino]'`` in its own venv), interleaved, ``--rounds`` times
each, and prints for each: the installed size of its ``site-packages``, the median CPU
time (user + system, of the whole command: start-up, loading, decoding, network, report)
and wall time, the images per CPU second, and the ratio of the two. Then it compares the
two ``scores.csv``: the largest relative difference of a score, and whether the flags
agree. CPU time is reported because wall time is noisy on a shared machine.

Run from the repository root, after ``kad fit ... --out MODEL`` and
``kad export MODEL --out EXPORT``::

    python benchmarks/export.py MODEL EXPORT IMAGES --core-python /tmp/core-venv/bin/python \\
        [--full-python .venv/bin/python] [--rounds 3]

Both commands run this checkout (it is put first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def site_size(python: str) -> tuple[str, int]:
    """``(site-packages folder, its size in bytes as du counts it)`` of ``python``."""
    folder = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                             "['purelib'])"], capture_output=True, text=True,
                            check=True).stdout.strip()
    kib = subprocess.run(["du", "-sk", folder], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    return folder, int(kib) * 1024


def score_once(python: str, model: str, images: str, out: Path) -> tuple[float, float]:
    """``(CPU seconds, wall seconds)`` of one ``kad score`` run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([python, "-m", "kad", "score", model, images, "--out", str(out)],
                   env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def read_scores(path: Path) -> dict[str, tuple[float, str]]:
    with open(path, newline="") as fh:
        return {r["file"]: (float(r["score"]), r["flagged"]) for r in csv.DictReader(fh)
                if r["status"] == "scored"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("export")
    parser.add_argument("images")
    parser.add_argument("--core-python", required=True)
    parser.add_argument("--full-python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs = {"full (model file, TensorFlow)": (args.full_python, args.model),
            "core (export, OpenVINO only)": (args.core_python, args.export)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: Path(tmp) / f"out{i}" for i, name in enumerate(runs)}
        for _ in range(args.rounds):
            for name, (python, model) in runs.items():
                times[name].append(score_once(python, model, args.images, outs[name]))
        scores = {name: read_scores(outs[name] / "scores.csv") for name in runs}
    n = len(next(iter(scores.values())))
    print(f"{n} images scored, {args.rounds} rounds each, interleaved; medians")
    print(f"{'environment':32} {'site-packages':>14} {'CPU s':>8} {'wall s':>8} "
          f"{'img/CPU s':>10}")
    cpu = {}
    for name, (python, _) in runs.items():
        _, size = site_size(python)
        cpu[name] = statistics.median(c for c, _ in times[name])
        wall = statistics.median(w for _, w in times[name])
        print(f"{name:32} {size / 2**20:>11.0f} MiB {cpu[name]:>8.1f} {wall:>8.1f} "
              f"{n / cpu[name]:>10.1f}")
    full, core = (scores[name] for name in runs)
    first, second = runs
    print(f"CPU time core / full: {cpu[second] / cpu[first]:.2f}")
    assert set(full) == set(core), "the two runs scored different images"
    worst = max(abs(core[f][0] - full[f][0]) / max(abs(full[f][0]), 1e-30) for f in full)
    same = all(core[f][1] == full[f][1] for f in full)
    print(f"largest relative score difference: {worst:.2e} (scores.csv keeps 6 significant "
          f"digits); flags {'agree' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
