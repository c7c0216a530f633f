"""What ``kad serve`` is allowed to do: where it listens, who may call it, and its bounds.

Safe by default: it listens on 127.0.0.1. On any other address it requires a bearer token,
read from ``$KAD_SERVE_TOKEN`` or from ``--token-file``, and refuses to start without one
(:func:`check_exposure`). Every request is bounded in bytes, images, time and the number in
flight; each image in pixels by ``$KAD_MAX_IMAGE_PIXELS``, as everywhere in kad.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from kad.errors import KadError

__all__ = ["MIN_TOKEN_LENGTH", "TOKEN_ENV", "ServeSettings", "check_exposure", "is_loopback",
           "read_token"]

#: The environment variable holding the bearer token.
TOKEN_ENV = "KAD_SERVE_TOKEN"
#: Shorter tokens are refused: 16 characters of a random token (``openssl rand -hex 16``
#: gives 32) are out of reach of guessing.
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class ServeSettings:
    """How ``kad serve`` runs; the command line's options, with their defaults."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_upload_mb: float = 32.0      # bytes of one request body, in MiB
    max_images: int = 16             # images in one request
    max_concurrent: int = 32         # requests in flight; more are refused with 503
    timeout: float = 30.0            # seconds from the request's arrival to its answer
    max_wait_ms: float = 10.0        # how long a batch waits for more requests
    max_batch: int | None = None     # images in one batch (default: the model's batch size)
    weights: str | None = None       # a weights file instead of the one recorded
    runtime: str | None = None       # the network's runtime (default: the model's)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only: ``localhost`` or a loopback address."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | Path | None) -> str | None:
    """The bearer token: the first line of ``token_file`` when given, else
    ``$KAD_SERVE_TOKEN``, else None. Refuses an unreadable file and a token shorter than
    :data:`MIN_TOKEN_LENGTH` characters."""
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise KadError(f"cannot read the token file {token_file}: {exc}; write the token "
                           "on its first line") from exc
        token, where = (lines[0].strip() if lines else ""), f"the token file {token_file}"
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise KadError(f"the token in {where} has {len(token)} characters, fewer than "
                       f"{MIN_TOKEN_LENGTH}; use a random one, e.g. openssl rand -hex 16")
    return token


def check_exposure(settings: ServeSettings) -> None:
    """Refuse to listen beyond this machine without a token, before the model is loaded."""
    if not is_loopback(settings.host) and not settings.token:
        raise KadError(f"kad serve listens on {settings.host}, beyond this machine, only with "
                       f"a bearer token: set ${TOKEN_ENV} or pass --token-file PATH (or "
                       "listen on 127.0.0.1)")
