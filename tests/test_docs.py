"""The documentation site builds with warnings as errors, without importing TensorFlow (a
hook of ``docs/hooks.py`` fails the build if it did), and documents every public name."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kad

ROOT = Path(__file__).parents[1]


def test_the_documentation_builds_strictly_and_covers_the_public_api(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    # (not --quiet: it drops warnings before --strict counts them)
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    # each public name has its entry (another library's name, re-exported, is named)
    missing = [name for name, module in kad._LAZY.items()
               if f'id="{module}.{name}"' not in api and f"<code>{name}</code>" not in api]
    assert not missing
    example = html.unescape(re.sub(r"<[^>]+>", "", (site / "python-api" / "index.html")
                                   .read_text()))
    assert "kad.score_images" in example and "def main(" in example
    cli = (site / "cli" / "index.html").read_text()
    assert all(f"kad {command}" in cli for command in ("fit", "score", "threshold", "explain"))
