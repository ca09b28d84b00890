"""A local HTTP server serving the hub endpoints tuneship uses, with real files.

GET /api/models (list, filtered by search), GET /api/models/<repo>/revision/<rev>?blobs=true
(siblings with size and LFS sha256), GET /<repo>/resolve/<rev>/<file> (the bytes).
"""

from __future__ import annotations

import base64
import hashlib
import json
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlparse

from tests.servers import LoopbackServer


class FakeHub(LoopbackServer):
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.downloads = {}
        self.tamper: set[str] = set()
        self.paths: list[str] = []
        super().__init__(self._handler())

    def add(self, repo: str, files: dict[str, bytes], downloads: int = 0) -> None:
        self.repos[repo] = files
        self.downloads[repo] = downloads

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, content_type="application/json", headers=None):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urlparse(self.path)
                path = unquote(url.path)
                hub.paths.append(self.path)
                if path == "/api/models":
                    search = parse_qs(url.query).get("search", [""])[0].lower()
                    found = [
                        {"id": repo, "modelId": repo, "downloads": hub.downloads[repo], "likes": 1, "tags": ["gguf"]}
                        for repo in hub.repos
                        if search in repo.lower()
                    ]
                    found.sort(key=lambda m: -m["downloads"])
                    return self._send(200, json.dumps(found).encode())
                if path.startswith("/api/models/"):
                    repo = path.removeprefix("/api/models/").split("/revision/")[0]
                    if repo not in hub.repos:
                        return self._send(
                            404, b'{"error": "Repository not found"}', headers={"X-Error-Code": "RepoNotFound"}
                        )  # as the hub does
                    siblings = [
                        {
                            "rfilename": name,
                            "size": len(data),
                            "blobId": hashlib.sha1(data).hexdigest(),
                            "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134},
                        }
                        for name, data in hub.repos[repo].items()
                    ]
                    return self._send(200, json.dumps({"id": repo, "sha": "0" * 40, "siblings": siblings}).encode())
                for repo, files in hub.repos.items():
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):
                        name = path.removeprefix(prefix).split("/", 1)[1]
                        data = files[name] + (b"tampered" if name in hub.tamper else b"")
                        return self._send(200, data, "application/octet-stream")
                self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                path = unquote(urlparse(self.path).path)
                hub.paths.append(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = (
                        f"{request['organization']}/{request['name']}"
                        if request.get("organization")
                        else request["name"]
                    )
                    hub.repos.setdefault(repo, {})
                    hub.downloads.setdefault(repo, 0)
                    return self._send(200, json.dumps({"url": f"{hub.url}/{repo}"}).encode())
                if path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    errors = [] if content.startswith("---\n") else [{"message": "no YAML metadata"}]
                    return self._send(
                        200 if not errors else 400, json.dumps({"errors": errors, "warnings": []}).encode()
                    )
                if path.endswith("/preupload/main"):
                    files = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in json.loads(body)["files"]
                    ]
                    return self._send(200, json.dumps({"files": files}).encode())
                if path.endswith("/commit/main"):
                    repo = path.removeprefix("/api/models/").removesuffix("/commit/main")
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            assert value["encoding"] == "base64"
                            hub.repos[repo][value["path"]] = base64.b64decode(value["content"])
                    return self._send(
                        200, json.dumps({"commitUrl": f"{hub.url}/{repo}/commit/1", "commitOid": "1" * 40}).encode()
                    )
                self._send(404, b'{"error": "not found"}')

        return Handler
