"""Where every plugin comes from: Python entry points, one door for every kind.

Five kinds of plugin are read, each from its own entry-point group:

=================  ======================  ==============================================
kind               group                   what the entry point names
=================  ======================  ==============================================
detector           ``kad.detectors``       a :class:`kad.BaseDetector` subclass
backbone           ``kad.backbones``       a :class:`kad.features.backbones.Backbone` subclass
dataset            ``kad.datasets``        a loader ``(data_dir=None, **options) -> Dataset``
preprocessing      ``kad.preprocessing``   a :class:`kad.data.preprocessing.Preprocessing` subclass
command            ``kad.commands``        a ``typer.Typer`` mounted as ``kad NAME``
=================  ======================  ==============================================

kad's own built-ins are declared in its ``pyproject.toml`` exactly as a third-party
distribution declares its plugins, so there is no hidden table. Every plugin is named and
configured with one spelling, ``NAME[:key=value,...]`` (:mod:`kad.utils.specs`), and
:func:`create` is the one path from that spelling to an object: parse, load, check the
option names against what the plugin accepts, build.

Discovery reads metadata only; a plugin's module is imported the first time the plugin is
used, and what it exports is checked to be the right kind of object. A plugin that fails to
import is reported with its name, its distribution and the original error; listing never
fails because one plugin is broken. A third-party distribution that reuses a built-in name
gets a :class:`PluginWarning` naming both distributions, and the built-in keeps working.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from kad.errors import PluginError, SpecError
from kad.utils.specs import Spec, parse_spec

BUILTIN_DISTRIBUTION = "kad"


@dataclass(frozen=True)
class Kind:
    """One kind of plugin: its entry-point group, its name in messages, and the base class
    (``"module:Class"``, resolved only when a plugin is validated) it must derive from, or
    ``""`` for plain callables."""

    group: str
    what: str
    base: str = ""
    #: How messages name the base class (its public spelling).
    public: str = ""

    def base_class(self) -> type | None:
        if not self.base:
            return None
        module, _, attr = self.base.partition(":")
        return getattr(importlib.import_module(module), attr)


DETECTOR = Kind("kad.detectors", "detector", "kad.detectors.base:BaseDetector", "kad.BaseDetector")
BACKBONE = Kind("kad.backbones", "backbone", "kad.features.backbones:Backbone",
                "kad.features.backbones.Backbone")
DATASET = Kind("kad.datasets", "dataset")
PREPROCESSING = Kind("kad.preprocessing", "preprocessing", "kad.data.preprocessing:Preprocessing",
                     "kad.data.preprocessing.Preprocessing")
COMMAND = Kind("kad.commands", "command", "typer:Typer", "typer.Typer")
KINDS = {kind.group: kind for kind in (DETECTOR, BACKBONE, DATASET, PREPROCESSING, COMMAND)}

# Group names, for callers that only need the string.
DETECTORS, BACKBONES, DATASETS, PREPROCESSINGS, COMMANDS = KINDS


class PluginWarning(UserWarning):
    """A plugin name declared by two distributions; the message names both."""


@dataclass(frozen=True)
class PluginInfo:
    """One entry point, as found in the installed distributions' metadata."""

    group: str
    name: str
    value: str
    distribution: str
    version: str
    entry_point: EntryPoint
    #: Another distribution's claim on the same name, which makes it ambiguous.
    conflict: str = ""

    @property
    def origin(self) -> str:
        return f"{self.distribution} {self.version}, {self.value}"

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION


def _kind(group: str | Kind) -> Kind:
    if isinstance(group, Kind):
        return group
    try:
        return KINDS[group]
    except KeyError:
        raise PluginError(f"unknown plugin group {group!r}; groups: {', '.join(KINDS)}") from None


def discover(group: str | Kind) -> dict[str, PluginInfo]:
    """Every entry point of ``group`` by name, without importing anything.

    When two distributions declare one name, a built-in keeps it (with a warning naming
    both); between two third parties the name is ambiguous, and loading it says so.
    """
    return dict(_discover(_kind(group).group))


@cache
def _discover(group: str) -> dict[str, PluginInfo]:
    kind = _kind(group)
    found: dict[str, PluginInfo] = {}
    for ep in entry_points(group=kind.group):
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            group=kind.group, name=ep.name, value=ep.value,
            distribution=dist.metadata["Name"] if dist is not None else "?",
            version=dist.version if dist is not None else "?", entry_point=ep,
        )
        other = found.get(ep.name)
        if other is None or (other.value == info.value
                             and other.distribution == info.distribution):
            found[ep.name] = other or info
            continue
        both = f"{other.origin} and {info.origin}"
        if other.builtin or info.builtin:
            builtin, intruder = (other, info) if other.builtin else (info, other)
            warnings.warn(
                f"{kind.what} plugin name {ep.name!r} is declared by {both}; the built-in "
                f"one is used. Rename the plugin in {intruder.distribution} to use it",
                PluginWarning, stacklevel=2)
            found[ep.name] = builtin
        else:
            found[ep.name] = PluginInfo(**{**other.__dict__, "conflict": both})
    return dict(sorted(found.items()))


