"""``kad serve``: one fitted model as an HTTP service (:func:`kad.serve.app.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kad.cli.options import ModelArg
from kad.cli.render import handle_errors, note
from kad.cli.screening import ModelRuntimeOpt, WeightsOverrideOpt

MAX_UPLOAD_MB = 4096.0
MAX_IMAGES = 1024


def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on. Any other than 127.0.0.1 (this machine only) "
                       "requires a bearer token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8000,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="File whose first line is the bearer token clients must send "
                             "(default: $KAD_SERVE_TOKEN).")] = None,
    max_upload_mb: Annotated[float, typer.Option(
        "--max-upload-mb", min=0.01, max=MAX_UPLOAD_MB,
        help="Largest request body in MiB; larger ones are refused with 413.")] = 32.0,
    max_images: Annotated[int, typer.Option(
        "--max-images", min=1, max=MAX_IMAGES,
        help="Most images in one request; more are refused with 413.")] = 16,
    max_concurrent: Annotated[int, typer.Option(
        "--max-concurrent", min=1, max=10_000,
        help="Most scoring requests in flight; more are refused with 503.")] = 32,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, max=3600.0,
        help="Seconds a request may take, from its arrival to its answer; 504 after.")] = 30.0,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", min=0.0, max=1000.0,
        help="How long a batch waits for more requests to join it, in ms.")] = 10.0,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", min=1, max=MAX_IMAGES,
        help="Most images scored in one batch (default: the model's batch size).")] = None,
    weights: WeightsOverrideOpt = None,
    runtime: ModelRuntimeOpt = None,
) -> None:
    """Serve one model over HTTP: POST /score, GET /model, GET /health, /docs.

    Needs kad's serve extra (FastAPI, uvicorn, python-multipart). Images, file names and
    scores are never logged."""
    from kad.errors import MissingDependencyError

    try:
        from kad.serve.app import serve as run
    except ImportError as exc:
        raise MissingDependencyError(f"kad serve needs FastAPI, uvicorn and python-multipart "
                                     f"({exc}); install them with: pip install 'kad[serve]'"
                                     ) from exc
    from kad.serve.settings import ServeSettings

    run(model, ServeSettings(host=host, port=port, max_upload_mb=max_upload_mb,
                             max_images=max_images, max_concurrent=max_concurrent,
                             timeout=timeout, max_wait_ms=max_wait_ms, max_batch=max_batch,
                             weights=weights, runtime=runtime),
        token_file=token_file, on_ready=lambda line: note(f"serving {line}"))


def register(app: typer.Typer) -> None:
    app.command()(handle_errors(serve, interrupted="the service stopped; it writes nothing"))
