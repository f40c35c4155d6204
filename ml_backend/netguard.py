"""Which URLs the ML backend may fetch task images from, and a fetch that keeps to that policy.

Policy (:class:`UrlPolicy`, pure apart from the DNS lookup, which is injectable):

- ``http`` and ``https`` only;
- the Label Studio origin (``LABEL_STUDIO_URL``: scheme, host and port) is always allowed, whatever
  address it has (``localhost``, a compose service name on a private network);
- any other host only when it is listed in ``MADSEG_IMAGE_HOSTS`` (:func:`parse_host_rules`), and
  then only when EVERY address it resolves to is a public unicast address: loopback, private,
  link-local, multicast, reserved, unspecified, shared (CGNAT) and documentation addresses are
  refused, also when they hide inside an IPv6 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4,
  NAT64, Teredo) or are spelt in decimal, octal or hex (``2130706433``, ``0177.0.0.1``,
  ``0x7f.1``); a listed IP literal is the operator's explicit choice and is allowed as is.

:func:`fetch` resolves and checks the host, then connects to the checked address itself (the
address is pinned: a DNS answer that changes between check and connect cannot redirect the
request), checks every redirect hop again (at most ``max_redirects``), sends credentials only to
the origin they belong to and never after a hop to another origin, asks for an uncompressed body,
stops reading at ``max_bytes``, and bounds the whole exchange by a connect timeout, a per-read
timeout and an overall :class:`~ml_backend.limits.Deadline` (a watchdog shuts the socket at the
deadline, so a server that drips bytes cannot hold a thread).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .errors import MadsegError
from .limits import Deadline

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class UrlRefused(MadsegError):
    """A URL the policy does not allow (scheme, host, address, redirect); the message names it."""


class FetchError(MadsegError):
    """A fetch that failed: unreachable, timed out, HTTP error, too large.

    ``status``: the HTTP status when the server answered; ``retryable``: worth one more try (no
    connection, a reset, HTTP 5xx), not for limits, deadlines or 4xx answers.
    """

    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


# ----------------------------------------------------------------------------------------------
# addresses (pure)
# ----------------------------------------------------------------------------------------------


def _inet_aton_part(text: str) -> int | None:
    if not text:
        return None
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16) if text[2:] else 0
        if len(text) > 1 and text[0] == "0":
            return int(text[1:], 8)
        return int(text, 10) if text.isascii() and text.isdigit() else None
    except ValueError:
        return None


def parse_ip_host(host: str) -> IPAddress | None:
    """The address a host string denotes when it is an IP literal in ANY spelling, else None.

    Accepts IPv6 (with or without brackets, zone ids dropped) and every IPv4 form ``inet_aton``
    accepts, which is what the C resolver does with such a "hostname": ``127.0.0.1``,
    ``2130706433`` (one 32-bit number), ``0177.0.0.1`` (octal), ``0x7f.0.0.1`` / ``0x7f000001``
    (hex) and the short forms ``127.1`` / ``127.0.1``.
    """
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if ":" in h:
        try:
            return ipaddress.IPv6Address(h.split("%", 1)[0])
        except ValueError:
            return None
    h = h.rstrip(".")
    parts = h.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    nums = [_inet_aton_part(p) for p in parts]
    if any(n is None for n in nums):
        return None
    vals = [int(n) for n in nums if n is not None]
    *head, last = vals
    if any(v > 255 for v in head) or last >= 1 << (8 * (5 - len(vals))):
        return None
    value = 0
    for v in head:
        value = (value << 8) | v
    value = (value << (8 * (5 - len(vals)))) | last
    return ipaddress.IPv4Address(value)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: IPAddress) -> bool:
    """True for a public unicast address a backend may connect to on a user's say-so.

    False for loopback, private, link-local, multicast, reserved, unspecified, shared (CGNAT,
    100.64/10) and documentation addresses, and for IPv6 addresses that embed such an IPv4 address
    (IPv4-mapped, 6to4, Teredo, NAT64) or are IPv4-compatible (``::a.b.c.d``, deprecated).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            if ip.teredo is not None and not is_public_address(ip.teredo[0]):
                return False
            return is_public_address(inner)
        if int(ip) >> 32 == 0:  # ::a.b.c.d (IPv4-compatible) and ::, ::1
            return False
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return False
    return bool(
        ip.is_global
        and not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                 or ip.is_reserved or ip.is_unspecified)
    )


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the C resolver, as a connect would use)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# ----------------------------------------------------------------------------------------------
# origins and host rules (pure)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """``scheme://host:port`` with the host lower-cased and IP literals in canonical form."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _canonical_host(host: str) -> str:
    ip = parse_ip_host(host)
    return str(ip) if ip is not None else host.strip().lower().rstrip(".")


