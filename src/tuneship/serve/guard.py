"""Host and Origin allow-lists, checked before any handler runs (ASGI middleware `HostOriginGuard`).

A request whose Host is not in `serve.allowed_hosts` (nor the address the request came to, an IP literal that DNS
rebinding cannot forge) is 421; a request with an Origin header that is neither this server's own (the Host's)
nor in `serve.allowed_origins` is 403. This keeps a web page the user visits from driving the server: DNS
rebinding reads, and cross-site POSTs without a body (no CORS preflight) such as /v1/loop/cycle.
Entries: `name` (any port), `name:port`, `*` (anything); origins `scheme://host` (any port),
`scheme://host:port`, `*`.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import SplitResult, urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from tuneship.serve.errors import error_body

log = logging.getLogger("tuneship.serve")
SHOWN = 100  # characters of a refused header value quoted back in the message


def split_host(value: str) -> tuple[str, int | None]:
    """("name", port or None) of a Host value: `example.com:8000`, `[::1]:8000`, `127.0.0.1`."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        port = rest.removeprefix(":")
        return name + "]", int(port) if port.isdigit() else None
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name, int(port)
    return value, None


def host_allowed(host: str, allowed: list[str], own_address: str | None) -> bool:
    name, port = split_host(host)
    if own_address and name == bracketed(own_address.lower()):
        return True
    for entry in allowed:
        if entry.strip() == "*":
            return True
        entry_name, entry_port = split_host(entry)
        if entry_name == name and entry_port in (None, port):
            return True
    return False


def bracketed(address: str) -> str:
    """An IPv6 address as a Host writes it."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def is_same_origin(origin: str | None, host: str | None) -> bool:
    """The Origin is this server's own: its host[:port] is the request's Host."""
    if not origin or not host:
        return False
    parts = urlsplit(origin.strip())
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


def origin_allowed(origin: str, host: str | None, allowed: list[str]) -> bool:
    if is_same_origin(origin, host):
        return True
    parts = urlsplit(origin.strip().lower())
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*" or entry == origin.strip().lower():
            return True
        wanted = urlsplit(entry)
        same_host = wanted.hostname and (wanted.scheme, wanted.hostname) == (parts.scheme, parts.hostname)
        if same_host and _port(wanted) in (None, _port(parts)):
            return True
    return False


def _port(parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


class HostOriginGuard:
    """ASGI middleware: 421 for a Host not allowed, 403 for an Origin not allowed, as OpenAI-shaped JSON."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, body = refusal
        log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), body["error"]["message"])
        await _send_json(send, status, body)

    def refusal(self, scope: Scope) -> tuple[int, dict] | None:
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        own = (scope.get("server") or (None, None))[0]
        if host is None or not host_allowed(host, self.allowed_hosts, own):
            shown = repr(host[:SHOWN]) if host is not None else "missing"
            message = (
                f"Host: {shown} is not a name this server answers to; call it by an allowed name, or add this one "
                "to serve.allowed_hosts"
            )
            return 421, error_body(message, "invalid_request_error", "Host")
        if origin is not None and not origin_allowed(origin, host, self.allowed_origins):
            message = (
                f"Origin: {origin[:SHOWN]!r} may not call this server from a browser; add it to "
                "serve.allowed_origins if it is your own site"
            )
            return 403, error_body(message, "permission_error", "Origin")
        return None


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
