"""ml_backend.netguard.fetch_retrying (the task image download of /predict and of the export): HTTP 5xx
is tried again, 4xx is not, a first 401 refreshes the credentials once, the tries are bounded, and a
refused URL is never fetched. Test servers on 127.0.0.1 only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ml_backend.limits import Deadline
from ml_backend.netguard import FetchError, UrlPolicy, UrlRefused, fetch_retrying
from tests.security_servers import Request, TestServer

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100


def _answers(*statuses: int):
    """A handler answering the given statuses in turn (an image with 200), then 200 for ever."""
    queue = list(statuses)

    def fn(req: Request) -> tuple[int, dict[str, str], bytes]:
        status = queue.pop(0) if queue else 200
        return status, {}, PNG if status == 200 else b"no"

    return fn


@pytest.fixture()
def server() -> Iterator[TestServer]:
    s = TestServer({})
    yield s
    s.close()


def _get(server: TestServer, **kw) -> bytes:
    return fetch_retrying(f"{server.url}/a.png", UrlPolicy.build(server.url), deadline=Deadline(10),
                          max_bytes=1 << 20, **kw)


def test_ok_at_once_positive_control(server: TestServer) -> None:
    server.routes["/a.png"] = _answers()
    assert _get(server) == PNG and len(server.requests) == 1


def test_server_errors_are_tried_again_up_to_the_limit(server: TestServer) -> None:
    server.routes["/a.png"] = _answers(503, 502)
    assert _get(server) == PNG and len(server.requests) == 3
    server.requests.clear()
    server.routes["/a.png"] = _answers(503, 503, 503, 503)
    with pytest.raises(FetchError, match=r"downloading .*/a.png failed \(.*HTTP 503\)"):
        _get(server)
    assert len(server.requests) == 3
    server.requests.clear()
    server.routes["/a.png"] = _answers(500)
    with pytest.raises(FetchError, match="failed"):
        _get(server, attempts=1)
    assert len(server.requests) == 1


def test_client_errors_are_not_tried_again(server: TestServer) -> None:
    server.routes["/a.png"] = _answers(404)
    with pytest.raises(FetchError, match="HTTP 404") as info:
        _get(server)
    assert info.value.status == 404 and len(server.requests) == 1


def test_a_first_401_refreshes_the_credentials_once(server: TestServer) -> None:
    refreshed: list[int] = []
    server.routes["/a.png"] = _answers(401)
    assert _get(server, on_unauthorized=lambda: refreshed.append(1)) == PNG
    assert refreshed == [1] and len(server.requests) == 2
    # a second 401 after the refresh is final; without a refresher the first one is
    server.requests.clear()
    server.routes["/a.png"] = _answers(401, 401)
    with pytest.raises(FetchError, match="HTTP 401"):
        _get(server, on_unauthorized=lambda: refreshed.append(2))
    assert refreshed == [1, 2] and len(server.requests) == 2
    server.requests.clear()
    server.routes["/a.png"] = _answers(401)
    with pytest.raises(FetchError, match="HTTP 401"):
        _get(server)
    assert len(server.requests) == 1


def test_a_refused_url_is_never_fetched(server: TestServer) -> None:
    server.routes["/a.png"] = _answers()
    with pytest.raises(UrlRefused):
        fetch_retrying(f"{server.url}/a.png", UrlPolicy.build(None), deadline=Deadline(10), max_bytes=1 << 20)
    assert server.requests == []
