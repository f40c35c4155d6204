"""Request limits of the ML backend: body size before reading, deadlines, concurrent predictions.

- :class:`BodyLimit` is WSGI middleware: a body whose ``Content-Length`` is over the limit is
  answered 413 without reading a byte of it; a body without a length (``Transfer-Encoding:
  chunked``) is read into memory only up to the limit, and answered 413 as soon as it passes it.
  The app below sees a body of known length that fits. (Werkzeug 2.0.2, pinned by label-studio-ml
  1.0.9, ignores ``MAX_CONTENT_LENGTH`` for ``get_json``; this does not depend on it.)
- :class:`Deadline` is the time budget of one request (monotonic clock).
- :class:`ConcurrencyGate` lets at most ``n`` heavy requests run at once and refuses the next one at
  once instead of queueing it, so a server thread always stays free for ``/health``.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import MadsegError

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class DeadlineExceeded(MadsegError):
    """The request's time budget is used up."""


class Deadline:
    """A point in time ``seconds`` from now; :meth:`remaining` never goes below 0."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def check(self, what: str) -> None:
        """Raise :class:`DeadlineExceeded` naming ``what`` when the time is up."""
        if self.expired:
            raise DeadlineExceeded(f"{what}: the request's {self.seconds:g} s deadline passed")


def _json_error(start_response: Callable[..., Any], status: str, message: str) -> list[bytes]:
    body = json.dumps({"status": "error", "error": message}).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Connection", "close")])
    return [body]


class BodyLimit:
    """WSGI middleware refusing request bodies over ``max_bytes`` with 413 (module docstring)."""

    def __init__(self, app: WSGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    def _too_large(self, start_response: Callable[..., Any]) -> list[bytes]:
        return _json_error(start_response, "413 Request Entity Too Large",
                           f"request body larger than {self.max_bytes} bytes")

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = (environ.get("CONTENT_LENGTH") or "").strip()
        chunked = "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower()
        if length and not chunked:
            if not length.isascii() or not length.isdigit():
                return _json_error(start_response, "400 Bad Request", "invalid Content-Length")
            if int(length) > self.max_bytes:
                return self._too_large(start_response)
            return self.app(environ, start_response)
        if not chunked:
            return self.app(environ, start_response)
        stream = environ["wsgi.input"]
        buf = bytearray()
        while True:
            piece = stream.read(min(1 << 16, self.max_bytes + 1 - len(buf)))
            if not piece:
                break
            buf += piece
            if len(buf) > self.max_bytes:
                return self._too_large(start_response)
        environ["wsgi.input"] = io.BytesIO(bytes(buf))
        environ["CONTENT_LENGTH"] = str(len(buf))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = True
        return self.app(environ, start_response)


class Busy(MadsegError):
    """All slots of a :class:`ConcurrencyGate` are taken (answered 503)."""


class ConcurrencyGate:
    """At most ``slots`` holders at once; :meth:`enter` raises :class:`Busy` instead of waiting."""

    def __init__(self, slots: int) -> None:
        self.slots = max(1, int(slots))
        self._sem = threading.BoundedSemaphore(self.slots)

    @contextmanager
    def enter(self, what: str) -> Iterator[None]:
        if not self._sem.acquire(blocking=False):
            raise Busy(f"{what}: {self.slots} request(s) of this kind are already running; retry later")
        try:
            yield
        finally:
            self._sem.release()
