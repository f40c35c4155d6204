"""Where task images may come from (ml_backend.netguard): the URL policy on literal addresses and
fake DNS answers (nothing is connected to), and the fetch against test servers on 127.0.0.1 / ::1
only. Every refusal sits beside a positive control that the legitimate path still works."""

from __future__ import annotations

import ipaddress
import time

import pytest

from ml_backend.errors import MadsegError
from ml_backend.limits import Deadline
from ml_backend.netguard import (
    FetchError,
    HostRule,
    UrlPolicy,
    UrlRefused,
    fetch,
    is_public_address,
    origin_of,
    parse_host_rules,
    parse_ip_host,
)
from tests.security_servers import TestServer, drip

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100
TOKEN_HEADERS = {"Authorization": "Token ls-secret-key"}


def _resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


# -- addresses (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", [
    "127.0.0.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1", "127.0.1", "0177.1",
    "017700000001", "[::1]", "::1", "[::ffff:127.0.0.1]", "::ffff:7f00:1", "[::ffff:10.0.0.1]",
    "10.0.0.1", "0xa.0.0.1", "167772161", "192.168.1.1", "172.16.0.1", "169.254.169.254",
    "0251.0376.0251.0376", "[fe80::1]", "[fc00::1]", "[fd12::1]", "224.0.0.1", "[ff02::1]", "0.0.0.0", "0",
    "[::]", "255.255.255.255", "240.0.0.1", "100.64.0.1", "192.0.2.1", "[2001:db8::1]",
    "[2002:7f00:1::]", "[64:ff9b::7f00:1]", "[::127.0.0.1]",
])
def test_non_public_addresses_are_refused_in_every_spelling(spelling: str) -> None:
    ip = parse_ip_host(spelling)
    assert ip is not None, spelling
    assert not is_public_address(ip), (spelling, ip)


@pytest.mark.parametrize("spelling, expected", [
    ("93.184.216.34", "93.184.216.34"), ("1572395042", "93.184.216.34"),
    ("0x5d.0xb8.0xd8.0x22", "93.184.216.34"),
    ("[2606:2800:220:1:248:1893:25c8:1946]", "2606:2800:220:1:248:1893:25c8:1946"),
    ("[::ffff:93.184.216.34]", "::ffff:5db8:d822"),
])
def test_public_addresses_are_allowed_positive_control(spelling: str, expected: str) -> None:
    ip = parse_ip_host(spelling)
    assert ip == ipaddress.ip_address(expected)
    assert is_public_address(ip)


@pytest.mark.parametrize("host", ["example.org", "localhost", "1.2.3.4.5", "256.1.1.1", "08.1.1.1", "",
                                  "1e3"])
def test_names_are_not_ip_literals(host: str) -> None:
    assert parse_ip_host(host) is None


# -- the policy (fake DNS; nothing is connected to) --------------------------------------------------


def _policy(**kw) -> UrlPolicy:
    table = {
        "label-studio": ["172.18.0.5"],                # compose service name: private, but trusted
        "images.example.org": ["93.184.216.34"],
        "rebind.example.org": ["93.184.216.34", "127.0.0.1"],
        "internal.example.org": ["10.1.2.3"],
        "mapped.example.org": ["::ffff:169.254.169.254"],
        "img.cdn.example.net": ["2606:2800:220:1:248:1893:25c8:1946"],
    }
    return UrlPolicy.build(kw.get("ls", "http://label-studio:8080"),
                           parse_host_rules(kw.get("hosts", "images.example.org,rebind.example.org,"
                                                   "internal.example.org,mapped.example.org,*.example.net")),
                           resolver=_resolver(table))


def test_label_studio_origin_is_allowed_whatever_its_address() -> None:
    c = _policy().check("http://label-studio:8080/data/upload/1/a.png")
    assert c.trusted and c.address == "172.18.0.5"
    c = UrlPolicy.build("http://localhost:8080", resolver=_resolver({"localhost": ["127.0.0.1"]})).check(
        "http://LOCALHOST:8080/data/upload/x.jpg")
    assert c.trusted and c.address == "127.0.0.1"


