"""The ``kad`` command line.

Each command parses its options, calls one library function and renders the record it
returns; no logic lives here. Results go to stdout, diagnostics and progress to stderr.
kad's own commands are in :mod:`kad.cli.commands`, :mod:`kad.cli.screening` and
:mod:`kad.cli.export`; more come
from the ``kad.commands`` entry points, which is how the paper's recipes are mounted as
``kad recipe`` (a third party's command is mounted the same way). Command plugins may use
:mod:`kad.cli.options` and :mod:`kad.cli.render` for the same spelling and output.
"""

from __future__ import annotations

import typer

from kad.cli import cache, commands, export, lesions, screening, serve
from kad.cli.render import note

app = typer.Typer(
    name="kad",
    help="Unsupervised anomaly detection on images with features from every block of an "
         "ImageNet network.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
commands.register(app)
screening.register(app)
serve.register(app)
lesions.register(app)
export.register(app)
app.add_typer(cache.app, name="cache")


def _mount_command_plugins(root: typer.Typer) -> None:
    from kad.errors import PluginError
    from kad.registry import COMMAND, load, names

    for name in names(COMMAND):
        try:
            sub = load(COMMAND, name)
        except PluginError as exc:
            note(f"{exc}; the command 'kad {name}' is unavailable", label="warning:")
            continue
        root.add_typer(sub, name=name)


_mount_command_plugins(app)


def main() -> None:  # the console script
    app()
