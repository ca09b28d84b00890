"""A loopback HTTP server run in a thread, for the test doubles of Ollama and the hub."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


class _JoinedThreadsServer(ThreadingHTTPServer):
    """server_close() waits for every request thread: none is left answering a late request while later tests
    run (a leftover thread once raced CPython 3.11's AST depth counter in tests/test_dependencies.py)."""

    daemon_threads = False
    block_on_close = True


class LoopbackServer:
    def __init__(self, handler):
        self.server = _JoinedThreadsServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