def test_listed_public_host_is_allowed_positive_control() -> None:
    c = _policy().check("https://images.example.org/a/b.jpg?sig=1")
    assert not c.trusted and c.address == "93.184.216.34"
    assert _policy().check("http://img.cdn.example.net/x.png").address.startswith("2606:")


@pytest.mark.parametrize("url, match", [
    ("http://label-studio:9090/x.png", "not Label Studio"),        # other port than Label Studio
    ("https://label-studio:8080/x.png", "not Label Studio"),       # other scheme
    ("http://unlisted.example.com/x.png", "not Label Studio"),
    ("http://127.0.0.1:6379/", "not Label Studio"),
    ("http://2130706433:6379/", "not Label Studio"),
    ("http://[::ffff:127.0.0.1]:5432/", "not Label Studio"),
    ("http://rebind.example.org/x.png", "non-public"),              # one of its answers is loopback
    ("http://internal.example.org/x.png", "non-public"),
    ("http://mapped.example.org/x.png", "non-public"),
    ("file:///etc/passwd", "only http"),
    ("gopher://images.example.org/", "only http"),
    ("s3://bucket/key.png", "only http"),
    ("http://user:pw@images.example.org/x.png", "user:password"),
    ("http://images.example.org/x\x00.png", "control"),
    ("/data/upload/x.png", "relative"),
])
def test_refused_urls(url: str, match: str) -> None:
    with pytest.raises(UrlRefused, match=match):
        _policy().check(url)


def test_explicit_ip_entry_is_the_operators_choice() -> None:
    policy = UrlPolicy.build(None, parse_host_rules("10.0.0.5:9000"))
    assert policy.check("http://10.0.0.5:9000/x.png").address == "10.0.0.5"
    assert policy.check("http://0xa.0.0.5:9000/x.png").address == "10.0.0.5"  # same address, any spelling
    with pytest.raises(UrlRefused):
        policy.check("http://10.0.0.5:9001/x.png")


@pytest.mark.parametrize("raw", ["http://x.org", "x.org/path", "*", "a b", "x.org:http", "x.org:70000",
                                 "[::1", "user@x.org"])
def test_bad_host_settings_are_one_clear_error(raw: str) -> None:
    with pytest.raises(MadsegError, match="MADSEG_IMAGE_HOSTS"):
        parse_host_rules(raw)


def test_host_rules_parse() -> None:
    rules = parse_host_rules(" Images.Example.org , cdn.example.org:8443,*.example.net,[::1]:80,0x7f.1 ")
    assert rules == (HostRule("images.example.org"), HostRule("cdn.example.org", 8443),
                     HostRule("*.example.net"), HostRule("::1", 80), HostRule("127.0.0.1"))
    assert origin_of("HTTP://Images.Example.ORG./x").host == "images.example.org"


# -- the fetch, against servers on 127.0.0.1 / ::1 started here ---------------------------------------


@pytest.fixture()
def servers():
    started: list[TestServer] = []

    def start(routes, host: str = "127.0.0.1") -> TestServer:
        s = TestServer(routes, host)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def _creds(origin):
    return TOKEN_HEADERS


def test_fetch_from_label_studio_sends_its_credentials_positive_control(servers) -> None:
    ls = servers({"/data/upload/1/a.png": lambda r: (200, {"Content-Type": "image/png"}, PNG)})
    res = fetch(f"{ls.url}/data/upload/1/a.png", UrlPolicy.build(ls.url), deadline=Deadline(10),
                max_bytes=1 << 20, credentials=_creds)
    assert res.data == PNG
    assert ls.requests[0].headers.get("Authorization") == "Token ls-secret-key"


