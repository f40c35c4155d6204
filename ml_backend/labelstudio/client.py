"""Connection to Label Studio from ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``.

:func:`connect` returns a :class:`LabelStudioClient`: it behaves like the SDK's
``label_studio_sdk.LabelStudio`` (attribute access is delegated to it, so ``client.projects``,
``client.ml`` ... work) and adds :meth:`LabelStudioClient.call` / :meth:`LabelStudioClient.request`,
which retry connection errors, timeouts and 5xx answers a bounded number of times with exponential
backoff, then raise one clear :class:`ml_backend.errors.MadsegError`. The API key may be a legacy
token or a personal access token (a JWT refresh token); the SDK tells them apart and refreshes the
access token by itself. Tokens and payloads never appear in messages.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import MadsegError

log = logging.getLogger(__name__)
T = TypeVar("T")

URL_ENV = "LABEL_STUDIO_URL"
KEY_ENV = "LABEL_STUDIO_API_KEY"
DEFAULT_URL = "http://localhost:8080"
START_HINT = (
    "start it with `label-studio start` (see README) or set LABEL_STUDIO_URL to where it runs"
)


class LabelStudioUnreachable(MadsegError):
    """Label Studio did not answer (connection refused, timeouts, 5xx) after all retries."""


class LabelStudioAPIError(MadsegError):
    """Label Studio answered a request with a client error (4xx)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _short_detail(body: Any, limit: int = 300) -> str:
    """A short, token-free description of an error body."""
    if isinstance(body, dict):
        for key in ("validation_errors", "detail", "message", "error"):
            if key in body:
                return str(body[key])[:limit]
        return str(body)[:limit]
    return str(body)[:limit] if body else ""


def _transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection problems, timeouts, 5xx / 429 answers."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ApiError):
        return exc.status_code is None or exc.status_code >= 500 or exc.status_code in (408, 429)
    return False


class LabelStudioClient:
    """The SDK client plus retrying calls with clear errors; see the module docstring."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        retries: int = 4,
        backoff_s: float = 0.5,
        timeout_s: float = 120.0,
    ) -> None:
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.timeout_s = float(timeout_s)
        # The SDK's own retries are off: ours are bounded and end in a clear message.
        self.sdk = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout_s, max_retries=0)

    def __getattr__(self, name: str) -> Any:
        if name == "sdk":  # not yet set (during unpickling / a failed __init__)
            raise AttributeError(name)
        return getattr(self.sdk, name)

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r})"

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn()`` (an SDK call), retrying transient failures; ``what`` names it in errors."""
        from label_studio_sdk.core.api_error import ApiError

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:
                if not _transient(exc):
                    if isinstance(exc, ApiError):
                        raise LabelStudioAPIError(
                            f"Label Studio at {self.url}: {what} failed (HTTP {exc.status_code}: "
                            f"{_short_detail(exc.body)})" + _hint(exc.status_code),
                            exc.status_code,
                        ) from None
                    raise
                if attempt == self.retries:
                    raise LabelStudioUnreachable(
                        f"Label Studio at {self.url} unreachable: {what} failed after "
                        f"{self.retries + 1} attempts ({_describe(exc)}); {START_HINT}"
                    ) from None
                log.warning("Label Studio %s: %s failed (%s); retrying in %.1f s", self.url, what,
                            _describe(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")  # pragma: no cover

    def request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """A raw API call (``path`` like ``api/projects/3/export``) with retries; the decoded JSON.

        For endpoints the SDK lacks or where its models are slow (bulk import, export).
        """
        from label_studio_sdk.core.api_error import ApiError

        http = self.sdk._client_wrapper.httpx_client
        opts = {"max_retries": 0, "timeout_in_seconds": int(timeout_s or self.timeout_s)}

        def go() -> Any:
            resp = http.request(path.lstrip("/"), method=method, json=json, params=params,
                                request_options=opts)
            if resp.status_code >= 400:
                try:
                    body = resp.json()
                except ValueError:
                    body = resp.text[:300]
                raise ApiError(status_code=resp.status_code, headers=dict(resp.headers), body=body)
            if not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise LabelStudioAPIError(
                    f"Label Studio at {self.url}: {what}: the answer is not JSON "
                    f"(HTTP {resp.status_code}); is {self.url} a Label Studio server?"
                ) from None

        return self.call(what, go)

    def post_json_once(
        self, path: str, payload: Any, *, params: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """One POST of a large JSON body, no retries (the caller decides; e.g. a bulk import must
        re-check what arrived before sending again). Returns the ``httpx.Response``.

        The body is serialised with ``ujson`` when available (a dependency of the SDK), not by the
        SDK's per-element encoder: brush RLEs make bodies of tens of KB per task.
        """
        try:
            import ujson as fast_json

            body = fast_json.dumps(payload, ensure_ascii=False).encode("utf-8")
        except ImportError:  # pragma: no cover - ujson ships with label-studio-sdk
            import json as fast_json

            body = fast_json.dumps(payload).encode("utf-8")
        wrapper = self.sdk._client_wrapper
        headers = {**wrapper.get_headers(), "Content-Type": "application/json"}
        return wrapper.httpx_client.httpx_client.post(
            f"{self.url}/{path.lstrip('/')}", content=body, params=params, headers=headers,
            timeout=timeout_s or self.timeout_s,
        )

    def check(self) -> dict[str, Any]:
        """Who we are logged in as (``/api/current-user/whoami``); fails clearly when unusable."""
        me = self.request("GET", "api/current-user/whoami", "checking the API key")
        if not isinstance(me, dict) or "id" not in me:
            raise MadsegError(f"Label Studio at {self.url}: unexpected answer to whoami; is it Label Studio?")
        return me


def _describe(exc: BaseException) -> str:
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, ApiError):
        return f"HTTP {exc.status_code}"
    text = str(exc).split("\n")[0][:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _hint(status: int | None) -> str:
    if status == 401:
        return f"; check {KEY_ENV} (a legacy token or a personal access token of this server)"
    if status == 403:
        return "; the API key's user lacks permission (or legacy tokens are disabled for the organisation)"
    if status == 404:
        return "; does that project / task exist on this server?"
    return ""


def connect(
    url: str | None = None,
    api_key: str | None = None,
    *,
    retries: int = 4,
    backoff_s: float = 0.5,
    timeout_s: float = 120.0,
    check: bool = True,
) -> LabelStudioClient:
    """A client for Label Studio at ``url`` (default ``$LABEL_STUDIO_URL``) with ``api_key``
    (default ``$LABEL_STUDIO_API_KEY``); with ``check`` the key is verified with one request."""
    url = (url or os.environ.get(URL_ENV) or "").strip()
    if not url:
        raise MadsegError(f"{URL_ENV} is not set; set it to the Label Studio address (e.g. {DEFAULT_URL})")
    if not url.startswith(("http://", "https://")):
        raise MadsegError(f"{URL_ENV}={url!r} is not an http(s) URL; e.g. {DEFAULT_URL}")
    api_key = (api_key or os.environ.get(KEY_ENV) or "").strip()
    if not api_key:
        raise MadsegError(
            f"{KEY_ENV} is not set; copy a token from Label Studio (Account & Settings > "
            "Personal Access Token, or the legacy token) into it"
        )
    client = LabelStudioClient(url, api_key, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)
    if check:
        client.check()
    return client
