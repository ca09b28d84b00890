"""Who may call what.

Roles: the admin key (`serve.api_key`, else TUNESHIP_API_KEY) may do everything; client keys
(`serve.client_keys_file`, one `name:key` a line, read once at start) may chat, list models and send feedback.
With no key configured every caller is "anonymous" and may do everything (loopback only: serve/cli.py refuses
to listen further without a key). A caller sends `Authorization: Bearer <key>`; the pages sign in once with the
admin key and then carry an HttpOnly, SameSite=Strict session cookie (`Sessions`), and a change made with that
cookie must come from the server's own pages (its Origin is the request's Host). Handlers read the caller's name
from `request.state.client`: "admin", a client's name, or "anonymous". Keys are compared with
hmac.compare_digest and never written to a message, a log or a command line.
"""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request

from tuneship.errors import ConfigError
from tuneship.serve.errors import ApiError
from tuneship.serve.guard import is_same_origin

if TYPE_CHECKING:
    from tuneship.config import ServeSection

ADMIN = "admin"
ANONYMOUS = "anonymous"
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_CLIENT_KEY = 16
SESSION_SECONDS = 12 * 3600
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class ClientKeysError(ConfigError):
    """The client keys file cannot be read, or one of its lines is not `name:key`."""


@dataclass(frozen=True)
class Keys:
    """The keys a server accepts: the admin key and (name, key) pairs of its clients."""

    admin: str | None = None
    clients: tuple[tuple[str, str], ...] = ()

    @property
    def required(self) -> bool:
        return bool(self.admin)

    def who(self, sent: str) -> str | None:
        """ "admin", the name of the client whose key this is, or None; every key is compared in constant time."""
        found = ADMIN if self.admin and _same(sent, self.admin) else None
        for name, key in self.clients:
            if _same(sent, key) and found is None:
                found = name
        return found


def _same(sent: str, key: str) -> bool:
    return hmac.compare_digest(sent.encode(), key.encode())


def load_keys(serve: ServeSection) -> Keys:
    """The admin key and the client keys of `serve` (the file read now); client keys need an admin key."""
    admin = serve.admin_key()
    clients = read_client_keys(serve.client_keys_file) if serve.client_keys_file else ()
    if clients and not admin:
        raise ClientKeysError(
            f"serve.client_keys_file: {serve.client_keys_file} gives client keys but no admin key is set, so "
            "nobody could review, promote or read the pages; set serve.api_key (or TUNESHIP_API_KEY)"
        )
    for name, key in clients:
        if admin and _same(key, admin):
            raise ClientKeysError(
                f"{serve.client_keys_file}: the key of client {name!r} is the admin key; give the client its own key"
            )
    return Keys(admin, clients)


def read_client_keys(path: Path) -> tuple[tuple[str, str], ...]:
    """(name, key) per `name:key` line of `path`; blank lines and `#` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ClientKeysError(
            f"serve.client_keys_file: {path} cannot be read ({reason}); point it at a text file of `name:key` lines"
        ) from None
    clients: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.strip().startswith("#"):
            name, key = client_line(line.strip(), f"{path}:{number}")
            if any(name == n or _same(key, k) for n, k in clients):
                raise ClientKeysError(f"{path}:{number}: client {name!r} or its key is given twice; keep one line")
            clients.append((name, key))
    return tuple(clients)


def client_line(line: str, where: str) -> tuple[str, str]:
    """(name, key) of one `name:key` line; the message of a bad line names `where` but never the key."""
    name, colon, key = (part.strip() for part in line.partition(":"))
    if not colon:
        raise ClientKeysError(f"{where}: no `:` between the client's name and its key; write `name:key`")
    if not CLIENT_NAME.match(name) or name in (ADMIN, ANONYMOUS):
        raise ClientKeysError(
            f"{where}: the client name must be 1-64 letters, digits, `.`, `_` or `-` (not {ADMIN!r} or "
            f"{ANONYMOUS!r}); rename it"
        )
    if len(key) < MIN_CLIENT_KEY or any(c.isspace() for c in key):
        raise ClientKeysError(
            f"{where}: the key of {name!r} must be at least {MIN_CLIENT_KEY} characters without spaces; make one "
            "with `python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
        )
    return name, key


class Sessions:
    """The pages' sign-in sessions: random tokens kept in memory (a restart signs everyone out), each with an
    expiry."""

    def __init__(self, seconds: float = SESSION_SECONDS) -> None:
        self.seconds = seconds
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self) -> str:
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._expiry = {t: e for t, e in self._expiry.items() if e > now}
            self._expiry[token] = now + self.seconds
        return token

    def is_valid(self, token: str | None) -> bool:
        with self._lock:
            expiry = self._expiry.get(token or "")
        return expiry is not None and expiry > time.monotonic()

    def end(self, token: str | None) -> None:
        with self._lock:
            self._expiry.pop(token or "", None)


def install_auth(app: FastAPI, serve: ServeSection) -> None:
    """Read the keys now (a bad client keys file stops the start) and keep them, with the sessions, on `app`."""
    app.state.keys = load_keys(serve)
    app.state.sessions = Sessions()


def keys_of(app: FastAPI) -> Keys:
    return getattr(app.state, "keys", None) or Keys()


def sessions_of(app: FastAPI) -> Sessions:
    if getattr(app.state, "sessions", None) is None:
        app.state.sessions = Sessions()
    return app.state.sessions


def session_cookie(request: Request) -> str:
    """The cookie's name carries the port: two servers on one host keep their own sign-ins."""
    port = request.url.port or (443 if request.url.scheme == "https" else 80)
    return f"tuneship_session_{port}"


def has_session(request: Request) -> bool:
    return sessions_of(request.app).is_valid(request.cookies.get(session_cookie(request)))


def caller(request: Request) -> str | None:
    """Who sent the request: "anonymous" (no key configured), "admin", a client's name, or None (no or a wrong
    key). A bearer key wins over the cookie; a change made with the cookie must come from this server's pages."""
    keys = keys_of(request.app)
    if not keys.required:
        return ANONYMOUS
    authorization = request.headers.get("authorization")
    if authorization is not None:
        return keys.who(authorization.removeprefix("Bearer ").strip())
    if not has_session(request):
        return None
    if request.method not in SAFE_METHODS and not is_same_origin(
        request.headers.get("origin"), request.headers.get("host")
    ):
        raise ApiError(
            403,
            "Origin: a change made with the sign-in cookie must come from this server's own pages; send "
            "`Authorization: Bearer <key>` from other clients",
            "permission_error",
            "Origin",
        )
    return ADMIN


def require_client(request: Request) -> None:
    """Chat, models, feedback: any key (admin or client) when keys are set."""
    who = caller(request)
    if who is None:
        raise ApiError(
            401,
            "Authorization: missing or wrong bearer token; send `Authorization: Bearer <key>` (serve.api_key, or "
            "a client key from serve.client_keys_file)",
            "authentication_error",
            "Authorization",
        )
    request.state.client = who


def require_admin(request: Request) -> None:
    """Everything else: the admin key (or the pages' session) when keys are set; a client key is 403."""
    require_client(request)
    if request.state.client not in (ADMIN, ANONYMOUS):
        raise ApiError(
            403,
            f"Authorization: the client key of {request.state.client!r} may only chat, list models and send "
            "feedback; this needs the admin key (serve.api_key)",
            "permission_error",
            "Authorization",
        )


def client_name(request: Request) -> str:
    """The caller's name set by require_client / require_admin ("anonymous" when neither ran)."""
    return getattr(request.state, "client", ANONYMOUS)
