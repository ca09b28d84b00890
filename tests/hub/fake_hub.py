"""A local HTTP server serving the hub endpoints tuneship uses, with real files.

GET /api/models (list, filtered by search), GET /api/models/<repo>/revision/<rev>?blobs=true
(siblings with size and LFS sha256), GET /api/models/<repo>/tree/<rev> (the file listing that
huggingface_hub's snapshot_download reads), HEAD and GET /<repo>/resolve/<rev>/<file> (metadata headers
as the hub sends them, the bytes). A repo's commit sha is a hash of its files, so changing a file is a new
commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from tests.servers import LoopbackServer


NOT_FOUND = {"X-Error-Code": "RepoNotFound"}  # as the hub marks a missing repository


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

    def commit(self, repo: str) -> str:
        digest = hashlib.sha1()
        for name, data in sorted(self.repos[repo].items()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return digest.hexdigest()

    def file_entry(self, name: str, data: bytes) -> dict:
        """A file as the tree endpoint lists it (every file is LFS here)."""
        lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest(), "lfs": lfs}

    def resolve(self, path: str) -> tuple[str, bytes] | None:
        """(repo, bytes) for /<repo>/resolve/<rev>/<file>, None when there is no such file."""
        for repo, files in self.repos.items():
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                name = path.removeprefix(prefix).split("/", 1)[1]
                if name in files:
                    return repo, files[name] + (b"tampered" if name in self.tamper else b"")
        return None

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
                if path.startswith("/api/models/") and "/tree/" in path:
                    repo = path.removeprefix("/api/models/").split("/tree/")[0]
                    if repo not in hub.repos:
                        return self._send(404, b'{"error": "Repository not found"}', headers=NOT_FOUND)
                    entries = [hub.file_entry(name, data) for name, data in hub.repos[repo].items()]
                    return self._send(200, json.dumps(entries).encode())
                if path.startswith("/api/models/"):
                    repo = path.removeprefix("/api/models/").split("/revision/")[0]
                    if repo not in hub.repos:
                        return self._send(404, b'{"error": "Repository not found"}', headers=NOT_FOUND)
                    siblings = [
                        {
                            "rfilename": name,
                            "size": len(data),
                            "blobId": hashlib.sha1(data).hexdigest(),
                            "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134},
                        }
                        for name, data in hub.repos[repo].items()
                    ]
                    info = {"id": repo, "sha": hub.commit(repo), "siblings": siblings}
                    return self._send(200, json.dumps(info).encode())
                found = hub.resolve(path)
                if found:
                    return self._send(200, found[1], "application/octet-stream", headers=self._file_headers(*found))
                self._send(404, b'{"error": "not found"}', headers={"X-Error-Code": "EntryNotFound"})

            def do_HEAD(self):
                hub.paths.append(f"HEAD {self.path}")
                found = hub.resolve(unquote(urlparse(self.path).path))
                if found is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                for key, value in self._file_headers(*found).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(found[1])))
                self.end_headers()

            def _file_headers(self, repo: str, data: bytes) -> dict[str, str]:
                return {"X-Repo-Commit": hub.commit(repo), "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}

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


def use_fake_hub(monkeypatch, server: FakeHub, cache: Path) -> None:
    """Point huggingface_hub at the server, as HF_ENDPOINT would at start-up, with an empty cache."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