def test_redirect_from_label_studio_to_another_origin_never_carries_the_key(servers) -> None:
    other = servers({"/img.png": lambda r: (200, {}, PNG)})
    ls = servers({"/data/upload/a.png": lambda r: (302, {"Location": f"{other.url}/img.png"}, b"")})
    allowed = UrlPolicy.build(ls.url, parse_host_rules(f"127.0.0.1:{other.port}"))
    res = fetch(f"{ls.url}/data/upload/a.png", allowed, deadline=Deadline(10), max_bytes=1 << 20,
                credentials=_creds)
    assert res.data == PNG and res.url == f"{other.url}/img.png"
    assert ls.requests[0].headers.get("Authorization") == "Token ls-secret-key"
    assert "Authorization" not in other.requests[0].headers
    # ... and a hop back to Label Studio after leaving it gets no key either
    back = servers({"/bounce": lambda r: (307, {"Location": f"{ls.url}/data/upload/b.png"}, b"")})
    ls.routes["/data/upload/b.png"] = lambda r: (200, {}, PNG)
    pol = UrlPolicy.build(ls.url, parse_host_rules(f"127.0.0.1:{back.port}"))
    fetch(f"{back.url}/bounce", pol, deadline=Deadline(10), max_bytes=1 << 20, credentials=_creds)
    assert "Authorization" not in ls.requests[-1].headers


def test_redirect_to_an_internal_service_is_refused(servers) -> None:
    internal = servers({"/": lambda r: (200, {}, b"+PONG")})
    ls = servers({"/data/upload/a.png": lambda r: (301, {"Location": f"{internal.url}/"}, b"")})
    with pytest.raises(UrlRefused, match="not Label Studio"):
        fetch(f"{ls.url}/data/upload/a.png", UrlPolicy.build(ls.url), deadline=Deadline(10),
              max_bytes=1 << 20, credentials=_creds)
    assert internal.requests == []


def test_listed_ip_host_positive_control_and_unlisted_loopback_refused(servers) -> None:
    img = servers({"/a.png": lambda r: (200, {}, PNG)})
    listed = UrlPolicy.build(None, parse_host_rules(f"127.0.0.1:{img.port}"))
    assert fetch(f"{img.url}/a.png", listed, deadline=Deadline(10), max_bytes=1 << 20).data == PNG
    for url in (f"{img.url}/a.png", f"http://2130706433:{img.port}/a.png", f"http://0177.1:{img.port}/a.png",
                f"http://[::ffff:127.0.0.1]:{img.port}/a.png", f"http://localhost:{img.port}/a.png"):
        with pytest.raises(UrlRefused):
            fetch(url, UrlPolicy.build(None), deadline=Deadline(10), max_bytes=1 << 20)
    assert len(img.requests) == 1


def test_listed_name_that_resolves_to_loopback_is_refused_after_dns(servers) -> None:
    img = servers({"/a.png": lambda r: (200, {}, PNG)})
    policy = UrlPolicy.build(None, parse_host_rules("localhost"))  # a name, resolved by the real resolver
    with pytest.raises(UrlRefused, match="non-public"):
        fetch(f"http://localhost:{img.port}/a.png", policy, deadline=Deadline(10), max_bytes=1 << 20)
    assert img.requests == []


def test_connects_to_the_checked_address_dns_pinned(servers) -> None:
    """The host name is resolved once, checked, and that address is connected to; the Host header
    still carries the name."""
    ls = servers({"/a.png": lambda r: (200, {}, PNG)})
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])  # a rebinding resolver: second answer differs
    policy = UrlPolicy(trusted=(origin_of(f"http://ls.test:{ls.port}"),),
                       resolver=lambda h, p: next(answers))
    got = fetch(f"http://ls.test:{ls.port}/a.png", policy, deadline=Deadline(10), max_bytes=1 << 20)
    assert got.data == PNG
    assert ls.requests[0].headers["Host"] == f"ls.test:{ls.port}"


