"""The pages router: Runs (from run directories), and the loop's pages (from the store)."""

from pathlib import Path

WEB_DIR = Path(__file__).parent
NAV = [
    ("/", "Runs"),
    ("/playground", "Playground"),
    ("/review", "Review"),
    ("/versions", "Versions"),
    ("/loop", "Loop"),
]


def mount_web(app, runs_dir: Path, *, key_required: bool = False) -> None:
    """Serve the pages at / and their static files at /static/web on `app`."""
    from fastapi.staticfiles import StaticFiles

    app.mount("/static/web", StaticFiles(directory=WEB_DIR / "static"), name="web-static")
    app.include_router(pages_router(Path(runs_dir), key_required=key_required))


def pages_router(runs_dir: Path, *, key_required: bool):
    from fastapi import APIRouter, HTTPException, Request
    from fastapi.responses import FileResponse, HTMLResponse
    from fastapi.templating import Jinja2Templates

    from tuneship.serve.web.runs import read_run, run_names, run_path

    templates = Jinja2Templates(directory=WEB_DIR / "templates")
    router = APIRouter(include_in_schema=False)

    def render(request: Request, template: str, title: str, **context) -> HTMLResponse:
        return templates.TemplateResponse(
            request, template, {"title": title, "nav": NAV, "key_required": key_required, **context}
        )

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

    return router
