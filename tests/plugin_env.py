"""Make distributions discoverable exactly as installed ones are: a ``*.dist-info`` folder
with ``METADATA`` and ``entry_points.txt`` on ``sys.path``, which is what pip writes."""

from __future__ import annotations

import shutil
from pathlib import Path

from kad.registry import clear_cache

EXAMPLE = Path(__file__).parent / "third_party" / "kad_example_plugin"


def install(site: Path, name: str, version: str, entry_points: dict[str, dict[str, str]],
            modules: dict[str, str] | None = None) -> None:
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, items in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in items.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(source)


def install_example(site: Path) -> None:
    """The tests' third-party package, from its own source and pyproject."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copy(EXAMPLE / "kad_example_plugin.py", site / "kad_example_plugin.py")
    install(site, meta["name"], meta["version"], meta["entry-points"])


def activate(site: Path, monkeypatch) -> None:
    """Put ``site`` on ``sys.path`` (undone by ``monkeypatch``) and rediscover plugins."""
    monkeypatch.syspath_prepend(str(site))
    clear_cache()
