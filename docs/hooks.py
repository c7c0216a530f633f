"""MkDocs hooks of kad's documentation: the pages generated from the code.

``<!-- kad:api -->`` in a page becomes one mkdocstrings entry per name of ``kad.__all__``,
grouped by the module that defines it, so that the reference lists exactly the public API.
``<!-- kad:cli -->`` becomes the reference of every ``kad`` command, read from the Typer
application (which imports neither TensorFlow nor the detectors). A build that imported
TensorFlow fails: the site is built from the code as text and the command line's
declarations only.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("mkdocs.plugins.kad")


def _api() -> str:
    from importlib import import_module

    import kad

    by_module: dict[str, list[str]] = {}
    for name, module in kad._LAZY.items():
        by_module.setdefault(module, []).append(name)
    out = []
    for module, names in by_module.items():
        out.append(f"## `{module}`\n")
        for name in names:
            home = getattr(getattr(import_module(module), name), "__module__", module)
            if home.split(".")[0] == "kad":
                out.append(f"::: {module}.{name}\n")
            else:  # another library's name, re-exported
                out.append(f"### `{name}`\n\n`{home}.{name}`, re-exported by `{module}`.\n")
    return "\n".join(out)


def _cli() -> str:
    import typer

    from kad.cli import app

    root = typer.main.get_command(app)
    out: list[str] = []

    # Typer carries its own copy of click: its objects are used by what they have.
    def walk(command, path: list[str]) -> None:
        name = " ".join(path)
        ctx = command.context_class(command, info_name=name)
        level = "#" * min(len(path) + 1, 6)
        out.append(f"{level} `{name}`\n")
        help_text = (command.help or "").strip()
        if help_text:
            out.append(help_text.replace("\b\n", "") + "\n")
        usage = " ".join(command.collect_usage_pieces(ctx))
        out.append(f"```text\n{name} {usage}\n```\n")
        rows = []
        for param in command.get_params(ctx):
            if param.param_type_name == "argument":
                continue
            record = param.get_help_record(ctx)
            if record is None or param.name == "help":
                continue
            spelling, text = record
            rows.append(f"| `{spelling}` | {text.replace('|', '&#124;').replace(chr(10), ' ')} |")
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        for arg in arguments:
            helptext = getattr(arg, "help", None) or ""
            rows.insert(0, f"| `{(arg.metavar or arg.name).upper()}` | {helptext} |")
        if rows:
            out.append("| argument or option | what it does |\n|---|---|")
            out.extend(rows)
            out.append("")
        if hasattr(command, "list_commands"):
            for sub in command.list_commands(ctx):
                walk(command.get_command(ctx, sub), [*path, sub])

    walk(root, ["kad"])
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001
    if "<!-- kad:api -->" in markdown:
        markdown = markdown.replace("<!-- kad:api -->", _api())
    if "<!-- kad:cli -->" in markdown:
        markdown = markdown.replace("<!-- kad:cli -->", _cli())
    return markdown


def on_post_build(config) -> None:  # noqa: ARG001
    if "tensorflow" in sys.modules:
        log.warning("building the documentation imported TensorFlow; it must read the code "
                    "as text (mkdocstrings' static analysis) and the command line's "
                    "declarations only")
