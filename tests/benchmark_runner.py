"""Runs a benchmark's ``--smoke`` mode for the tests: as a user starts it (a child process),
or its ``main`` in this process, which spares importing TensorFlow again."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_main(script: str, capsys, monkeypatch, *args: str) -> str:
    """``script``'s ``main(["--smoke", *args])`` in this process; what it printed."""
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}",
                                                  ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    threads = cv2.getNumThreads()  # some benchmarks time OpenCV on one thread
    try:
        spec.loader.exec_module(module)
        module.main(["--smoke", *args])
    finally:
        cv2.setNumThreads(threads)
    return capsys.readouterr().out
