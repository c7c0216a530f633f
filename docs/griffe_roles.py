"""A griffe extension for kad's API reference: the Sphinx roles of kad's docstrings
(:func:`name`, :class:`~kad.Pipeline`, ...) become code spans, which Markdown renders,
instead of showing as typed."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
