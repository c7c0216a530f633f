"""How commands talk to a person: results on stdout, diagnostics and progress on stderr.

Every text that comes from data (file names, error messages, install hints such as
``pip install 'kad[tf]'``) is escaped before rich prints it, so rich never reads it as
markup.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from kad.errors import KadError

stdout = Console()
stderr = Console(stderr=True)
for _console in (stdout, stderr):
    if not _console.is_terminal:  # a log file or a pipe: do not squeeze tables to 80 columns
        _console.width = max(_console.width, 160)

#: How many skipped inputs a console listing names before it counts the rest.
SHOWN = 20


def say(text: str, *, style: str | None = None) -> None:
    """A result line on stdout (``text`` is plain text, never markup)."""
    stdout.print(escape(text), style=style, highlight=False, soft_wrap=True)


def note(text: str, *, label: str = "", style: str = "yellow") -> None:
    """A diagnostic line on stderr, with an optional coloured label."""
    prefix = f"[{style}]{escape(label)}[/] " if label else ""
    stderr.print(prefix + escape(text), highlight=False, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


RESUMES = ("finished batches of features are kept in the cache; the same command resumes "
           "after them")
NOTHING_KEPT = "nothing was written; run the command again to start over"


def handle_errors(func: Callable | None = None, *, interrupted: str = RESUMES) -> Callable:
    """Turn kad's errors (and bad values) into one clear line and exit code 1; Ctrl-C
    says what was kept (``interrupted``), truthfully for each command."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except (KadError, ValueError, FileNotFoundError) as exc:
                raise fail(str(exc)) from None
            except KeyboardInterrupt:
                note(f"interrupted: {interrupted}", label="stopped")
                raise typer.Exit(code=130) from None

        return wrapper

    return decorate(func) if func is not None else decorate


def skipped(items: Iterable[tuple[str, str]], what: str) -> None:
    """Name every skipped input with its reason (the first :data:`SHOWN`, then a count)."""
    items = list(items)
    if not items:
        return
    note(f"{len(items)} {what}:", label="left out:")
    for name, reason in items[:SHOWN]:
        note(f"  {name}: {reason}")
    if len(items) > SHOWN:
        note(f"  … and {len(items) - SHOWN} more")


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr driven by ``update(done, total)`` calls, with an
    estimate of the time left. It appears at the first update, so work that finds its
    result cached draws nothing."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    bar: Progress | None = None
    task = None

    def update(done: int, total: int) -> None:
        nonlocal bar, task
        if bar is None:
            bar = Progress(*columns, console=stderr)
            bar.start()
            task = bar.add_task(escape(description), total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()


def table(title: str, columns: list[str], rows: Iterable[Iterable[object]], *,
          right: Iterable[str] = ()):
    """A rich table of plain values (escaped)."""
    from rich.table import Table

    right = set(right)
    result = Table(title=escape(title))
    for column in columns:
        result.add_column(escape(column), justify="right" if column in right else "left",
                          overflow="fold")
    for row in rows:
        result.add_row(*(escape(str(cell)) for cell in row))
    return result
