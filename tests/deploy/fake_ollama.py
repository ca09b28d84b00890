"""A local HTTP server that implements the Ollama REST endpoints tuneship uses, as documented.

It checks every request it receives: blob digests are recomputed from the uploaded bytes, /api/create
must reference uploaded blobs, and the model info /api/show returns is read from the uploaded GGUF
itself. Behaviours a test can switch on: a blob already present, an error inside the create stream,
and the reply (text, done_reason) of /api/chat.
"""

from __future__ import annotations

import hashlib
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.servers import LoopbackServer


class FakeOllama(LoopbackServer):
    def __init__(self, blob_dir: Path):
        self.blob_dir = blob_dir
        self.requests: list[tuple[str, str, dict | None]] = []
        self.models: dict[str, dict] = {}
        self.create_error: str | None = None
        self.reply = lambda messages: ("", "stop")
        self.unloaded: list[str] = []
        super().__init__(self._handler())

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest.replace(":", "-")

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json_body(self) -> dict:
                length = int(self.headers.get("Content-Length", 0))
                return json.loads(self.rfile.read(length) or b"{}")

            def do_GET(self):
                fake.requests.append(("GET", self.path, None))
                if self.path == "/api/version":
                    return self._send(200, b'{"version": "0.30.0-fake"}')
                self._send(404, b'{"error": "not found"}')

            def do_HEAD(self):
                fake.requests.append(("HEAD", self.path, None))
                digest = self.path.removeprefix("/api/blobs/")
                self._send(200 if fake.blob_path(digest).is_file() else 404)

            def do_POST(self):
                if self.path.startswith("/api/blobs/"):
                    return self._upload(self.path.removeprefix("/api/blobs/"))
                body = self._json_body()
                fake.requests.append(("POST", self.path, body))
                handler = {
                    "/api/create": self._create,
                    "/api/chat": self._chat,
                    "/api/show": self._show,
                    "/api/generate": self._generate,
                }.get(self.path)
                if handler is None:
                    return self._send(404, b'{"error": "not found"}')
                handler(body)

            def _upload(self, digest: str):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                fake.requests.append(("POST", self.path, {"bytes": len(data)}))
                actual = "sha256:" + hashlib.sha256(data).hexdigest()
                if actual != digest:
                    return self._send(400, json.dumps({"error": f"digest mismatch, got {actual}"}).encode())
                fake.blob_path(digest).write_bytes(data)
                self._send(201)

            def _create(self, body: dict):
                lines = [{"status": "parsing GGUF"}]
                blobs = [*body.get("files", {}).values(), *body.get("adapters", {}).values()]
                missing = [d for d in blobs if not fake.blob_path(d).is_file()]
                if missing:
                    lines.append({"error": f"blob {missing[0]} not found"})
                elif fake.create_error:
                    lines.append({"error": fake.create_error})
                else:
                    fake.models[body["model"]] = body
                    lines += [{"status": "writing manifest"}, {"status": "success"}]
                stream = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
                self._send(200, stream, "application/x-ndjson")

            def _chat(self, body: dict):
                if body["model"] not in fake.models:
                    return self._send(404, json.dumps({"error": f"model '{body['model']}' not found"}).encode())
                text, reason = fake.reply(body["messages"])
                self._send(
                    200,
                    json.dumps(
                        {
                            "model": body["model"],
                            "message": {"role": "assistant", "content": text},
                            "done": True,
                            "done_reason": reason,
                        }
                    ).encode(),
                )

            def _show(self, body: dict):
                from tuneship.gguf_header import read_header

                model = fake.models.get(body["model"])
                if model is None:
                    return self._send(404, json.dumps({"error": "model not found"}).encode())
                [digest] = model["files"].values()
                metadata = read_header(fake.blob_path(digest)).metadata
                info = {
                    key: metadata[key]
                    for key in ("general.architecture", "tokenizer.ggml.eos_token_id")
                    if key in metadata
                }
                stops = "\n".join(f'stop "{s}"' for s in model["parameters"].get("stop", []))
                self._send(
                    200,
                    json.dumps(
                        {
                            "template": model.get("template"),
                            "system": model.get("system"),
                            "parameters": stops,
                            "model_info": info,
                        }
                    ).encode(),
                )

            def _generate(self, body: dict):
                if body.get("keep_alive") == 0:
                    fake.unloaded.append(body["model"])
                self._send(
                    200,
                    json.dumps(
                        {"model": body["model"], "response": "", "done": True, "done_reason": "unload"}
                    ).encode(),
                )

        return Handler
