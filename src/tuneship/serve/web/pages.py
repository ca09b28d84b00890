"""The pages router: Runs (from run directories) and the loop's pages (from the store of `app.state.loop`).

When a key is set every page needs the admin sign-in (signin.py): without it a page is a redirect to the sign-in
form and shows nothing (no prompt, answer, correction or path); with no key (loopback only) they are open."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from tuneship.serve.auth import ADMIN, caller, has_session, keys_of

if TYPE_CHECKING:
    from tuneship.loop.registry import Loop

WEB_DIR = Path(__file__).parent
NAV = [
    ("/", "Runs"),
    ("/playground", "Playground"),
    ("/review", "Review"),
    ("/versions", "Versions"),
    ("/loop", "Loop"),
]


def mount_web(app: FastAPI, runs_dir: Path) -> None:
    """Serve the pages at / and their static files at /static/web on `app`."""
    from fastapi.staticfiles import StaticFiles

    app.mount("/static/web", StaticFiles(directory=WEB_DIR / "static"), name="web-static")
    app.add_exception_handler(SignInNeeded, to_sign_in)
    app.include_router(pages_router(Path(runs_dir)))


def key_required(app: FastAPI) -> bool:
    return keys_of(app).required


class SignInNeeded(Exception):
    """A page asked for without the admin sign-in."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


async def to_sign_in(_request: Request, exc: Exception) -> RedirectResponse:
    from urllib.parse import quote

    path = exc.path if isinstance(exc, SignInNeeded) else "/"
    return RedirectResponse(f"/signin?next={quote(path, safe='/')}", status_code=303)


def require_sign_in(request: Request) -> None:
    """Pages: the admin's session cookie (or the admin key as a bearer token) when a key is set."""
    if key_required(request.app) and not has_session(request) and caller(request) != ADMIN:
        raise SignInNeeded(request.url.path)


def pages_router(runs_dir: Path):
    from fastapi import APIRouter, HTTPException
    from fastapi.responses import FileResponse
    from fastapi.templating import Jinja2Templates

    import tuneship.serve.web.loop_views as loop_views
    from tuneship.serve.web.runs import read_run, run_names, run_path
    from tuneship.serve.web.signin import signin_router

    templates = Jinja2Templates(directory=WEB_DIR / "templates")
    router = APIRouter(include_in_schema=False, dependencies=[Depends(require_sign_in)])

    def render(request: Request, template: str, title: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        loop = getattr(request.app.state, "loop", None)
        base = {
            "title": title,
            "nav": NAV,
            "key_required": key_required(request.app),
            "signed_in": has_session(request),
            "served": loop,
        }
        return templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)

    def runs_page(request: Request, name: str | None) -> HTMLResponse:
        names = run_names(runs_dir)
        selected = name or (names[0] if names else None)
        run = read_run(runs_dir / selected) if selected else None
        return render(request, "runs.html", "Runs", runs=names, run=run, runs_dir=runs_dir)

    @router.get("/", response_class=HTMLResponse, name="web-runs")
    def runs_index(request: Request):
        return runs_page(request, None)

    @router.get("/runs/{name}", response_class=HTMLResponse, name="web-run")
    def run_detail(request: Request, name: str):
        if run_path(runs_dir, name) is None:
            raise HTTPException(404, f"no run called {name!r} in the runs folder")
        return runs_page(request, name)

    @router.get("/runs/{name}/loss.png", name="web-loss-plot")
    def loss_plot(name: str):
        path = run_path(runs_dir, name)
        if path is None or not (path / "reports" / "loss.png").is_file():
            raise HTTPException(404, f"no loss plot for run {name!r}")
        return FileResponse(path / "reports" / "loss.png", media_type="image/png")

    def loop_page(name: str, title: str, context: Callable[[Loop, FastAPI], dict]) -> Callable[[Request], HTMLResponse]:
        """A page over the store; without a loop (a bare app) it says how to get one."""

        def page(request: Request) -> HTMLResponse:
            loop = getattr(request.app.state, "loop", None)
            return render(request, f"{name}.html", title, **(context(loop, request.app) if loop else {}))

        return page

    loop_pages = [
        ("playground", "Playground", loop_views.playground_context),
        ("review", "Review", loop_views.review_context),
        ("versions", "Versions", loop_views.versions_context),
        ("loop", "Loop", loop_views.loop_context),
    ]
    for name, title, context in loop_pages:
        router.add_api_route(
            f"/{name}", loop_page(name, title, context), response_class=HTMLResponse, name=f"web-{name}"
        )

    combined = APIRouter(include_in_schema=False)
    combined.include_router(signin_router(render))
    combined.include_router(router)
    return combined
