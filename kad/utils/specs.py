"""The one spelling of a configurable plugin: ``NAME[:key=value,...]``.

``mobilenet_v2:alpha=0.35`` names the plugin ``mobilenet_v2`` with ``alpha=0.35``. Values
are read as Python literals where they are one (numbers, ``True``, ``None``, tuples) and
kept as strings otherwise. The canonical form (sorted keys) is what caches and saved
pipelines record, so ``a:x=1,y=2`` and ``a:y=2,x=1`` are the same thing.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from kad.errors import SpecError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Spec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        opts = ",".join(f"{k}={_format(v)}" for k, v in sorted(self.options.items()))
        return f"{self.name}:{opts}"

    def __hash__(self) -> int:
        return hash(str(self))


def _format(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(text: str | Spec, what: str = "plugin") -> Spec:
    """Parse ``NAME[:key=value,...]`` into a :class:`Spec`."""
    if isinstance(text, Spec):
        return text
    name, _, rest = str(text).strip().partition(":")
    if not _NAME.match(name):
        raise SpecError(
            f"invalid {what} {text!r}: expected NAME[:key=value,...], "
            "e.g. 'mobilenet_v2:alpha=0.35'"
        )
    options: dict[str, Any] = {}
    if rest.strip():
        for part in split_top_level(rest):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or not key.isidentifier():
                raise SpecError(
                    f"invalid option {part!r} in {what} {text!r}: expected key=value"
                )
            if key in options:
                raise SpecError(f"option {key!r} given twice in {what} {text!r}")
            options[key] = _literal(value.strip())
    return Spec(name, options)


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so ``size=(1,2)`` stays whole."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs: ``iforest,knn:n_neighbors=5,method=kth`` is
    two specs, since a ``key=value`` item can only continue the spec before it."""
    specs: list[str] = []
    for item in split_top_level(text):
        name = item.split("=", 1)[0]
        if "=" in item and ":" not in name and specs and ":" in specs[-1]:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs
