"""A real headless Chromium (Debian's chromium + chromedriver, driven by Selenium) against the real app under
uvicorn on a loopback port. Tests skip when the browser is not installed (`make setup` installs it as root)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import qa, tiny_config_file

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_SECONDS = 20


@pytest.fixture(scope="session")
def browser():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("chromium and chromium-driver are not installed (make setup installs them when run as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@contextmanager
def serving(app):
    """The app under uvicorn in a thread, on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(WAIT_SECONDS)
        sock.close()


def screenshot(driver, folder: Path, name: str) -> Path:
    """The whole page, not only the window."""
    path = folder / f"{name}.png"
    width, height = driver.execute_script("return [document.body.scrollWidth, document.body.scrollHeight]")
    window = driver.get_window_size()
    driver.set_window_size(max(window["width"], width), max(window["height"], height + 120))
    driver.save_screenshot(str(path))
    driver.set_window_size(window["width"], window["height"])
    assert path.stat().st_size > 0
    return path


def wait_for(driver, condition, message: str):
    """Until `condition(driver)` is truthy; a page that reloads meanwhile (stale or missing elements) is waited
    out. Chromium reports an element read while its page was replaced either as stale or, under load, as the
    inspector's "Node with given id does not belong to the document"; both are waited out."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def holds(d):
        try:
            return condition(d)
        except WebDriverException as exc:
            if "does not belong to the document" in str(exc):
                return False
            raise

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, WAIT_SECONDS, ignored_exceptions=ignored).until(holds, message)


@pytest.fixture(scope="session")
def exported_run(tiny_model_dir, tmp_path_factory):
    """(config, run dir) of the tiny run taken through every stage up to an unreachable Ollama; its data has a
    duplicate and an empty answer, so the audit has findings to show."""
    from rich.console import Console

    from tuneship.config import load_config
    from tuneship.pipeline import run_pipeline

    folder = tmp_path_factory.mktemp("web-run")
    config = tiny_config_file(folder, tiny_model_dir, max_steps=2)
    with open(folder / "facts.jsonl", "a", encoding="utf-8") as facts:
        for record in (qa("Question number 1?", "Answer number 1."), qa("Question number 99?", "")):
            facts.write(json.dumps(record) + "\n")
    cfg = load_config(config, ["deploy.target=ollama", "deploy.host=127.0.0.1:9"])
    summary = run_pipeline(cfg, Console(file=io.StringIO()))
    assert not summary.failed, summary.stages
    return cfg, cfg.run_dir
