"""A minimal headless-Chromium driver over the DevTools protocol (``--remote-debugging-pipe``).

No extra packages: Chromium reads JSON commands from file descriptor 3 and writes answers and
events to file descriptor 4, each message ending with a NUL byte.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    env = os.environ.get("MADSEG_CHROMIUM")
    if env:
        return env
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """Headless Chromium with one page; ``cmd(method, **params)`` sends a DevTools command to it."""

    def __init__(self, executable: str, width: int = 1400, height: int = 1000) -> None:
        self.profile = tempfile.mkdtemp(prefix="madseg-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def remap() -> None:  # in the child: our pipe ends become fds 3 (commands) and 4 (answers)
            import fcntl

            high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)  # dup2 targets are inheritable; everything else is close-on-exec
            os.dup2(high_w, 4)
            os.close(high_r)
            os.close(high_w)

        args = [
            executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
            f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
            "--remote-debugging-pipe", "about:blank",
        ]
        self.proc = subprocess.Popen(
            args, close_fds=False, preexec_fn=remap, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.cmd("Target.createTarget", url="about:blank", session=False)["targetId"]
        attached = self.cmd("Target.attachToTarget", targetId=target, flatten=True, session=False)
        self.session = attached["sessionId"]
        self.cmd("Page.enable")
        self.cmd("Runtime.enable")
        self.cmd("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                 mobile=False)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._answers[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cond.notify_all()

    def cmd(self, method: str, timeout: float = 60.0, session: bool = True, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; raises RuntimeError on a protocol error."""
        self._next_id += 1
        mid = self._next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"Chromium: no answer to {method} (exit status {self.proc.poll()})")
                self._cond.wait(min(left, 0.5))
            answer = self._answers.pop(mid)
        if "error" in answer:
            raise RuntimeError(f"Chromium: {method} failed: {answer['error']}")
        return answer.get("result", {})

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """Value of a JavaScript expression in the page (promises awaited)."""
        res = self.cmd("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                       awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JavaScript error: {res['exceptionDetails'].get('text')}")
        return res.get("result", {}).get("value")

    def goto(self, url: str, timeout: float = 60.0) -> None:
        """Navigate and wait until the document has loaded."""
        self.cmd("Page.navigate", url=url)
        prefix = json.dumps(url[:20])
        self.wait_for(f"document.readyState === 'complete' && location.href.startsWith({prefix})", timeout)

    def wait_for(self, expression: str, timeout: float = 60.0, every: float = 0.25) -> Any:
        """Poll a JavaScript expression until it is truthy; its value, or TimeoutError."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except RuntimeError as exc:  # page navigating: context destroyed
                last_error = str(exc)
            time.sleep(every)
        raise TimeoutError(f"waited {timeout:.0f} s for {expression!r} {last_error}")

    def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """Save a PNG screenshot of the viewport."""
        data = self.cmd("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cmd("Browser.close", timeout=5, session=False)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