def test_ipv6_loopback_label_studio(servers) -> None:
    try:
        ls = servers({"/a.png": lambda r: (200, {}, PNG)}, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    got = fetch(f"{ls.url}/a.png", UrlPolicy.build(ls.url), deadline=Deadline(10), max_bytes=1 << 20)
    assert got.data == PNG
    with pytest.raises(UrlRefused):
        fetch(f"{ls.url}/a.png", UrlPolicy.build(None, parse_host_rules("localhost")), deadline=Deadline(10),
              max_bytes=1 << 20)


def test_too_many_redirects(servers) -> None:
    ls = servers({})
    ls.routes["/loop"] = lambda r: (302, {"Location": "/loop"}, b"")
    with pytest.raises(FetchError, match="redirects"):
        fetch(f"{ls.url}/loop", UrlPolicy.build(ls.url), deadline=Deadline(10), max_bytes=1 << 20)
    assert len(ls.requests) == 4


def test_byte_cap_by_header_and_while_streaming(servers) -> None:
    big = b"y" * 5000
    ls = servers({"/declared": lambda r: (200, {}, big),
                  "/ok": lambda r: (200, {}, big[:1000])})

    def chunked(req):
        h = req.handler
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(10):
            h.wfile.write(b"3e8\r\n" + b"z" * 1000 + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    ls.routes["/chunked"] = chunked
    pol = UrlPolicy.build(ls.url)
    assert len(fetch(f"{ls.url}/ok", pol, deadline=Deadline(10), max_bytes=4096).data) == 1000
    with pytest.raises(FetchError, match="over the limit"):
        fetch(f"{ls.url}/declared", pol, deadline=Deadline(10), max_bytes=4096)
    with pytest.raises(FetchError, match="larger than the limit"):
        fetch(f"{ls.url}/chunked", pol, deadline=Deadline(10), max_bytes=4096)


def test_a_dripping_host_is_cut_at_the_deadline(servers) -> None:
    ls = servers({"/slow.png": drip(PNG, 0.2)})  # 108 bytes at 5 bytes/s: ~22 s
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="deadline"):
        fetch(f"{ls.url}/slow.png", UrlPolicy.build(ls.url), deadline=Deadline(1.5), max_bytes=1 << 20,
              read_timeout=5)
    assert time.monotonic() - t0 < 3


def test_http_errors_name_the_url_without_its_query(servers) -> None:
    ls = servers({"/gone.png": lambda r: (404, {}, b"")})
    with pytest.raises(FetchError) as info:
        fetch(f"{ls.url}/gone.png?token=topsecret", UrlPolicy.build(ls.url), deadline=Deadline(5),
              max_bytes=1 << 20)
    assert info.value.status == 404 and "topsecret" not in str(info.value) and "/gone.png" in str(info.value)


def _self_signed(tmp_path, name: str):
    """A certificate for ``name`` (and 127.0.0.1) and its key, made with ``cryptography``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_is_pinned_to_the_checked_address_and_verifies_the_name(servers, tmp_path, monkeypatch) -> None:
    """TLS to the pinned address still checks the certificate against the URL's host name."""
    import ssl

    cert, key = _self_signed(tmp_path, "ls.test")
    ls = servers({"/a.png": lambda r: (200, {}, PNG)})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ls.httpd.socket = ctx.wrap_socket(ls.httpd.socket, server_side=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    resolve = _resolver({"ls.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    url = f"https://ls.test:{ls.port}/a.png"
    policy = UrlPolicy.build(url, resolver=resolve)
    assert fetch(url, policy, deadline=Deadline(10), max_bytes=1 << 20).data == PNG  # positive control
    other = f"https://other.test:{ls.port}/a.png"  # same address, a name the certificate does not carry
    with pytest.raises(FetchError, match="cannot connect"):
        fetch(other, UrlPolicy.build(other, resolver=resolve), deadline=Deadline(10), max_bytes=1 << 20)


def test_unreachable_first_address_falls_back_to_the_next_checked_one(servers) -> None:
    """The server listens on 127.0.0.1 only, so 127.0.0.2 (also loopback) refuses the connection."""
    ls = servers({"/a.png": lambda r: (200, {}, PNG)})
    policy = UrlPolicy(trusted=(origin_of(f"http://ls.test:{ls.port}"),),
                       resolver=_resolver({"ls.test": ["127.0.0.2", "127.0.0.1"]}))
    got = fetch(f"http://ls.test:{ls.port}/a.png", policy, deadline=Deadline(10), max_bytes=1 << 20)
    assert got.data == PNG
