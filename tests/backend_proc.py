"""Test support: the ML backend as a real process on 127.0.0.1 (``python -m ml_backend`` by default,
or ``madseg backend``), started with a given environment, waited on until ``/health`` answers 200,
and stopped (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests


def wait_healthy(
    url: str,
    proc: subprocess.Popen[Any],
    *,
    timeout: float = 90.0,
    auth: tuple[str, str] | None = None,
    poll: float = 0.3,
    log: Callable[[], str] = lambda: "",
) -> None:
    """Return once ``GET {url}/health`` answers 200; :class:`AssertionError` (with ``log()``) when
    ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the ML backend exited with {proc.returncode} while starting:\n{log()}")
        try:
            if requests.get(f"{url}/health", auth=auth, timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or still loading the model
            pass
        time.sleep(poll)
    raise AssertionError(f"the ML backend did not answer {url}/health within {timeout:.0f} s:\n{log()}")


def stop_process(proc: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it when it has not exited after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class BackendProcess:
    """An ML backend process listening on 127.0.0.1:``env["MADSEG_BACKEND_PORT"]``, healthy once
    constructed (stopped again if it does not become healthy); stdout and stderr go to ``log_path``.

    ``argv`` defaults to ``python -m ml_backend`` (gunicorn); ``auth`` is the basic auth of its
    requests; ``new_session`` starts it in its own session (out of reach of the test's signals)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        auth: tuple[str, str] | None = None,
        argv: Sequence[str] | None = None,
        cwd: Path | None = None,
        timeout: float = 90.0,
        new_session: bool = False,
    ) -> None:
        self.env, self.auth = env, auth
        self.url = f"http://127.0.0.1:{env['MADSEG_BACKEND_PORT']}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(list(argv or [sys.executable, "-m", "ml_backend"]), env=env, cwd=cwd,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=new_session)
        try:
            wait_healthy(self.url, self.proc, timeout=timeout, auth=auth, log=self.log)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        """The last 5000 characters of the process's output."""
        return self.log_path.read_text(errors="replace")[-5000:]

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        """``POST {url}{path}`` with ``body`` as JSON and the process's basic auth."""
        return requests.post(f"{self.url}{path}", json=body, auth=self.auth, timeout=120, **kw)

    def stop(self) -> None:
        """Stop the process (see :func:`stop_process`) and close its log."""
        stop_process(self.proc)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
