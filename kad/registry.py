"""Where detectors and backbones come from: Python entry points.

Two groups are read, ``kad.detectors`` and ``kad.backbones``. kad's own built-ins are
declared in its ``pyproject.toml`` exactly as a third-party distribution declares its
plugins, so there is no hidden table. Discovery reads the metadata only; a plugin's module
is imported the first time the plugin is used, and what it exports is checked to be the
right kind of object. A plugin that fails to import is reported with its name, its
distribution and the original error; listing never fails because one plugin is broken.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import PluginError

DETECTORS = "kad.detectors"
BACKBONES = "kad.backbones"


@dataclass(frozen=True)
class PluginInfo:
    """One entry point, as found in the installed distributions' metadata."""

    group: str
    name: str
    value: str
    distribution: str
    version: str
    entry_point: EntryPoint

    @property
    def origin(self) -> str:
        return f"{self.distribution} {self.version}, {self.value}"


def _kind(group: str) -> str:
    return group.rsplit(".", 1)[-1].rstrip("s")


@cache
def discover(group: str) -> dict[str, PluginInfo]:
    """Every entry point of ``group`` by name, without importing anything.

    Two distributions declaring the same name is an error, not a silent override.
    """
    found: dict[str, PluginInfo] = {}
    for ep in entry_points(group=group):
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            group=group,
            name=ep.name,
            value=ep.value,
            distribution=dist.metadata["Name"] if dist is not None else "?",
            version=dist.version if dist is not None else "?",
            entry_point=ep,
        )
        if ep.name in found and found[ep.name].value != ep.value:
            other = found[ep.name]
            raise PluginError(
                f"{_kind(group)} plugin name {ep.name!r} is declared twice: by "
                f"{other.origin} and by {info.origin}; uninstall one of the distributions"
            )
        found[ep.name] = info
    return dict(sorted(found.items()))


def _validate_detector(obj: Any) -> str | None:
    from .detector import BaseDetector

    if not (isinstance(obj, type) and issubclass(obj, BaseDetector)):
        return f"it is {obj!r}, not a subclass of kad.BaseDetector"
    return None


def _validate_backbone(obj: Any) -> str | None:
    from .backbones import Backbone

    if not (isinstance(obj, type) and issubclass(obj, Backbone)):
        return f"it is {obj!r}, not a subclass of kad.backbones.Backbone"
    return None


_VALIDATORS: dict[str, Callable[[Any], str | None]] = {
    DETECTORS: _validate_detector,
    BACKBONES: _validate_backbone,
}


@cache
def load(group: str, name: str) -> Any:
    """Import and validate the plugin ``name`` of ``group``."""
    plugins = discover(group)
    if name not in plugins:
        close = difflib.get_close_matches(name, list(plugins), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PluginError(
            f"unknown {_kind(group)} {name!r}.{hint} Available: {', '.join(plugins) or 'none'}"
        )
    info = plugins[name]
    try:
        obj = info.entry_point.load()
    except Exception as exc:  # any import-time failure of third-party code
        raise PluginError(
            f'failed to load {_kind(group)} plugin "{name}" ({info.origin}) due to '
            f"{type(exc).__name__}: {exc}"
        ) from exc
    problem = _VALIDATORS[group](obj)
    if problem:
        raise PluginError(f'{_kind(group)} plugin "{name}" ({info.origin}) is invalid: {problem}')
    return obj


@dataclass(frozen=True)
class PluginStatus:
    name: str
    distribution: str
    version: str
    value: str
    status: str  # "ok" or "broken: <reason>"
    input_kind: str = ""
    supervised: bool = False
    summary: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def status(group: str) -> list[PluginStatus]:
    """Load every plugin of ``group`` and say which work; never raises for a broken one."""
    rows = []
    for name, info in discover(group).items():
        try:
            obj = load(group, name)
        except PluginError as exc:
            cause = exc.__cause__ or exc
            rows.append(PluginStatus(name, info.distribution, info.version, info.value,
                                     f"broken: {type(cause).__name__}: {cause}"))
            continue
        doc = (obj.__doc__ or "").strip().splitlines()
        rows.append(PluginStatus(
            name, info.distribution, info.version, info.value, "ok",
            input_kind=getattr(obj, "input_kind", ""),
            supervised=bool(getattr(obj, "supervised", False)), summary=doc[0] if doc else "",
        ))
    return rows


def registered_as(cls: type, group: str = DETECTORS) -> PluginInfo:
    """The entry point of ``group`` that provides ``cls``: the name a saved object records,
    so that loading takes the class from the registry and never from the file.

    An entry point naming ``module:Class`` matches without importing anything; otherwise
    the entry points whose module or attribute name match ``cls`` are loaded and compared.
    """
    plugins = discover(group)
    value = f"{cls.__module__}:{cls.__qualname__}"
    for info in plugins.values():
        if info.value.replace(" ", "") == value:
            return info
    for info in plugins.values():
        module, _, attr = info.value.replace(" ", "").partition(":")
        if module == cls.__module__ or attr.rsplit(".", 1)[-1] == cls.__name__:
            try:
                if load(group, info.name) is cls:
                    return info
            except PluginError:
                continue
    raise PluginError(
        f"{value} is not registered as a {_kind(group)} plugin (entry point group {group!r}), "
        "so a file of it could not be loaded back; declare it in your package's "
        f'[project.entry-points."{group}"] and install the package'
    )


def get_detector(name: str, **params: Any):
    """Instantiate the detector plugin ``name`` (``NAME[:key=value,...]`` accepted)."""
    from .specs import parse_spec

    spec = parse_spec(name, "detector")
    cls = load(DETECTORS, spec.name)
    return cls(**{**spec.options, **params})


def list_detectors() -> list[PluginStatus]:
    return status(DETECTORS)


def clear_cache() -> None:
    """Forget what was discovered and loaded (after installing a plugin at run time)."""
    discover.cache_clear()
    load.cache_clear()