def origin_of(url: str) -> Origin:
    """The origin of an absolute http(s) URL; :class:`UrlRefused` for anything else."""
    if not isinstance(url, str) or any(ord(c) < 0x20 or c in " \x7f\\" for c in url):
        raise UrlRefused("URL contains control characters, spaces or backslashes")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UrlRefused(f"{scheme or 'relative'} URLs are not allowed; only http(s)")
    if not parts.hostname:
        raise UrlRefused("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("URLs with user:password@ are not allowed")
    return Origin(scheme, _canonical_host(parts.hostname), port or _DEFAULT_PORTS[scheme])


@dataclass(frozen=True)
class HostRule:
    """One ``MADSEG_IMAGE_HOSTS`` entry: a host name, ``*.domain``, or an IP literal; optional port."""

    host: str
    port: int | None = None

    @property
    def is_ip(self) -> bool:
        return parse_ip_host(self.host) is not None and not self.host.startswith("*.")

    def matches(self, origin: Origin) -> bool:
        if self.port is not None and self.port != origin.port:
            return False
        if self.host.startswith("*."):
            return origin.host.endswith(self.host[1:]) and parse_ip_host(origin.host) is None
        return self.host == origin.host


def parse_host_rules(raw: str, name: str = "MADSEG_IMAGE_HOSTS") -> tuple[HostRule, ...]:
    """Comma-separated ``host``, ``host:port``, ``*.domain``, ``[v6]:port`` entries -> rules.

    :class:`MadsegError` naming ``name`` and the entry for anything else (a URL, a path, a blank
    wildcard).
    """
    rules = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        bad = MadsegError(f"{name}: {entry!r} is not a host; give host names or IP addresses, optionally "
                          "with :port, e.g. images.example.org,cdn.example.org:8443,*.example.net")
        if "/" in entry or "@" in entry or entry in ("*", "*."):
            raise bad
        port: int | None = None
        host = entry
        if entry.startswith("["):
            close = entry.find("]")
            if close < 0:
                raise bad
            host, rest = entry[1:close], entry[close + 1:]
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise bad
                port = int(rest[1:])
        elif entry.count(":") == 1:
            host, port_s = entry.split(":")
            if not port_s.isascii() or not port_s.isdigit():
                raise bad
            port = int(port_s)
        if port is not None and not 0 < port < 65536:
            raise bad
        wildcard = host.startswith("*.")
        body = host[2:] if wildcard else host
        if parse_ip_host(body) is None and (not body or any(not (c.isalnum() or c in "-.") for c in body)):
            raise bad
        rules.append(HostRule(("*." if wildcard else "") + _canonical_host(body), port))
    return tuple(rules)


# ----------------------------------------------------------------------------------------------
# the policy
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedUrl:
    """A URL the policy allowed: its origin, the checked addresses to connect to (in the resolver's
    order), whether it is trusted."""

    url: str
    origin: Origin
    addresses: tuple[str, ...]
    trusted: bool  # the Label Studio origin (any address allowed; credentials may go there)

    @property
    def address(self) -> str:
        return self.addresses[0]


@dataclass(frozen=True)
class UrlPolicy:
    """Where images may be fetched from (module docstring). ``resolver`` is injectable for tests."""

    trusted: tuple[Origin, ...] = ()
    allowed: tuple[HostRule, ...] = ()
    resolver: Resolver = system_resolver

    @classmethod
    def build(cls, label_studio_url: str | None, image_hosts: Iterable[HostRule] = (),
              resolver: Resolver = system_resolver) -> UrlPolicy:
        trusted = (origin_of(label_studio_url),) if label_studio_url else ()
        return cls(trusted, tuple(image_hosts), resolver)

    def is_trusted(self, origin: Origin) -> bool:
        return origin in self.trusted

    def check(self, url: str) -> CheckedUrl:
        """Allow ``url`` and pick the address to connect to, or raise :class:`UrlRefused`.

        The message names the host (never the query string, which may carry tokens).
        """
        origin = origin_of(url)
        trusted = self.is_trusted(origin)
        rules = [r for r in self.allowed if r.matches(origin)]
        if not trusted and not rules:
            raise UrlRefused(f"host {origin.host} is not Label Studio and not listed in MADSEG_IMAGE_HOSTS")
        literal = parse_ip_host(origin.host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = self.resolver(origin.host, origin.port)
            except (OSError, UnicodeError) as exc:
                raise FetchError(f"host {origin.host} does not resolve ({type(exc).__name__})") from None
            if not addresses:
                raise FetchError(f"host {origin.host} does not resolve")
        explicit_ip = literal is not None and any(r.is_ip for r in rules)
        if not trusted and not explicit_ip:
            for addr in addresses:
                ip = ipaddress.ip_address(addr.split("%", 1)[0])
                if not is_public_address(ip):
                    raise UrlRefused(f"host {origin.host} resolves to {ip}, a non-public address; "
                                     "only Label Studio's own address may be private")
        return CheckedUrl(url, origin, tuple(addresses), trusted)


# ----------------------------------------------------------------------------------------------
# the fetch
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    """A successful (HTTP 200) fetch: the body and the URL it finally came from."""

    data: bytes
    url: str
    content_type: str


def shown(url: str) -> str:
    """``url`` without its query string and fragment (those may carry tokens), for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    if not cafile:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:
            cafile = None
    return ssl.create_default_context(cafile=cafile)


def _target(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    return path + (f"?{parts.query}" if parts.query else "")


def _host_header(origin: Origin) -> str:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    return host if origin.port == _DEFAULT_PORTS[origin.scheme] else f"{host}:{origin.port}"


def _connect(checked: CheckedUrl, timeout: float) -> socket.socket:
    """A TCP connection to the first checked address that answers (never a fresh DNS lookup)."""
    last: OSError | None = None
    for addr in checked.addresses:
        try:
            return socket.create_connection((addr, checked.origin.port), timeout=timeout)
        except OSError as exc:
            last = exc
    raise last or OSError("no address")


def _open(checked: CheckedUrl, timeout: float) -> tuple[http.client.HTTPConnection, socket.socket]:
    raw = _connect(checked, timeout)
    if checked.origin.scheme == "https":
        sock: socket.socket = _ssl_context().wrap_socket(raw, server_hostname=checked.origin.host)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(checked.origin.host,
                                                                        checked.origin.port)
    else:
        sock = raw
        conn = http.client.HTTPConnection(checked.origin.host, checked.origin.port)
    conn.sock = sock
    return conn, sock  # for TLS the SSL socket owns the descriptor (``raw`` is detached)


def fetch(
    url: str,
    policy: UrlPolicy,
    *,
    deadline: Deadline,
    max_bytes: int,
    credentials: Callable[[Origin], Mapping[str, str]] | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 20.0,
    max_redirects: int = 3,
) -> FetchResult:
    """GET ``url`` under ``policy`` (module docstring); the body of the final 200 answer.

    ``credentials(origin)`` gives the headers for a request to ``origin`` (e.g. Label Studio's
    ``Authorization``); it is asked only for the trusted origin, and only while every hop so far
    stayed on it. Raises :class:`UrlRefused` (policy) or :class:`FetchError` (``status`` set for
    HTTP errors); messages show URLs without their query strings.
    """
    current = url
    first_origin: Origin | None = None
    same_origin_so_far = True
    for hop in range(max_redirects + 1):
        checked = policy.check(current)
        if first_origin is None:
            first_origin = checked.origin
        same_origin_so_far = same_origin_so_far and checked.origin == first_origin
        headers = {"Host": _host_header(checked.origin), "Accept-Encoding": "identity",
                   "User-Agent": "madseg-ml-backend", "Connection": "close"}
        if credentials is not None and checked.trusted and same_origin_so_far:
            headers.update(credentials(checked.origin))
        status, location, data, ctype = _exchange(checked, headers, deadline, max_bytes, connect_timeout,
                                                  read_timeout)
        if status in _REDIRECTS:
            if not location:
                raise FetchError(f"{shown(current)}: HTTP {status} without a Location", status)
            if hop == max_redirects:
                raise FetchError(f"{shown(url)}: more than {max_redirects} redirects", status)
            current = urllib.parse.urljoin(current, location)
            continue
        if status != 200:
            raise FetchError(f"{shown(current)}: HTTP {status}", status, retryable=status >= 500)
        return FetchResult(data, current, ctype)
    raise FetchError(f"{shown(url)}: more than {max_redirects} redirects")  # pragma: no cover


def fetch_retrying(
    url: str,
    policy: UrlPolicy,
    *,
    deadline: Deadline,
    max_bytes: int,
    credentials: Callable[[Origin], Mapping[str, str]] | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 20.0,
    attempts: int = 3,
    on_unauthorized: Callable[[], None] | None = None,
) -> bytes:
    """The body of :func:`fetch` with up to ``attempts`` tries, all within ``deadline``.

    A retryable :class:`FetchError` (no connection, a reset, HTTP 5xx) is tried again after a pause
    of 0.5 s, 1 s, ... (cut at the deadline); no new try starts with less than ``connect_timeout``
    left. ``on_unauthorized``, when given, is called after an HTTP 401 on the first try (e.g. to
    refresh an expired access token) and the request is sent again at once. Raises
    :class:`UrlRefused` (policy), the :class:`FetchError` that is not retryable, or a
    :class:`FetchError` ``downloading <url> failed (<last error>)`` when the tries run out.
    """
    last = ""
    for attempt in range(attempts):
        if attempt and deadline.remaining() < connect_timeout:
            break
        try:
            return fetch(url, policy, deadline=deadline, max_bytes=max_bytes, credentials=credentials,
                         connect_timeout=connect_timeout, read_timeout=read_timeout).data
        except FetchError as exc:
            last = str(exc)
            if exc.status == 401 and on_unauthorized is not None and attempt == 0:
                on_unauthorized()
                continue
            if not exc.retryable:
                raise
        time.sleep(min(0.5 * (attempt + 1), deadline.remaining()))
    raise FetchError(f"downloading {shown(url)} failed ({last})")


def _exchange(
    checked: CheckedUrl, headers: dict[str, str], deadline: Deadline, max_bytes: int, connect_timeout: float,
    read_timeout: float,
) -> tuple[int, str | None, bytes, str]:
    what = shown(checked.url)
    left = deadline.remaining()
    if left <= 0:
        raise FetchError(f"{what}: request deadline passed before the download started")
    try:
        conn, raw = _open(checked, min(connect_timeout, left))
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"{what}: cannot connect ({type(exc).__name__})", retryable=True) from None
    expired = threading.Event()

    def _abort() -> None:
        expired.set()
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(max(deadline.remaining(), 0.0), _abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        raw.settimeout(read_timeout)
        conn.request("GET", _target(checked.url), headers=headers)
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            return resp.status, resp.getheader("Location"), b"", ""
        if resp.status != 200:
            return resp.status, None, b"", ""
        if (resp.getheader("Content-Encoding") or "identity").lower() != "identity":
            raise FetchError(f"{what}: compressed answer (Content-Encoding) refused")
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"{what}: {length} bytes is over the limit of {max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = resp.read1(1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"{what}: larger than the limit of {max_bytes} bytes")
            chunks.append(chunk)
        if expired.is_set():
            raise FetchError(f"{what}: request deadline passed during the download")
        if length is not None and length.isdigit() and size != int(length):
            raise FetchError(f"{what}: connection closed after {size} of {length} bytes", retryable=True)
        return 200, None, b"".join(chunks), resp.getheader("Content-Type") or ""
    except FetchError:
        raise
    except (OSError, http.client.HTTPException, ssl.SSLError, ValueError) as exc:
        if expired.is_set():
            raise FetchError(f"{what}: request deadline passed during the download") from None
        raise FetchError(f"{what}: download failed ({type(exc).__name__})", retryable=True) from None
    finally:
        watchdog.cancel()
        conn.close()
