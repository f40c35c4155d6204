"""Fetch the image of a Label Studio task for the ML backend's ``/predict``.

A task's image URL is one of:

- ``/data/local-files/?d=<path under the document root>`` (local-files storage): read from disk
  when ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` is set here and the file is below it (no HTTP,
  path traversal refused); otherwise downloaded from Label Studio;
- another Label Studio path (``/data/upload/...``) or an absolute URL on the Label Studio host:
  downloaded with Label Studio credentials (``LABEL_STUDIO_API_KEY`` — a legacy token, or a personal
  access token that is exchanged for a short-lived access token — or else the token Label Studio
  passed to ``/setup``) and the project's basic-auth task-data login when it has one;
- an ``http(s)`` URL on another host: downloaded without credentials.

Cloud URIs (``s3://`` ...) are refused with a clear error. Tokens never appear in messages.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MadsegError
from ..imageio import decode_rgb, read_rgb

#: Refuse downloads larger than this (bytes).
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
_TIMEOUT = (5, 60)


def _jwt_claims(token: str) -> dict | None:
    """The (unverified) claims of a JWT, or None when ``token`` is not a JWT (e.g. a legacy token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        pad = "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + pad))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """``Authorization`` header for Label Studio from a legacy token or a personal access token.

    A personal access token (a JWT refresh token) is exchanged at ``/api/token/refresh`` for an
    access token, cached until shortly before it expires. Thread-safe.
    """

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._is_jwt = _jwt_claims(token) is not None
        self._access: str | None = None
        self._access_exp = 0.0
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        if not self._is_jwt:
            return {"Authorization": f"Token {self._token}"}
        with self._lock:
            if self._access is None or time.time() > self._access_exp - 30:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        with self._lock:
            self._access = None

    def _refresh(self) -> None:
        import requests

        url = f"{self.base_url}/api/token/refresh"
        try:
            r = requests.post(url, json={"refresh": self._token}, timeout=_TIMEOUT)
        except requests.RequestException as exc:
            raise MadsegError(f"{url}: cannot reach Label Studio to refresh the access token "
                              f"({type(exc).__name__})") from None
        if r.status_code != 200:
            raise MadsegError(f"{url}: Label Studio refused LABEL_STUDIO_API_KEY (HTTP {r.status_code}); "
                              "create a new personal access token")
        access = r.json().get("access")
        if not isinstance(access, str):
            raise MadsegError(f"{url}: unexpected token refresh answer (no 'access')")
        self._access = access
        claims = _jwt_claims(access) or {}
        self._access_exp = float(claims.get("exp") or time.time() + 240)


@dataclass
class ImageSource:
    """Where task images come from: the document root, the Label Studio URL and its credentials."""

    document_root: Path | None = None
    label_studio_url: str | None = None
    auth: LabelStudioAuth | None = None
    setup_token: str | None = None  # the owner's token LS sent to /setup (used when auth is None)

    def _ls_headers(self) -> dict[str, str]:
        if self.auth is not None:
            return self.auth.headers()
        if self.setup_token:
            kind = "Bearer" if _jwt_claims(self.setup_token) else "Token"
            return {"Authorization": f"{kind} {self.setup_token}"}
        return {}

    def local_path(self, url: str) -> Path | None:
        """The file behind a local-files URL below ``document_root``, or None if not applicable."""
        if self.document_root is None:
            return None
        parsed = urllib.parse.urlparse(url)
        if not parsed.path.rstrip("/").endswith("/data/local-files"):
            return None
        rel = urllib.parse.parse_qs(parsed.query).get("d", [None])[0]
        if not rel:
            return None
        root = self.document_root.resolve()
        path = (root / rel.lstrip("/")).resolve()
        if root != path and root not in path.parents:
            raise MadsegError(f"image URL {url!r} points outside the document root; refusing to read it")
        return path if path.is_file() else None

    def load(self, url: str, what: str, login: tuple[str, str] | None = None) -> np.ndarray:
        """The image at ``url`` as an (H, W, 3) uint8 RGB array; :class:`MadsegError` naming ``what``."""
        if not isinstance(url, str) or not url.strip():
            raise MadsegError(f"{what}: no image URL in the task data")
        path = self.local_path(url)
        if path is not None:
            return read_rgb(path)
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme and parsed.scheme not in ("http", "https"):
            raise MadsegError(f"{what}: {parsed.scheme}:// image URLs are not supported; use local-files "
                              "storage or http(s) URLs")
        base = self.label_studio_url
        same_host = False
        if not parsed.scheme:
            if not base:
                raise MadsegError(f"{what}: the image URL is relative to Label Studio; set LABEL_STUDIO_URL "
                                  "(or connect the backend from Label Studio so /setup passes its address)")
            url = urllib.parse.urljoin(base.rstrip("/") + "/", url.lstrip("/"))
            same_host = True
        elif base:
            same_host = urllib.parse.urlparse(base).netloc == parsed.netloc
        headers = self._ls_headers() if same_host else {}
        data = self._download(url, what, headers, login if same_host else None)
        return decode_rgb(data, name=what)

    def _download(self, url: str, what: str, headers: dict[str, str], login: tuple[str, str] | None) -> bytes:
        import requests

        shown = urllib.parse.urlparse(url)._replace(query="").geturl()
        last: str = ""
        for attempt in range(3):
            try:
                with requests.get(url, headers=headers, auth=login, timeout=_TIMEOUT, stream=True) as r:
                    if r.status_code == 401 and self.auth is not None and attempt == 0:
                        self.auth.invalidate()
                        headers = {**headers, **self._ls_headers()}
                        continue
                    if r.status_code >= 500:
                        last = f"HTTP {r.status_code}"
                    elif r.status_code != 200:
                        raise MadsegError(f"{what}: downloading {shown} failed with HTTP {r.status_code}")
                    else:
                        chunks, size = [], 0
                        for chunk in r.iter_content(1 << 16):
                            size += len(chunk)
                            if size > MAX_DOWNLOAD_BYTES:
                                raise MadsegError(
                                    f"{what}: {shown} is larger than {MAX_DOWNLOAD_BYTES} bytes"
                                )
                            chunks.append(chunk)
                        return b"".join(chunks)
            except requests.RequestException as exc:
                last = type(exc).__name__
            time.sleep(0.5 * (attempt + 1))
        raise MadsegError(f"{what}: downloading {shown} failed after 3 attempts ({last})")
