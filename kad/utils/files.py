"""How kad writes files: aside and renamed when complete, one run at a time per output.

- :func:`atomic_write` writes a file under a temporary name in the same folder, syncs it
  and renames it over the final name, so a crash, Ctrl-C or a full disk never leaves a
  truncated file under the final name (the earlier file, if any, is kept). A write error
  (full disk, read-only file system, permission) is one :class:`WriteError` line naming
  the path and what to do.
- :func:`output_lock` keeps two kad runs from writing the same output at once: a lock file
  created exclusively (``O_CREAT | O_EXCL``, portable), holding the holder's pid, host and
  start time; a lock left by a process that no longer runs on this host is taken over.
- :func:`staged_output` locks an output folder and hands out a staging folder inside it;
  the run writes there and :meth:`Staging.publish` renames everything into place at the
  end, so a reader never sees half of one run and half of another, and an interrupted run
  leaves nothing.
- :func:`csv_cell` escapes a text cell that a spreadsheet would read as a formula.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kad.errors import KadError

WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there or choose another folder",
    errno.EDQUOT: "the disk quota is exceeded: free space there or choose another folder",
    errno.EROFS: "it is on a read-only file system: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to or fix its permissions",
    errno.EPERM: "permission denied: choose a folder you can write to or fix its permissions",
}


class WriteError(KadError):
    """A file could not be written (disk full, read-only, permission); nothing was left
    under its final name."""

    def __init__(self, path: str | Path, message: str):
        self.path = Path(path)
        super().__init__(message)


class OutputLockedError(KadError):
    """Another kad run is writing the same output."""


def write_error(path: str | Path, exc: OSError) -> WriteError:
    """``exc``, raised while writing ``path``, as one line: the path and what to do."""
    advice = WRITE_ADVICE.get(exc.errno, f"{exc.strerror or exc}: choose another folder")
    return WriteError(path, f"cannot write {path}: {advice}")


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows has no folder handles)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator[IO]:
    """Open ``path`` for writing (``mode`` ``"w"`` or ``"wb"``) under a temporary name in
    its folder; when the block ends without error the file is synced and renamed over
    ``path``. On any error, Ctrl-C included, the temporary file is removed and ``path`` is
    left as it was. An ``OSError`` while writing becomes a :class:`WriteError` naming
    ``path``. Only the writing belongs in the block."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        text = {} if "b" in mode else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **text) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise write_error(path, exc) from None
        raise
    _sync_folder(path.parent)


def record_key(record: dict) -> str:
    """A short key of a JSON-able ``record``: 24 hex digits of the SHA-256 of its JSON with
    sorted keys (cache entries, converted networks, int8 calibrations)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def file_sha256(path: str | Path, chunk: int = 8 << 20) -> str:
    """The SHA-256 of the file at ``path`` as hex, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``path.write_bytes(data)``, aside and renamed (:func:`atomic_write`)."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """``path.write_text(text)``, aside and renamed (:func:`atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


# -- locks -----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(lock: Path, holder: dict) -> bool:
    """A lock whose holder no longer runs on this host (or an unreadable lock older than a
    minute: its writer died while writing it)."""
    if not holder.get("pid"):
        try:
            return time.time() - lock.stat().st_mtime > 60
        except FileNotFoundError:
            return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))


@contextmanager
def output_lock(lock: str | Path, output: str | Path) -> Iterator[Path]:
    """Hold the lock file ``lock`` while ``output`` is written; raise
    :class:`OutputLockedError` (one line: which process holds it, on which host, since
    when) if another run holds it. Created exclusively, so it works on every platform and
    on most network file systems; removed at the end if it is still ours."""
    lock = Path(lock)
    token = secrets.token_hex(8)
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": token,
            "command": " ".join(sys.argv)[:300]}
    for attempt in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read_holder(lock)
            if holder is None:
                continue  # released meanwhile
            if _stale(lock, holder) and attempt < 2:
                lock.unlink(missing_ok=True)
                continue
            who = (f"process {holder['pid']} on {holder.get('host', '?')}, since "
                   f"{holder.get('since', '?')}" if holder.get("pid") else "a process")
            raise OutputLockedError(
                f"{output} is being written by another kad run ({who}); wait for it to "
                f"finish or choose another output; if no kad run is using it, delete "
                f"{lock}") from None
        except OSError as exc:
            raise write_error(lock, exc) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(mine, fh)
        except OSError as exc:
            lock.unlink(missing_ok=True)
            raise write_error(lock, exc) from None
        break
    else:
        raise OutputLockedError(f"could not lock {output} (lock {lock} keeps changing); "
                                "another kad run is starting there: try again")
    try:
        yield lock
    finally:
        if (_read_holder(lock) or {}).get("token") == token:
            lock.unlink(missing_ok=True)


def file_lock_path(path: str | Path) -> Path:
    """The lock file that guards the output file ``path`` (beside it, hidden)."""
    path = Path(path)
    return path.with_name(f".{path.name}.kad-lock")


FOLDER_LOCK = ".kad-lock"
_STAGING = ".kad-staging-"


@dataclass
class Staging:
    """A staging folder inside an output folder: write the run's files here, then
    :meth:`publish` them."""

    path: Path
    out: Path
    replaced: list[Path] = field(default_factory=list)

    def final(self, staged: str | Path) -> Path:
        """Where the staged file ``staged`` is once published."""
        return self.out / Path(staged).relative_to(self.path)

    def publish(self) -> list[Path]:
        """Rename every file and folder of the staging folder into the output folder (a
        folder of the same name, written by an earlier run, is replaced as a whole, so its
        files never mix with this run's); return what was there before and is now
        replaced."""
        replaced = []
        for item in sorted(self.path.iterdir()):
            target = self.out / item.name
            try:
                if item.is_dir() and not item.is_symlink() and target.is_dir():
                    old = self.out / f"{_STAGING}old-{secrets.token_hex(4)}-{item.name}"
                    os.replace(target, old)
                    os.replace(item, target)
                    shutil.rmtree(old, ignore_errors=True)
                    replaced.append(target)
                else:
                    existed = target.exists()
                    os.replace(item, target)
                    if existed:
                        replaced.append(target)
            except OSError as exc:
                raise write_error(target, exc) from None
        _sync_folder(self.out)
        self.replaced = replaced
        return replaced


@contextmanager
def staged_output(out: str | Path) -> Iterator[Staging]:
    """Lock the output folder ``out`` (see :func:`output_lock`; a second run stops with
    who holds it) and yield a :class:`Staging` folder inside it. Call
    :meth:`Staging.publish` when the run's files are complete; whatever is left in the
    staging folder (all of it after an error or Ctrl-C) is removed, and ``out`` holds only
    what it held before."""
    out = Path(out)
    with output_lock(out / FOLDER_LOCK, out):
        stage = out / f"{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            stage.mkdir()
        except OSError as exc:
            raise write_error(stage, exc) from None
        try:
            yield Staging(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


# -- CSV -------------------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A text cell a spreadsheet would read as a formula (it begins with ``=``, ``+``,
    ``-``, ``@``, a tab or a carriage return) with a single quote in front, as OWASP
    recommends against CSV injection; other values as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
