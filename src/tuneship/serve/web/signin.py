"""The pages' sign-in: GET /signin shows a form for the admin key; POST /signin checks it and sets an HttpOnly,
SameSite=Strict session cookie (a random token the server keeps in memory, with an expiry); POST /signout ends
the session. The pages' scripts then call the /v1 API with that cookie, and a change made with it must come
from this server's own pages (auth.py checks its Origin)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from tuneship.serve.auth import ADMIN, SESSION_SECONDS, keys_of, session_cookie, sessions_of

Render = Callable[..., HTMLResponse]


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this server only (never `//elsewhere` or a URL)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


def sign_in_page(render: Render, request: Request, target: str, error: str | None, status_code: int = 200):
    hours = SESSION_SECONDS // 3600
    return render(request, "signin.html", "Sign in", status_code, next=target, error=error, session_hours=hours)


def signin_router(render: Render) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/signin", response_class=HTMLResponse, name="web-signin")
    def signin_form(request: Request, next: str = "/") -> Response:
        if not keys_of(request.app).required:
            return RedirectResponse(safe_next(next), status_code=303)
        return sign_in_page(render, request, safe_next(next), None)

    @router.post("/signin", name="web-signin-post")
    async def signin(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        key, target = form.get("key", [""])[0], safe_next(form.get("next", ["/"])[0])
        keys = keys_of(request.app)
        if not keys.required:
            return RedirectResponse(target, status_code=303)
        if keys.who(key) != ADMIN:
            error = "That is not the admin key (serve.api_key or TUNESHIP_API_KEY); client keys cannot open the pages."
            return sign_in_page(render, request, target, error, status_code=401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            session_cookie(request),
            sessions_of(request.app).start(),
            max_age=int(SESSION_SECONDS),
            path="/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    @router.post("/signout", name="web-signout")
    def signout(request: Request) -> Response:
        name = session_cookie(request)
        sessions_of(request.app).end(request.cookies.get(name))
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(name, path="/", httponly=True, samesite="strict")
        return response

    return router
