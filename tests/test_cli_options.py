"""Every option of every ``kad`` command reaches the library.

Each command of the Typer app (kad's own, ``kad cache …`` and the mounted command plugins
such as ``kad recipe …``) is found by walking click's command tree. For every parameter the
command is run twice with the library functions it calls replaced by recorders: once with
default values, once with one non-default value for that parameter. The recorded calls must
differ, or the option is dropped on the way. Nothing heavy runs: the last library call of
each command raises :class:`Captured` once it has recorded its arguments.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner


def _import_all(*packages: str) -> None:
    import pkgutil

    for name in packages:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            importlib.import_module(info.name)


# Every module a command reaches is imported before any test patches a name: a module first
# imported under a patch would keep the recorder for good if it binds the name at import
# time (``from .common import Workbench``), and later tests would run against it.
_import_all("kad.cli", "kad.screening", "kad.serve", "kad_recipes")


class Captured(Exception):
    """Raised by the recorder of a command's last library call: the command stops there."""


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path, monkeypatch):
    """Commands run at their defaults make their default output folders (kad-results/…):
    in a scratch folder, never in the checkout."""
    monkeypatch.chdir(tmp_path)


class Stand:
    """What a recorder that lets the command go on returns: equal to any other stand-in."""

    def __eq__(self, other) -> bool:
        return isinstance(other, Stand)

    def __getattr__(self, name: str):  # a dataset's name for a progress bar, say
        if name.startswith("__"):
            raise AttributeError(name)
        return "stand-in"

    def __hash__(self) -> int:
        return 0


#: For every command (its path under ``kad``), the library functions it calls, in order, as
#: ``module:attribute``; the last one stops the command, and so does one marked ``!`` (where
#: the command takes one of two ways). A command that takes parameters and is missing here
#: fails the test: add it.
CALLS: dict[tuple[str, ...], list[str]] = {
    ("extract",): ["kad.cli.commands:load_dataset", "kad.features.extract:extract_features"],
    ("preview",): ["kad.screening.workflow:preview_images"],
    ("fit",): ["kad.cli.screening:load_dataset", "kad.screening.workflow:fit_model"],
    ("score",): ["kad.screening.workflow:screen"],
    ("threshold",): ["kad.screening.workflow:set_threshold"],
    ("explain",): ["kad.screening.pipeline:load_pipeline", "kad.screening.heatmaps:explain_file"],
    ("serve",): ["kad.serve.app:serve"],
    ("lesions",): ["kad.screening.lesions:measure_lesions"],
    ("export",): ["kad.screening.export:export_pipeline"],
    ("cache", "list"): ["kad.features.cache:list_entries"],
    ("cache", "verify"): ["kad.features.cache:resolve_entry!", "kad.features.cache:list_entries"],
    ("cache", "remove"): ["kad.features.cache:remove_entries"],
    ("cache", "merge"): ["kad.features.shards:merge_shards"],
    ("recipe", "table1"): ["kad_recipes.common:Workbench", "kad_recipes.table1:run_table1"],
    ("recipe", "table2"): ["kad_recipes.common:Workbench", "kad_recipes.table2:run_table2"],
    ("recipe", "table3"): ["kad_recipes.common:Workbench", "kad_recipes.table3:run_table3"],
}

#: Parameters that only change what is printed, with the reason; nothing else may be here.
RENDERING_ONLY: dict[tuple[str, ...], dict[str, str]] = {
    ("recipe", "table1"): {"per_split": "adds a per-split table to the console output"},
}

#: Values a command needs in both runs (required parameters, or one it refuses to run
#: without), by parameter name.
BASE = {("cache", "remove"): {"entries": ["entry-a"]}}

#: Non-default values that must parse (the generic one, a plain word, would not).
VALUES = {"shard": "1/2", "image_size": "224", "ratios": "0.1,0.2", "runtime": "keras",
          "precision": "int8", "engine": "ray", "n_anomalies": "7"}


def _commands(command, path: tuple[str, ...] = ()):
    """``(path, command)`` for every leaf command under a click group (walked through its
    ``commands``, as Typer's own click and click itself both keep them)."""
    subcommands = getattr(command, "commands", None)
    if isinstance(subcommands, dict):
        for name, sub in sorted(subcommands.items()):
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


def _app_commands():
    from kad.cli import app

    return dict(_commands(typer.main.get_command(app)))


def _plain(value, depth: int = 0):
    """A value made comparable: dataclasses and plain objects by their fields, callables
    (progress bars, loggers made afresh each run) as one token."""
    if depth > 6:
        return "…"
    if isinstance(value, Stand | str | int | float | bool | type(None) | Path):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, _plain(dataclasses.asdict(value), depth + 1))
    if isinstance(value, dict):
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return type(value)(_plain(v, depth + 1) for v in value) if not isinstance(
            value, set | frozenset) else sorted(map(repr, value))
    if callable(value):
        return "<callable>"
    if hasattr(value, "__dict__"):
        return (type(value).__name__, _plain(vars(value), depth + 1))
    return repr(value)


def _is_argument(param) -> bool:
    return param.param_type_name == "argument"


