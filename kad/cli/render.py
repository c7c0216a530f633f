"""How commands talk to a person: results on stdout, diagnostics and progress on stderr.

Every text that comes from data (file names, error messages, install hints such as
``pip install 'kad[tf]'``) is escaped before rich prints it, so rich never reads it as
markup.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import typer
from rich.console import Console
from rich.markup import escape

from kad.errors import KadError
from kad.utils.progress import Progress

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
#: ``kad score``: its files appear in --out only once the run completes.
SCORES_NOT_WRITTEN = ("nothing was written: kad score puts scores.csv and report.html into "
                      "--out only when the run completes, and --out is as it was; run the "
                      "command again")
#: ``kad fit``: the model file appears only once complete.
MODEL_NOT_WRITTEN = f"no model file was written; {RESUMES}"


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
            except OSError as exc:  # a full disk or read-only folder at any stage
                from kad.utils.files import WRITE_ADVICE, write_error

                if exc.errno not in WRITE_ADVICE:
                    raise
                raise fail(str(write_error(exc.filename or "a file", exc))) from None
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


class RichProgress(Progress):
    """Draws the library's progress (:mod:`kad.utils.progress`) on stderr: one rich bar per
    task, with the time elapsed and an estimate of the time left; nested tasks (the epochs
    of a detector within a recipe's runs) are shown together, one line each.

    A task appears at its first update, so work that finds its result cached draws
    nothing; the tasks it is nested in appear with it (work inside them is being done).
    When a task ends, its bar is removed while other tasks are still drawn; the last one
    to end stays on screen as a record."""

    def __init__(self, console: Console | None = None):
        self.console = console or stderr
        self._live = None  # a rich.progress.Progress while bars are drawn
        self._tasks: dict[str, dict] = {}  # open tasks: total and, once drawn, rich's id

    def on_task_begin(self, name: str, total: int | None) -> None:
        self._tasks[name] = {"total": total, "id": None}

    def on_task_update(self, name: str, done: int, total: int | None) -> None:
        entry = self._tasks.setdefault(name, {"total": total, "id": None})
        if self._live is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bars

            self._live = Bars(TextColumn("{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(),
                              TimeRemainingColumn(), console=self.console)
            self._live.start()
        entry["total"] = total
        for outer, other in self._tasks.items():  # open before it: drawn above it
            if other["id"] is None:
                other["id"] = self._live.add_task(escape(outer), total=other["total"],
                                                  completed=other.get("done", 0))
            if outer == name:
                break
        entry["done"] = done
        self._live.update(entry["id"], completed=done, total=total)

    def on_task_end(self, name: str) -> None:
        entry = self._tasks.pop(name, None)
        if entry is None or entry["id"] is None or self._live is None:
            return
        if any(other["id"] is not None for other in self._tasks.values()):
            self._live.remove_task(entry["id"])
        else:
            self.close()

    def close(self) -> None:
        """Stop drawing (the bars shown stay on screen)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        for entry in self._tasks.values():
            entry["id"] = None


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
