"""Request limits of the ML backend: body size before reading, deadlines, concurrent predictions.

- :class:`BodyLimit` is WSGI middleware: a body whose ``Content-Length`` is over the limit is
  answered 413 without reading a byte of it; a body without a length (``Transfer-Encoding:
  chunked``) is read into memory only up to the limit, and answered 413 as soon as it passes it.
  Every body is read within ``read_timeout_s`` (under gunicorn a watchdog shuts the socket's read
  side at that time), else 408: a client that sends its body a byte at a time cannot hold a server
  thread. The app below sees a body of known length that fits, already in memory. (Werkzeug 2.0.2,
  pinned by label-studio-ml 1.0.9, ignores ``MAX_CONTENT_LENGTH`` for ``get_json``; this does not
  depend on it.)
- :class:`Deadline` is the time budget of one request (monotonic clock).
- :class:`ConcurrencyGate` lets at most ``n`` heavy requests run at once and refuses the next one at
  once instead of queueing it, so a server thread always stays free for ``/health``.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
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


class _TooLarge(Exception):
    pass


class BodyLimit:
    """WSGI middleware refusing request bodies over ``max_bytes`` with 413, and bodies that do not
    arrive within ``read_timeout_s`` with 408 (module docstring)."""

    def __init__(self, app: WSGIApp, max_bytes: int, read_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.read_timeout_s = float(read_timeout_s)

    def _too_large(self, start_response: Callable[..., Any]) -> list[bytes]:
        return _json_error(start_response, "413 Request Entity Too Large",
                           f"request body larger than {self.max_bytes} bytes")

    def _read(self, environ: dict[str, Any], length: int | None) -> bytes:
        """The body (``length`` bytes, or up to the end of a chunked one) within the time limit.

        Raises :class:`_TooLarge` past ``max_bytes`` and :class:`TimeoutError` when time is up.
        """
        stream = environ["wsgi.input"]
        sock = environ.get("gunicorn.socket")
        expired = threading.Event()

        def _cut() -> None:
            expired.set()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)  # the blocked read returns; the answer can still be sent

        watchdog = threading.Timer(self.read_timeout_s, _cut)
        watchdog.daemon = True
        watchdog.start()
        buf = bytearray()
        try:
            while length is None or len(buf) < length:
                want = 1 << 16 if length is None else min(1 << 16, length - len(buf))
                piece = stream.read(min(want, self.max_bytes + 1 - len(buf)))
                if expired.is_set():
                    raise TimeoutError
                if not piece:
                    break
                buf += piece
                if len(buf) > self.max_bytes:
                    raise _TooLarge
        except _TooLarge:
            raise
        except Exception as exc:  # after the cut, a reset, gunicorn's NoMoreData: the body did not arrive
            raise TimeoutError from exc
        finally:
            watchdog.cancel()
        if expired.is_set() or (length is not None and len(buf) < length):
            raise TimeoutError
        return bytes(buf)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length_raw = (environ.get("CONTENT_LENGTH") or "").strip()
        chunked = "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower()
        length: int | None = None
        if length_raw and not chunked:
            if not length_raw.isascii() or not length_raw.isdigit():
                return _json_error(start_response, "400 Bad Request", "invalid Content-Length")
            length = int(length_raw)
            if length > self.max_bytes:
                return self._too_large(start_response)
            if length == 0:
                return self.app(environ, start_response)
        elif not chunked:
            return self.app(environ, start_response)
        try:
            body = self._read(environ, length)
        except _TooLarge:
            return self._too_large(start_response)
        except TimeoutError:
            return _json_error(start_response, "408 Request Timeout",
                               f"request body not received within {self.read_timeout_s:g} s")
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
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
