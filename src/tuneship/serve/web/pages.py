"""The pages router: Runs (from run directories) and the loop's pages (from the store of `app.state.loop`)."""

import os
from pathlib import Path

WEB_DIR = Path(__file__).parent
NAV = [
    ("/", "Runs"),
    ("/playground", "Playground"),
    ("/review", "Review"),
    ("/versions", "Versions"),
    ("/loop", "Loop"),
]


def mount_web(app, runs_dir: Path) -> None:
    """Serve the pages at / and their static files at /static/web on `app`; with a loop (`app.state.loop`,
    as `tuneship serve` makes) also the review API."""
    from fastapi.staticfiles import StaticFiles

    app.mount("/static/web", StaticFiles(directory=WEB_DIR / "static"), name="web-static")
    app.include_router(pages_router(Path(runs_dir)))
    if getattr(app.state, "loop", None) is not None:
        from tuneship.serve.web.review import router as review_router

        app.include_router(review_router)


def key_required(app) -> bool:
    loop = getattr(app.state, "loop", None)
    return bool(loop and (loop.cfg.serve.api_key or os.environ.get("TUNESHIP_API_KEY")))


def pages_router(runs_dir: Path):
    from fastapi import APIRouter, HTTPException, Request
    from fastapi.responses import FileResponse, HTMLResponse
    from fastapi.templating import Jinja2Templates

    from tuneship.serve.web import loop_views
    from tuneship.serve.web.runs import read_run, run_names, run_path

    templates = Jinja2Templates(directory=WEB_DIR / "templates")
    router = APIRouter(include_in_schema=False)

    def render(request: Request, template: str, title: str, **context) -> HTMLResponse:
        loop = getattr(request.app.state, "loop", None)
        base = {"title": title, "nav": NAV, "key_required": key_required(request.app), "served": loop}
        return templates.TemplateResponse(request, template, {**base, **context})

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
            raise HTTPException(404, f"no run called {name!r} under {runs_dir}")
        return runs_page(request, name)

    @router.get("/runs/{name}/loss.png", name="web-loss-plot")
    def loss_plot(name: str):
        path = run_path(runs_dir, name)
        if path is None or not (path / "reports" / "loss.png").is_file():
            raise HTTPException(404, f"no loss plot for run {name!r}")
        return FileResponse(path / "reports" / "loss.png", media_type="image/png")

    @router.get("/playground", response_class=HTMLResponse, name="web-playground")
    def playground(request: Request):
        loop = getattr(request.app.state, "loop", None)
        models = request.app.state.router.model_names() if loop else []
        return render(request, "playground.html", "Playground", models=list(dict.fromkeys(models)))

    @router.get("/review", response_class=HTMLResponse, name="web-review")
    def review(request: Request):
        loop = getattr(request.app.state, "loop", None)
        if loop is None:
            return render(request, "review.html", "Review")
        return render(
            request,
            "review.html",
            "Review",
            items=loop_views.review_items(loop.store),
            unprocessed=len(loop.store.unprocessed_feedback()),
        )

    @router.get("/versions", response_class=HTMLResponse, name="web-versions")
    def versions(request: Request):
        from tuneship.loop.registry import previous_champion

        loop = getattr(request.app.state, "loop", None)
        if loop is None:
            return render(request, "versions.html", "Versions")
        return render(
            request,
            "versions.html",
            "Versions",
            versions=loop_views.version_rows(loop.store),
            previous=previous_champion(loop),
            events=loop.store.events(limit=50),
        )

    @router.get("/loop", response_class=HTMLResponse, name="web-loop")
    def loop_page(request: Request):
        from tuneship.loop.trigger import loop_status

        loop = getattr(request.app.state, "loop", None)
        if loop is None:
            return render(request, "loop.html", "Loop")
        status = loop_status(loop)
        running = status["cycle_running"]
        return render(
            request,
            "loop.html",
            "Loop",
            status=status,
            progress=loop_views.cycle_progress(running["stage"] if running else None),
            stages=loop_views.CYCLE_STAGES,
            cycles=loop_views.recent_cycles(loop.store),
        )

    return router
