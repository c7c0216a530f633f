"""Images uploaded to ``kad serve``: read into memory with bounds, named safely, decoded as
files are.

A request body is read chunk by chunk and refused as soon as it passes its byte limit, before
anything is parsed or decoded (:func:`read_body`). Its ``multipart/form-data`` parts are split
in memory by python-multipart's streaming parser (:func:`split_images`): nothing is spooled to
a temporary file, and no part of a request names a path the server reads or writes. A part's
file name is kept only as a label, reduced to a plain name (:func:`safe_name`). The images are
decoded by :func:`kad.data.images.decode_image`, the decoder of image files, with its pixel
limit checked on the header first (:class:`UploadSource`).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kad.data.datasets.base import ImageSource

__all__ = ["FIELD", "RequestRefused", "Upload", "UploadSource", "read_body", "safe_name",
           "split_images"]

#: The form field of each image: ``curl -F image=@a.jpg -F image=@b.jpg``.
FIELD = "image"
MAX_NAME = 128


class RequestRefused(Exception):
    """A request that is refused as a whole: an HTTP ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its safe name (a label only) and its bytes."""

    name: str
    data: bytes


def safe_name(raw: str | bytes | None, position: int) -> str:
    """A label for the ``position``-th upload (0-based) from the file name its client sent:
    the last component of any path (``/`` or ``\\``), without control characters, at most
    :data:`MAX_NAME` characters; ``image-N`` when nothing is left."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    text = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C").strip()[:MAX_NAME]
    return text if text not in ("", ".", "..") else f"image-{position + 1}"


async def read_body(chunks: AsyncIterable[bytes], declared: str | None, limit: int) -> bytes:
    """The request body from its ``chunks``, refused with 413 as soon as it passes ``limit``
    bytes: at once when its declared length (``Content-Length``) does, else while reading."""
    too_large = (f"the request is larger than the limit of {limit / 2**20:g} MiB; send "
                 "fewer or smaller images, or start kad serve with a larger --max-upload-mb")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise RequestRefused(400, f"Content-Length {declared!r} is not a number") from None
        if length > limit:
            raise RequestRefused(413, too_large)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise RequestRefused(413, too_large)
    return bytes(body)


def split_images(body: bytes, content_type: str | None, max_images: int) -> list[Upload]:
    """The images of a ``multipart/form-data`` body, each a part named :data:`FIELD`, in
    order. Refused with 415 when the body is not multipart, 422 when it is malformed, has
    another field or no image, and 413 with more than ``max_images`` images."""
    from python_multipart.multipart import (
        MultipartParseError,
        MultipartParser,
        parse_options_header,
    )

    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise RequestRefused(415, f"send the images as multipart/form-data, one part named "
                                  f"{FIELD!r} per image (curl -F {FIELD}=@photo.jpg); got "
                                  f"Content-Type {content_type or 'none'!r}")
    parts: list[dict[str, Any]] = []
    header: dict[str, bytearray] = {}

    def begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})
        if len(parts) > max_images:
            raise RequestRefused(413, f"more than {max_images} images in one request; send "
                                      "them in several requests, or start kad serve with a "
                                      "larger --max-images")

    def header_field(data: bytes, start: int, end: int) -> None:
        header.setdefault("field", bytearray()).extend(data[start:end])

    def header_value(data: bytes, start: int, end: int) -> None:
        header.setdefault("value", bytearray()).extend(data[start:end])

    def header_end() -> None:
        name = bytes(header.pop("field", b"")).decode("latin-1").lower()
        parts[-1]["headers"][name] = bytes(header.pop("value", b""))

    def data(chunk: bytes, start: int, end: int) -> None:
        parts[-1]["data"].extend(chunk[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": begin, "on_header_field": header_field,
        "on_header_value": header_value, "on_header_end": header_end, "on_part_data": data})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestRefused(422, f"the multipart body is malformed ({exc})") from None
    uploads: list[Upload] = []
    for part in parts:
        disposition, params = parse_options_header(part["headers"].get("content-disposition"))
        field = params.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or field != FIELD:
            raise RequestRefused(422, f"unexpected form field {field[:40]!r}: send each image "
                                      f"as a part named {FIELD!r}")
        uploads.append(Upload(safe_name(params.get(b"filename"), len(uploads)),
                              bytes(part["data"])))
    if not uploads:
        raise RequestRefused(422, f"no image in the request: send one part named {FIELD!r} "
                                  f"per image (curl -F {FIELD}=@photo.jpg)")
    return uploads


class UploadSource(ImageSource):
    """Uploaded images as an :class:`~kad.data.datasets.ImageSource`, decoded in memory by
    :func:`kad.data.images.decode_image`, exactly as :class:`~kad.data.datasets.FileSource`
    decodes files (large JPEGs reduced where the preprocessing allows)."""

    def __init__(self, uploads: Sequence[Upload]):
        self.uploads = list(uploads)

    def __len__(self) -> int:
        return len(self.uploads)

    def load(self, i: int) -> np.ndarray:
        from kad.data.images import decode_image

        return decode_image(self.uploads[i].data, self.uploads[i].name)

    def load_scaled(self, i: int, min_side: int) -> np.ndarray:
        from kad.data.images import decode_image

        return decode_image(self.uploads[i].data, self.uploads[i].name, min_side=min_side)

    def describe(self, i: int) -> str:
        return self.uploads[i].name

    def take(self, idx: np.ndarray) -> UploadSource:
        return UploadSource([self.uploads[int(i)] for i in idx])

    def update_hash(self, digest: Any) -> None:
        for upload in self.uploads:
            digest.update(hashlib.sha256(upload.data).digest())
