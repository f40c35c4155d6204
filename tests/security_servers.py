"""Tiny HTTP servers on 127.0.0.1 / ::1 for the backend's security tests (image hosts, redirects,
slow hosts). Each records the requests it got (path and headers) so a test can check what was sent.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[["Request"], tuple[int, dict[str, str], bytes] | None]


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    handler: Any = field(repr=False, default=None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _V6Server(_Server):
    address_family = socket.AF_INET6


class TestServer:
    """``routes``: path (without query) -> a function of the :class:`Request` returning (status,
    headers, body), or None when it wrote the answer itself (e.g. dripping bytes)."""

    __test__ = False  # not a pytest class

    def __init__(self, routes: dict[str, Handler], host: str = "127.0.0.1") -> None:
        self.routes = routes
        self.requests: list[Request] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                req = Request(self.path, {k: v for k, v in self.headers.items()}, self)
                outer.requests.append(req)
                fn = outer.routes.get(self.path.split("?", 1)[0])
                if fn is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = fn(req)
                if answer is None:
                    return
                status, headers, body = answer
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            do_POST = do_GET  # noqa: N815

        cls = _V6Server if ":" in host else _Server
        self.httpd = cls((host, 0), H)
        self.port = self.httpd.server_address[1]
        self.host = host
        bracket = f"[{host}]" if ":" in host else host
        self.url = f"http://{bracket}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def drip(body: bytes, every_s: float) -> Handler:
    """A handler that announces ``body`` and sends it one byte every ``every_s`` seconds."""

    def fn(req: Request) -> None:
        h = req.handler
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            for b in body:
                h.wfile.write(bytes([b]))
                h.wfile.flush()
                time.sleep(every_s)
        except OSError:
            pass
        return None

    return fn
