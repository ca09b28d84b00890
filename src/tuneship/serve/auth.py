"""Who may call what: write and admin endpoints need `Authorization: Bearer <key>` when `serve.api_key` or
TUNESHIP_API_KEY is set."""

from __future__ import annotations

import hmac
import os

from fastapi import Header, Request

from tuneship.loop.registry import Loop
from tuneship.serve.errors import ApiError


def configured_key(loop: Loop) -> str | None:
    """serve.api_key, else TUNESHIP_API_KEY; None: no key is needed."""
    return loop.cfg.serve.api_key or os.environ.get("TUNESHIP_API_KEY")


def require_key(request: Request, authorization: str | None = Header(None)) -> None:
    key = configured_key(request.app.state.loop)
    if not key:
        return
    sent = (authorization or "").removeprefix("Bearer ").strip()
    if not authorization or not hmac.compare_digest(sent.encode(), key.encode()):
        raise ApiError(
            401,
            "Authorization: missing or wrong bearer token; send `Authorization: Bearer <serve.api_key>`",
            "authentication_error",
            "Authorization",
        )
