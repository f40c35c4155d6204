"""Fetch the image of a Label Studio task for the ML backend's ``/predict``, within the backend's
security policy.

A task's image URL is one of:

- ``/data/local-files/?d=<path>`` (local-files storage; relative, or absolute on the Label Studio
  origin): read from disk when :class:`ml_backend.localfiles.LocalFilesPolicy` allows the path
  (inside the servable folders under the document root, after ``..`` and symlinks; an image file;
  never ground truth; size cap). A path the policy refuses is refused (no download either); an
  allowed path that does not exist on this machine is downloaded from Label Studio;
- another path on Label Studio (``/data/upload/...``), or an absolute URL on the Label Studio
  origin: downloaded with Label Studio credentials;
- an ``http(s)`` URL on another host: downloaded WITHOUT credentials, only when the host is listed
  in ``MADSEG_IMAGE_HOSTS`` and resolves to public addresses (:mod:`ml_backend.netguard`).

Credentials and where they go: ``LABEL_STUDIO_API_KEY`` (a legacy token, or a personal access token
that is exchanged for a short-lived access token) is used only together with ``LABEL_STUDIO_URL``
and sent only to that origin. The token Label Studio passes to ``/setup`` is sent only to the
origin it came with. A redirect to another origin never carries either (netguard). Downloads
follow at most 3 redirects, each checked again; connect/read timeouts, the request's deadline and
a byte cap bound every download; decoding is bounded by pixel caps read from the image header
(:mod:`ml_backend.image_limits`). Cloud URIs (``s3://`` ...) are refused. Tokens and query strings
never appear in messages.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import MadsegError
from ..image_limits import decode_capped
from ..limits import Deadline
from ..localfiles import LocalFileRefused, LocalFilesPolicy, local_files_param
from ..netguard import FetchError, Origin, UrlPolicy, UrlRefused, fetch_retrying, origin_of

log = logging.getLogger(__name__)

#: Refuse downloads larger than this (bytes) unless the caller gives another cap.
MAX_DOWNLOAD_BYTES = 32 * 1024 * 1024
_REFRESH_TIMEOUT = (5, 20)


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
    access token, cached until shortly before it expires. The exchange never follows redirects
    (a 307 would re-send the token to wherever it points). Thread-safe.
    """

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.origin = origin_of(self.base_url)
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
            r = requests.post(url, json={"refresh": self._token}, timeout=_REFRESH_TIMEOUT,
                              allow_redirects=False)
        except requests.RequestException as exc:
            raise MadsegError(f"{url}: cannot reach Label Studio to refresh the access token "
                              f"({type(exc).__name__})") from None
        if r.status_code != 200:
            raise MadsegError(f"{url}: Label Studio refused LABEL_STUDIO_API_KEY (HTTP {r.status_code}); "
                              "create a new personal access token")
        try:
            access = r.json().get("access")
        except ValueError:
            access = None
        if not isinstance(access, str):
            raise MadsegError(f"{url}: unexpected token refresh answer (no 'access')")
        self._access = access
        claims = _jwt_claims(access) or {}
        self._access_exp = float(claims.get("exp") or time.time() + 240)


@dataclass(frozen=True)
class FetchLimits:
    """Caps for one image: bytes, pixels decoded, pixels predicted, connect/read timeouts (s)."""

    max_bytes: int = MAX_DOWNLOAD_BYTES
    max_pixels: int = 40_000_000
    predict_pixels: int = 16_000_000
    connect_s: float = 5.0
    read_s: float = 20.0


