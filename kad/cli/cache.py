"""``kad cache list|verify|remove|merge``: the feature cache, seen and kept in order."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kad.cli.options import CacheDirOpt
from kad.cli.render import handle_errors, note, say, stdout, table

app = typer.Typer(no_args_is_help=True, help="List, verify, remove and merge feature cache "
                                              "entries.")
EntriesArg = Annotated[list[str] | None, typer.Argument(
    help="Entry names (or a unique beginning of one, or a path).")]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@app.command("list")
@handle_errors
def list_(cache_dir: CacheDirOpt = None) -> None:
    """Every entry: dataset, backbone, input size, preprocessing, size on disk, date."""
    from kad.features.cache import cache_root, list_entries

    entries = list_entries(cache_dir)
    stdout.print(table(
        f"feature cache {cache_dir or cache_root()}",
        ["entry", "state", "dataset", "backbone", "px", "preprocessing", "images", "blocks",
         "size", "created", "detail"],
        ((e.name, e.state, e.dataset or "?", e.backbone or "?", e.image_size or "?",
          e.preprocessing or "?", e.n_images or "?", e.n_blocks or "?", _size(e.size_bytes),
          e.created or "?", e.detail) for e in entries),
        right=["px", "images", "blocks", "size"]))
    say(f"{len(entries)} entries, {_size(sum(e.size_bytes for e in entries))} in all")


@app.command()
@handle_errors
def verify(entries: EntriesArg = None, cache_dir: CacheDirOpt = None) -> None:
    """Check entries' block files (all complete entries by default) against their checksums."""
    from kad.features.cache import list_entries, resolve_entry, verify_entry

    paths = ([resolve_entry(name, cache_dir) for name in entries] if entries else
             [e.path for e in list_entries(cache_dir) if e.state == "complete"])
    damaged = 0
    for path in paths:
        result = verify_entry(path)
        if result.ok:
            say(f"ok {path.name}: {result.files_checked} files, "
                f"{_size(result.bytes_read)} checked in {result.seconds:.2f} s")
        else:
            damaged += 1
            for problem in result.problems:
                note(problem, label="damaged:", style="red")
    say(f"{len(paths)} entries verified, {damaged} damaged")
    if damaged:
        raise typer.Exit(code=1)


@app.command()
@handle_errors
def remove(entries: EntriesArg = None,
           all_entries: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
           cache_dir: CacheDirOpt = None) -> None:
    """Remove entries (or --all)."""
    from kad.errors import KadError
    from kad.features.cache import remove_entries

    if not entries and not all_entries:
        raise KadError("name the entries to remove (see kad cache list), or pass --all")
    removed = remove_entries(entries or (), cache_dir, all_entries=all_entries)
    for entry in removed:
        say(f"removed {entry.path} ({_size(entry.size_bytes)})")
    say(f"{len(removed)} entries removed, {_size(sum(e.size_bytes for e in removed))} freed")


@app.command()
@handle_errors
def merge(entry: Annotated[str, typer.Argument(help="The entry whose shards to join.")],
          cache_dir: CacheDirOpt = None) -> None:
    """Join the shards of an entry (kad extract --shard i/N) into the entry itself."""
    from kad.features.cache import cache_root
    from kad.features.shards import merge_shards

    root = Path(cache_dir) if cache_dir else cache_root()
    target = Path(entry) if Path(entry).is_absolute() else root / entry
    features = merge_shards(target, root=root, on_event=lambda e: note(e.message))
    say(f"merged into {features.path}: {len(features)} images, {len(features.blocks)} blocks")
