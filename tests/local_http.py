"""A real HTTP server on 127.0.0.1 for tests of code that talks to the network."""

from __future__ import annotations

import http.server
import threading


class LocalHTTPServer:
    """Serves ``handler`` on a free 127.0.0.1 port in a daemon thread; ``url`` ends with ``path``."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], path: str = ""):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