@dataclass
class ImageSource:
    """Where task images come from (module docstring).

    ``label_studio_url``: the base of relative task URLs; ``policy``: which URLs may be fetched (its
    trusted origin is the only one credentials go to); ``local``: the local-files policy (None: local
    files are downloaded from Label Studio); ``auth``: ``LABEL_STUDIO_API_KEY`` (only with
    ``LABEL_STUDIO_URL``); ``setup_token``: what Label Studio sent to ``/setup``, for
    ``setup_origin`` only.
    """

    policy: UrlPolicy
    label_studio_url: str | None = None
    local: LocalFilesPolicy | None = None
    auth: LabelStudioAuth | None = None
    setup_token: str | None = None
    setup_origin: Origin | None = None
    limits: FetchLimits = FetchLimits()

    def _credentials(self, origin: Origin, login: tuple[str, str] | None) -> dict[str, str]:
        if self.auth is not None and origin == self.auth.origin:
            return self.auth.headers()
        if self.setup_token and origin == self.setup_origin:
            kind = "Bearer" if _jwt_claims(self.setup_token) else "Token"
            return {"Authorization": f"{kind} {self.setup_token}"}
        if login is not None:
            raw = f"{login[0]}:{login[1]}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def _on_label_studio(self, url: str) -> bool:
        if not self.label_studio_url:
            return False
        try:
            return origin_of(url) == origin_of(self.label_studio_url)
        except UrlRefused:
            return False

    def load(
        self, url: object, what: str, login: tuple[str, str] | None = None, deadline: Deadline | None = None
    ) -> np.ndarray:
        """The image at ``url`` as an (H, W, 3) uint8 RGB array with at most ``predict_pixels`` pixels.

        Raises :class:`MadsegError` naming ``what`` (never a token or query string) when the URL is
        refused, the download fails or the bytes are not an image within the caps.
        """
        deadline = deadline or Deadline(60)
        if not isinstance(url, str) or not url.strip():
            raise MadsegError(f"{what}: no image URL in the task data")
        if any(ord(c) < 0x20 or c == "\x7f" for c in url):
            raise MadsegError(f"{what}: the image URL contains control characters (e.g. a NUL byte)")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme and parsed.scheme.lower() not in ("http", "https"):
            raise MadsegError(f"{what}: {parsed.scheme}:// image URLs are not supported; use local-files "
                              "storage or http(s) URLs")
        relative = not parsed.scheme and not parsed.netloc
        if relative or self._on_label_studio(url):
            try:
                d = local_files_param(url)
            except LocalFileRefused as exc:
                raise MadsegError(f"{what}: {exc}") from None
            if d is not None and self.local is not None:
                try:
                    data = self.local.read(d)
                    return decode_capped(data, what, max_pixels=self.limits.max_pixels,
                                         predict_pixels=self.limits.predict_pixels)
                except LocalFileRefused as exc:
                    raise MadsegError(f"{what}: {exc}") from None
                except FileNotFoundError:
                    pass  # allowed, but not on this machine: Label Studio serves it
        if relative:
            if not self.label_studio_url:
                raise MadsegError(f"{what}: the image URL is relative to Label Studio; set LABEL_STUDIO_URL "
                                  "(or connect the backend from Label Studio so /setup passes its address)")
            url = urllib.parse.urljoin(self.label_studio_url.rstrip("/") + "/", url.lstrip("/"))
        data = self._download(url, what, login, deadline)
        return decode_capped(data, what, max_pixels=self.limits.max_pixels,
                             predict_pixels=self.limits.predict_pixels)

    def _download(self, url: str, what: str, login: tuple[str, str] | None, deadline: Deadline) -> bytes:
        def creds(origin: Origin) -> Mapping[str, str]:
            return self._credentials(origin, login)

        try:
            return fetch_retrying(url, self.policy, deadline=deadline, max_bytes=self.limits.max_bytes,
                                  credentials=creds, connect_timeout=self.limits.connect_s,
                                  read_timeout=self.limits.read_s,
                                  # an expired access token: refresh once
                                  on_unauthorized=self.auth.invalidate if self.auth is not None else None)
        except UrlRefused as exc:
            raise MadsegError(f"{what}: image URL refused: {exc}") from None
        except FetchError as exc:
            raise MadsegError(f"{what}: {exc}") from None