def _is_flag(param) -> bool:
    return bool(getattr(param, "is_flag", False))


def _value_type(param):
    """``(python type of one value, choices or None, min, max)`` of a parameter, from
    Typer's type descriptor or, for a plain click parameter, from its click type."""
    described = getattr(param, "type_descriptor", None)
    if described is not None:
        kind = described.annotation
        if typing.get_origin(kind) in (list, tuple):
            kind = typing.get_args(kind)[0]
        return kind, described.choices, getattr(param, "min", None), getattr(param, "max", None)
    click_type = param.type
    kind = {"integer": int, "integer range": int, "float": float, "float range": float,
            "path": Path, "boolean": bool}.get(click_type.name, str)
    return (kind, getattr(click_type, "choices", None), getattr(click_type, "min", None),
            getattr(click_type, "max", None))


def _other_value(param, base, tmp_path: Path):
    """A value of ``param`` different from ``base`` (its default or base value), as it
    would be written on the command line (a list for a multi-value argument)."""
    kind, choices, low, high = _value_type(param)
    if param.name in VALUES and VALUES[param.name] != str(base):
        value = VALUES[param.name]
    elif choices:
        value = str(next(c for c in choices if str(c) != str(base)))
    elif kind in (int, float):
        if base is None:
            value = low if low is not None else 1
            if kind is float and low is not None and high is not None:
                value = (low + high) / 2
        else:
            value = base + 1
            if high is not None and value > high:
                value = (low + high) / 2 if low is not None else high
        value = str(kind(value))
    elif kind is Path:
        value = str(tmp_path / f"{param.name}-other")
    else:
        value = "other-" + param.name
    return [value] if param.nargs == -1 or getattr(param, "multiple", False) else value


def _argv(path, command, values: dict) -> list[str]:
    argv = list(path)
    for param in command.params:
        if param.name not in values:
            continue
        value = values[param.name]
        if _is_argument(param):
            argv += list(value) if isinstance(value, list) else [value]
        elif _is_flag(param):
            argv.append(value)
        else:
            for item in value if isinstance(value, list) else [value]:
                argv += [param.opts[0], item]
    return argv


def _base_values(path, command, tmp_path: Path) -> dict:
    values = dict(BASE.get(path, {}))
    for param in command.params:
        if param.required and param.name not in values:
            value = (str(tmp_path / f"{param.name}-base") if _value_type(param)[0] is Path
                     else f"base-{param.name}")
            values[param.name] = [value] if param.nargs == -1 else value
    return values


def _flag_value(param, base) -> str:
    if not base:
        return param.opts[0]
    if not param.secondary_opts:
        raise AssertionError(f"{param.name} is on by default and cannot be turned off")
    return param.secondary_opts[0]


def _run(path, command, values, monkeypatch) -> list:
    from kad.cli import app

    calls: list = []
    targets = CALLS[path]
    for position, target in enumerate(targets):
        last = position == len(targets) - 1 or target.endswith("!")
        target = target.rstrip("!")
        module, attribute = target.split(":")

        def record(*args, _name=target, _last=last, **kwargs):
            calls.append((_name, _plain(args), _plain(kwargs)))
            if _last:
                raise Captured(_name)
            return Stand()

        monkeypatch.setattr(importlib.import_module(module), attribute, record)
    result = CliRunner().invoke(app, _argv(path, command, values))
    assert isinstance(result.exception, Captured), (
        f"kad {' '.join(_argv(path, command, values))} did not reach "
        f"{targets[-1].rstrip('!')}: exit {result.exit_code}\n{result.output}\n"
        f"{result.exception!r}")
    return calls


def _parameters():
    for path, command in sorted(_app_commands().items()):
        for param in command.params:
            if param.name != "help" and param.name not in RENDERING_ONLY.get(path, {}):
                yield pytest.param(path, param.name, id=f"{' '.join(path)}:{param.name}")


def test_every_command_with_parameters_is_covered():
    uncovered = [" ".join(p) for p, c in _app_commands().items() if c.params and p not in CALLS]
    assert not uncovered, f"add the library calls of: {', '.join(uncovered)}"
    assert ("recipe", "table1") in _app_commands(), "the command plugins are mounted"
    for path, names in RENDERING_ONLY.items():  # the exceptions name real parameters
        assert set(names) <= {p.name for p in _app_commands()[path].params}, path


@pytest.mark.parametrize("path,name", list(_parameters()))
def test_every_parameter_reaches_the_library(path, name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    command = _app_commands()[path]
    param = next(p for p in command.params if p.name == name)
    values = _base_values(path, command, tmp_path)
    default = _run(path, command, values, monkeypatch)
    base = values.get(name, param.default)
    changed = dict(values)
    if _is_flag(param):
        changed[name] = _flag_value(param, base)
    else:
        changed[name] = _other_value(param, base[0] if isinstance(base, list) else base,
                                     tmp_path)
    other = _run(path, command, changed, monkeypatch)
    assert other != default, (
        f"kad {' '.join(path)}: {_argv(path, command, changed)[len(path):]} changes nothing "
        f"the library receives: {default}")
