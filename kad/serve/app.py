"""The HTTP service of ``kad serve``: FastAPI on uvicorn.

``POST /score`` takes one or several images (``multipart/form-data``, one part named
``image`` each) and answers, for each in the order sent, the fields of its ``scores.csv``
row; ``?heatmap=true`` adds the heatmap over the image as the model saw it, a PNG in
base64. ``GET /model`` says what the model is, its threshold and the guarantee that comes
with it; ``GET /health`` whether the service is up; ``/openapi.json`` and ``/docs`` describe
it all.

Refusals are JSON ``{"detail": "..."}`` with their status: 401 (no or a wrong bearer token,
when one is required), 413 (a body over ``--max-upload-mb``, more than ``--max-images``
images), 415 (not ``multipart/form-data``), 422 (no image, another field, a malformed body),
503 (``--max-concurrent`` requests already in flight), 504 (no answer within
``--timeout``). An image that cannot be decoded, is over the pixel limit or has nothing to
screen in it is not a refusal: its row says ``unreadable`` and why, as in ``scores.csv``.

What is logged, to stderr, one line per request: the time, the client's address, the
method, the path (not the query), the status, the number of images and the duration.
Never a file name, an image or a score. uvicorn's access log is off.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from kad import __version__
from kad.serve.batching import BatchScorer
from kad.serve.settings import ServeSettings, check_exposure, read_token
from kad.serve.uploads import FIELD, RequestRefused, read_body, split_images

__all__ = ["create_app", "model_info", "serve"]

log = logging.getLogger("kad.serve")


class ImageScore(BaseModel):
    """One image's ``scores.csv`` fields: null where its cell is blank (score, p-value and
    flagged unless scored, the p-value of a model without calibration images, the reason
    of a scored image); the heatmap only when asked for."""

    file: str
    status: str
    score: float | None = None
    p_value: float | None = None
    flagged: bool | None = None
    reason: str | None = None
    heatmap_png: str | None = None
    heatmap_method: str | None = None


class ScoreAnswer(BaseModel):
    model: str
    threshold: float
    images: list[ImageScore]


class Refusal(BaseModel):
    detail: str


_REFUSALS = {code: {"model": Refusal, "description": text} for code, text in (
    (401, "a bearer token is required and was missing or wrong"),
    (413, "the body or the number of images is over its limit"),
    (415, "the body is not multipart/form-data"),
    (422, "no image, an unexpected field, or a malformed body"),
    (503, "too many requests in flight; retry"),
    (504, "no answer within the time limit"))}

_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "one part per image (JPEG, PNG, TIFF, ...)"}}}}}}}


def model_info(pipeline, name: str, runtime: str) -> dict:
    """What ``GET /model`` says: the model, its threshold and what it guarantees. Paths
    on the server (the weights file's folder, the training data) are left out."""
    from kad.screening.calibration import fit_summary

    summary = fit_summary(pipeline)
    weights = str(pipeline.weights)
    details = pipeline.threshold.details
    return {
        "model": name, "kad_version": __version__, "backbone": pipeline.backbone,
        "weights": Path(weights).name if weights.lower() not in ("imagenet", "none")
        else weights,
        "image_size": pipeline.image_size, "preprocessing": pipeline.preprocessing,
        "representation": pipeline.representation.name, "blocks": pipeline.blocks,
        "detector": type(pipeline.detector).__name__, "runtime": runtime,
        "batch_size": pipeline.batch_size,
        "score": "higher is more anomalous; an image is flagged when its score is above "
                 "the threshold",
        "threshold": {"value": summary.threshold, "method": summary.method,
                      "guarantee": summary.guarantee,
                      **{k: details[k] for k in ("alpha", "fpr_bound", "guarantee_withheld")
                         if k in details}},
        "n_train": summary.n_train, "n_calibration": summary.n_calibration,
        "held_out": summary.held_out.as_dict() if summary.held_out else None,
        "summary": summary.lines(),
    }


def create_app(scorer: BatchScorer, settings: ServeSettings, name: str) -> FastAPI:
    """The service around a started :class:`~kad.serve.batching.BatchScorer`; ``name`` is
    how the model is called in answers (its file name)."""
    app = FastAPI(title="kad serve", version=__version__,
                  summary="Anomaly scores of images from one fitted kad model.")
    info = model_info(scorer.pipeline, name, scorer.runtime_name)
    in_flight = {"score": 0}
    expected = f"Bearer {settings.token}".encode() if settings.token else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        began = time.monotonic()
        path = request.url.path
        if expected is not None and path != "/health":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _logged(request, began, _refused(
                    401, "a bearer token is required: send the header Authorization: Bearer "
                         "TOKEN", {"WWW-Authenticate": "Bearer"}))
        if path != "/score":
            return _logged(request, began, await call_next(request))
        if in_flight["score"] >= settings.max_concurrent:
            return _logged(request, began, _refused(
                503, f"{settings.max_concurrent} requests are already being scored; retry "
                     "shortly", {"Retry-After": "1"}))
        in_flight["score"] += 1
        try:
            return _logged(request, began, await call_next(request))
        finally:
            in_flight["score"] -= 1

    @app.exception_handler(RequestRefused)
    async def refused(_: Request, exc: RequestRefused):
        return _refused(exc.status, exc.reason)

    @app.get("/health")
    async def health() -> dict:
        """Up and ready: the model is loaded and its network built."""
        return {"status": "ok", "model": name, "queued": scorer.queued,
                "in_flight": in_flight["score"], "batches": scorer.batches,
                "images": scorer.images}

    @app.get("/model")
    async def model() -> dict:
        """The model: backbone, blocks, detector, threshold and its guarantee."""
        return info

    @app.post("/score", response_model=ScoreAnswer, response_model_exclude_unset=True,
              responses=_REFUSALS, openapi_extra=_BODY)
    async def score(request: Request, heatmap: bool = False):
        """Score one or several images, one form part named ``image`` each: for each, in
        the order sent, the fields of its ``scores.csv`` row. ``heatmap=true`` adds
        ``heatmap_png``: where the score comes from, over the image as the model saw it
        (PNG, base64)."""
        deadline = time.monotonic() + settings.timeout
        try:
            body = await asyncio.wait_for(read_body(
                request.stream(), request.headers.get("content-length"),
                settings.max_upload_bytes), settings.timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            return _too_slow(settings, "while the request was being received")
        uploads = await run_in_threadpool(split_images, body, request.headers.get(
            "content-type"), settings.max_images)
        request.state.images = len(uploads)
        future = scorer.submit(uploads, heatmaps=heatmap)
        try:
            records = await asyncio.wait_for(asyncio.wrap_future(future),
                                             max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            future.cancel()
            return _too_slow(settings, "while the images were being scored")
        return {"model": name, "threshold": info["threshold"]["value"], "images": records}

    return app


def _refused(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


def _too_slow(settings: ServeSettings, when: str) -> JSONResponse:
    return _refused(504, f"no answer within {settings.timeout:g} s ({when}); retry, send "
                         "fewer images per request, or start kad serve with a larger "
                         "--timeout")


def _logged(request: Request, began: float, response):
    client = request.client.host if request.client else "-"
    images = getattr(request.state, "images", None)
    log.info("%s %s %s %d%s %.0f ms", client, request.method, request.url.path,
             response.status_code, f" {images} image(s)" if images is not None else "",
             1000 * (time.monotonic() - began))
    return response


def serve(model: str | Path, settings: ServeSettings, *, token_file: str | Path | None = None,
          on_ready=None) -> None:
    """Run ``kad serve``: check where it may listen (a token from ``token_file`` or
    ``$KAD_SERVE_TOKEN`` beyond this machine), load ``model`` once, build its network, then
    serve until stopped (Ctrl-C). ``on_ready`` receives one line saying what runs where."""
    import uvicorn

    from kad.screening.pipeline import load_pipeline

    settings = replace(settings, token=read_token(token_file) or settings.token)
    check_exposure(settings)  # before the model is loaded
    pipeline = load_pipeline(model)
    scorer = BatchScorer(pipeline, max_batch=settings.max_batch,
                         max_wait=settings.max_wait_ms / 1000, weights=settings.weights,
                         runtime=settings.runtime).start()
    try:
        app = create_app(scorer, settings, Path(model).name)
        if on_ready is not None:
            guard = "bearer token required" if settings.token else "no token"
            on_ready(f"{Path(model).name}: {pipeline.backbone} on {scorer.runtime_name}, "
                     f"batches of up to {scorer.max_batch} images, on http://{settings.host}:"
                     f"{settings.port} ({guard})")
        _log_to_stderr()
        uvicorn.Server(uvicorn.Config(
            app, host=settings.host, port=settings.port, access_log=False,
            server_header=False, log_level="info", timeout_keep_alive=5,
            limit_concurrency=4 * settings.max_concurrent + 16)).run()
    finally:
        scorer.close(timeout=settings.timeout)


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
