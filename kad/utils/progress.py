"""Progress of long library work: the library reports, the front end draws.

A library function that can take long accepts ``progress: Progress | None``. It opens a
*task* (a name and, where known, a total) with :func:`task`, reports how much of it is
done, and closes it; it never prints. :class:`Progress` is a callback object in the manner
of ``keras.callbacks.Callback``: subclass it and override the hooks you need. The command
line draws each task as a rich bar (:class:`kad.cli.render.RichProgress`); a notebook or a
service passes its own; ``None`` reports nothing.

Tasks may nest (fitting opens one for the features, then one for the detector's epochs):
every hook receives the task's name, and a task's name is unique among the open ones.

>>> class Log(Progress):
...     def on_task_update(self, name, done, total):
...         print(name, done, total)
>>> with task(Log(), "epochs", 2) as update:
...     update(1)
...     update(2)
epochs 1 2
epochs 2 2
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Progress", "Recorder", "task"]


class Progress:
    """Hooks called by long library work; every one does nothing by default."""

    def on_task_begin(self, name: str, total: int | None) -> None:
        """A task named ``name`` starts; ``total`` steps where known."""

    def on_task_update(self, name: str, done: int, total: int | None) -> None:
        """``done`` steps of the task are complete (a running count, not an increment);
        ``total`` may have become known or changed since the task began."""

    def on_task_end(self, name: str) -> None:
        """The task is over, finished or not (an error ends it too)."""


@dataclass
class Recorder(Progress):
    """Keeps every event as ``(hook, name, done, total)``: for tests, logs and callers that
    want the history rather than a bar."""

    events: list[tuple[str, str, int | None, int | None]] = field(default_factory=list)

    def on_task_begin(self, name: str, total: int | None) -> None:
        self.events.append(("begin", name, None, total))

    def on_task_update(self, name: str, done: int, total: int | None) -> None:
        self.events.append(("update", name, done, total))

    def on_task_end(self, name: str) -> None:
        self.events.append(("end", name, None, None))

    def tasks(self) -> list[str]:
        """The names of the tasks begun, in order."""
        return [name for hook, name, _, _ in self.events if hook == "begin"]

    def last(self, name: str) -> tuple[int | None, int | None]:
        """``(done, total)`` of the last update of task ``name``."""
        for hook, seen, done, total in reversed(self.events):
            if hook == "update" and seen == name:
                return done, total
        raise KeyError(f"no update of task {name!r}; tasks: {', '.join(self.tasks())}")


@contextmanager
def task(progress: Progress | None, name: str,
         total: int | None = None) -> Iterator[Callable[..., None]]:
    """Open task ``name`` on ``progress`` and yield ``update(done, total=None)``; the task
    ends when the block does, however it ends. With ``progress=None`` nothing is reported
    and ``update`` does nothing."""
    if progress is None:
        yield _ignore
        return
    known = [total]

    def update(done: int, total: int | None = None) -> None:
        if total is not None:
            known[0] = total
        progress.on_task_update(name, int(done), known[0])

    progress.on_task_begin(name, total)
    try:
        yield update
    finally:
        progress.on_task_end(name)


def _ignore(done: int, total: int | None = None) -> None:  # noqa: ARG001 - the same signature
    return None