def names(group: str | Kind) -> list[str]:
    return list(discover(group))


def load(group: str | Kind, name: str) -> Any:
    """Import and validate the plugin ``name`` of ``group``."""
    return _load(_kind(group).group, name)


@cache
def _load(group: str, name: str) -> Any:
    kind = _kind(group)
    plugins = discover(kind)
    if name not in plugins:
        close = difflib.get_close_matches(name, list(plugins), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PluginError(
            f"unknown {kind.what} {name!r}.{hint} Available: {', '.join(plugins) or 'none'}"
        )
    info = plugins[name]
    if info.conflict:
        raise PluginError(f"{kind.what} plugin name {name!r} is declared by {info.conflict}; "
                          "uninstall one of the distributions")
    try:
        obj = info.entry_point.load()
    except Exception as exc:  # any import-time failure of third-party code
        raise PluginError(
            f'failed to load {kind.what} plugin "{name}" ({info.origin}) due to '
            f"{type(exc).__name__}: {exc}"
        ) from exc
    problem = _problem(kind, obj)
    if problem:
        raise PluginError(f'{kind.what} plugin "{name}" ({info.origin}) is invalid: {problem}')
    return obj


def _problem(kind: Kind, obj: Any) -> str | None:
    base = kind.base_class()
    if base is None:
        return None if callable(obj) else f"it is {obj!r}, not callable"
    if base.__module__.startswith("kad"):
        if isinstance(obj, type) and issubclass(obj, base):
            return None
        return f"it is {obj!r}, not a subclass of {kind.public}"
    return None if isinstance(obj, base) else f"it is {obj!r}, not a {kind.public}"


def accepted_options(obj: Any) -> list[str] | None:
    """The option names a plugin takes, or None where it takes any keyword."""
    declared = getattr(obj, "options", None)
    if isinstance(declared, dict):  # backbones declare theirs with their defaults
        return list(declared)
    getter = getattr(obj, "_get_param_names", None)
    if callable(getter):  # scikit-learn estimators
        return list(getter())
    target = obj.__init__ if isinstance(obj, type) else obj
    params = list(inspect.signature(target).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name != "self"
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def create(group: str | Kind, spec: str | Spec, /, **fixed: Any) -> Any:
    """The object ``NAME[:key=value,...]`` names: the plugin called with the spec's options
    and ``fixed`` (arguments the caller supplies, such as a dataset's ``data_dir``).

    An unknown option, or a value the plugin refuses, is a :class:`~kad.errors.SpecError`
    naming the plugin, the option and what it accepts.
    """
    kind = _kind(group)
    parsed = parse_spec(spec, kind.what)
    obj = load(kind, parsed.name)
    allowed = accepted_options(obj)
    if allowed is not None:
        allowed = [a for a in allowed if a not in fixed]
        for key in parsed.options:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpecError(
                    f"{kind.what} {parsed.name!r} has no option {key!r}{hint} in "
                    f"{str(spec)!r}; its options: {', '.join(allowed) or 'none'}")
    try:
        return obj(**{**parsed.options, **fixed})
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SpecError) or getattr(exc, "__module__", "").startswith("kad"):
            raise
        raise SpecError(f"invalid {kind.what} {str(spec)!r}: {exc}") from exc


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


def status(group: str | Kind) -> list[PluginStatus]:
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
        f"{value} is not registered as a {_kind(group).what} plugin (entry point group {group!r}), "
        "so a file of it could not be loaded back; declare it in your package's "
        f'[project.entry-points."{group}"] and install the package'
    )


def get_detector(spec: str | Spec, **params: Any):
    """A new detector from ``NAME[:key=value,...]``; ``params`` override the spec's."""
    parsed = parse_spec(spec, DETECTOR.what)
    return create(DETECTOR, Spec(parsed.name, {**parsed.options, **params}))


def list_detectors() -> list[PluginStatus]:
    return status(DETECTOR)


def clear_cache() -> None:
    """Forget what was discovered and loaded (after installing a plugin at run time)."""
    _discover.cache_clear()
    _load.cache_clear()
