"""A client for Ollama's REST API (plain HTTP), following its documented endpoints.

- HEAD /api/blobs/sha256:<digest>: 200 when the server has the blob, 404 when not.
- POST /api/blobs/sha256:<digest>: upload the file (201). Only when HEAD said it is missing:
  ollama-python's create_blob uploads the whole file every time.
- POST /api/create {model, files: {name: digest}, template, system, parameters, messages, license}:
  a stream of NDJSON status lines; a line {"error": ...} is a failure, even after 200 OK.
- POST /api/chat {model, messages, stream: false, options}: {message: {content}, done_reason}.
- POST /api/show {model}: {template, parameters, model_info: {"tokenizer.ggml.eos_token_id": ...}}.
- POST /api/generate {model, keep_alive: 0}: unloads the model.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tuneship.errors import TuneshipError
from tuneship.paths import sha256_file

DEFAULT_HOST = "http://127.0.0.1:11434"
HINTS = {
    "unsupported": "this Ollama does not support the model's architecture; update Ollama",
    "architecture": "this Ollama does not support the model's architecture; update Ollama",
    "template": "the TEMPLATE did not parse; run `tuneship template check RUN`",
    "memory": "not enough memory to load the model; use a smaller quant (export.quants) or free memory",
}


class OllamaError(TuneshipError):
    """Ollama answered with an error."""


class OllamaUnreachable(OllamaError):
    """No Ollama server at the configured address: `tuneship run` stops there without failing."""

    stage_status = "not reachable"


def resolve_host(host: str | None) -> str:
    """deploy.host, else OLLAMA_HOST, else 127.0.0.1:11434; parsed as Ollama parses OLLAMA_HOST: without a
    scheme the port defaults to 11434, with http:// to 80, with https:// to 443."""
    value = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST).strip().rstrip("/")
    scheme, separator, hostport = value.partition("://")
    if not separator:
        scheme, hostport, default_port = "http", value, "11434"
    else:
        default_port = "443" if scheme == "https" else "80"
    hostport = hostport.split("/", 1)[0]
    if ":" not in hostport.rsplit("]", 1)[-1]:
        hostport += f":{default_port}"
    return f"{scheme}://{hostport}"


def file_digest(path: Path) -> str:
    return f"sha256:{sha256_file(path)}"


class OllamaClient:
    def __init__(self, host: str | None = None, timeout: float = 600):
        self.host = resolve_host(host)
        self.timeout = timeout

    def _request(self, method: str, path: str, body=None, headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        request = urllib.request.Request(self.host + path, data=body, method=method, headers=headers or {})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            return exc
        except urllib.error.URLError as exc:
            raise OllamaUnreachable(
                f"cannot reach Ollama at {self.host} ({exc.reason}); start it with "
                "`ollama serve`, or set OLLAMA_HOST / deploy.host"
            ) from None

    def _json(self, method: str, path: str, body=None) -> dict:
        response = self._request(method, path, body)
        text = response.read().decode("utf-8", "replace")
        if response.status >= 400:
            raise OllamaError(f"{method} {path} failed ({response.status}): {_error_text(text)}{_hint(text)}")
        return json.loads(text) if text.strip() else {}

    def version(self) -> str:
        return self._json("GET", "/api/version").get("version", "unknown")

    def has_blob(self, digest: str) -> bool:
        response = self._request("HEAD", f"/api/blobs/{digest}")
        response.read()
        return response.status == 200

    def push_blob(self, path: Path, digest: str) -> bool:
        """Upload the file unless the server has it; True when it was uploaded."""
        if self.has_blob(digest):
            return False
        with open(path, "rb") as data:
            response = self._request(
                "POST",
                f"/api/blobs/{digest}",
                data,
                {"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"},
            )
            text = response.read().decode("utf-8", "replace")
        if response.status not in (200, 201):
            raise OllamaError(f"uploading {path.name} failed ({response.status}): {_error_text(text)}")
        return True

    def create(self, payload: dict) -> list[str]:
        """POST /api/create and read the NDJSON stream; any {"error": ...} line raises."""
        response = self._request("POST", "/api/create", {**payload, "stream": True})
        statuses = []
        for event in _ndjson(response):
            if "error" in event:
                raise OllamaError(f"ollama create {payload['model']} failed: {event['error']}{_hint(event['error'])}")
            statuses.append(event.get("status", ""))
        if response.status >= 400:
            raise OllamaError(f"ollama create {payload['model']} failed ({response.status})")
        if not statuses or statuses[-1] != "success":
            raise OllamaError(f"ollama create {payload['model']} ended without success: {statuses[-3:]}")
        return statuses

    def chat(self, model: str, messages: list[dict], options: dict) -> dict:
        return self._json(
            "POST", "/api/chat", {"model": model, "messages": messages, "stream": False, "options": options}
        )

    def show(self, model: str) -> dict:
        return self._json("POST", "/api/show", {"model": model})

    def unload(self, model: str) -> None:
        self._json("POST", "/api/generate", {"model": model, "keep_alive": 0})


def _ndjson(response) -> Iterator[dict]:
    for line in response:
        line = line.strip()
        if line:
            yield json.loads(line)


def _error_text(text: str) -> str:
    try:
        return json.loads(text).get("error", text)
    except (json.JSONDecodeError, AttributeError):
        return text.strip()


def _hint(text: str) -> str:
    lowered = text.lower()
    hint = next((h for key, h in HINTS.items() if key in lowered), None)
    return f" (hint: {hint})" if hint else ""
