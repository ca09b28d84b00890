"""`tuneship serve RUN|CONFIG`: the app under uvicorn."""

from __future__ import annotations

import ipaddress
from typing import Optional

import typer

from tuneship.errors import TuneshipError


class UnsafeServe(TuneshipError):
    """Serving beyond this machine without an API key."""

    exit_code = 2


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    target: str = typer.Argument(..., help="a run directory (or its config file): its GGUF is v1, the champion"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (non-loopback needs an API key)"),
    port: int = typer.Option(8000, "--port", help="port"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="override a config key (repeatable)"),
) -> None:
    """Serve the loop: OpenAI-compatible chat, feedback, loop and version endpoints (docs at /docs)."""
    import uvicorn

    from tuneship.loop.registry import open_loop
    from tuneship.serve.app import CycleLauncher, create_app

    loop = open_loop(target, overrides)
    if not is_loopback(host) and not loop.cfg.serve.admin_key():
        raise UnsafeServe(
            f"--host {host} is reachable from other machines and no API key is set; set serve.api_key "
            "(or TUNESHIP_API_KEY) so every endpoint and page needs `Authorization: Bearer <key>` or a sign-in"
        )
    if host not in ("0.0.0.0", "::") and host not in loop.cfg.serve.allowed_hosts:
        loop.cfg.serve.allowed_hosts = [*loop.cfg.serve.allowed_hosts, host]  # the name it is bound to answers too
    live_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    serving = loop.cfg.serve
    starts_cycles = serving.cycles == "local" and serving.trigger_every > 0
    standby = loop.log_dir if serving.standby_cycle and starts_cycles else None  # cycles come
    cycles = CycleLauncher(str(loop.target), list(overrides or []), live_url, standby)
    app = create_app(loop, cycles=cycles, trigger=True, url=live_url)
    typer.echo(f"serving {loop.name} (champion v{loop.store.champion().id}) on {live_url}; store {loop.store.url}")
    if not is_loopback(host):
        names = ", ".join(loop.cfg.serve.allowed_hosts)
        typer.echo(f"answering Host names {names} and this machine's addresses; add others to serve.allowed_hosts")
    uvicorn.Server(server_config(app, host, port)).run()


def server_config(app, host: str, port: int):
    """uvicorn's settings for the app (`create_app`'s): its loop's keep-alive instead of uvicorn's 5 s, which
    behind a balancer that keeps idle connections for 60 s gives intermittent 502s."""
    import uvicorn

    keep_alive = app.state.loop.cfg.serve.keep_alive_seconds
    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_keep_alive=keep_alive)
