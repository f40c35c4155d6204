"""The ML backend attacked through its HTTP API (Flask test client: one process adds nothing to
these), each attack beside a positive control that the legitimate path still works. Image hosts
and a stand-in Label Studio are test servers on 127.0.0.1 only. Real-process checks (binding,
413 before reading, /health under load) are in test_backend_security_process.py."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from ml_backend.app import create_app
from ml_backend.backend_config import BackendConfig
from ml_backend.classes import VOC_CLASSES
from ml_backend.jobs import InProcessFinetuneQueue
from ml_backend.labelstudio.configs import segmentation_config
from ml_backend.netguard import parse_host_rules
from ml_backend.shared import shared_dir
from tests.security_servers import TestServer
from tests.test_backend_security_units import png_bomb

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SEG = segmentation_config(VOC_CLASSES)
API_KEY = "ls-api-key-never-leaves"
SETUP_TOKEN = "token-label-studio-sent-to-setup"
AUTH = ("backend-user", "backend-pass-1234")


def _checkpoint() -> Path:
    return shared_dir() / "models" / "espnetv2" / "espnetv2_s_0.5_pascal_256x256.pth"


@pytest.fixture(scope="module")
def image_bytes() -> bytes:
    root = shared_dir() / "data" / "voc_samples" / "images"
    return sorted(root.iterdir())[0].read_bytes()


@pytest.fixture()
def tree(tmp_path: Path, image_bytes: bytes) -> dict[str, Path]:
    """A document root with pool/ (images), gt/ (ground-truth masks) and a secret file outside."""
    root = tmp_path / "root"
    (root / "pool").mkdir(parents=True)
    (root / "gt").mkdir()
    (root / "pool" / "a.jpg").write_bytes(image_bytes)
    shutil.copy(root / "pool" / "a.jpg", root / "gt" / "a.png")
    (tmp_path / "outside.jpg").write_bytes(image_bytes)
    return {"root": root, "pool": root / "pool", "gt": root / "gt", "outside": tmp_path / "outside.jpg",
            "models": tmp_path / "models"}


@pytest.fixture()
def servers():
    started: list[TestServer] = []

    def start(routes: dict) -> TestServer:
        s = TestServer(routes)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def _config(tree: dict[str, Path], **kw: Any) -> BackendConfig:
    base = dict(target={"name": "espnetv2", "checkpoint": str(_checkpoint()), "options": {}},
                model_dir=tree["models"], document_root=tree["root"], ground_truth_dirs=(tree["gt"],),
                start_delay_s=600.0)
    base.update(kw)
    return BackendConfig(**base)


def _client(cfg: BackendConfig, monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None,
            queue: Any = None) -> Any:
    for key in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, val in (env or {}).items():
        monkeypatch.setenv(key, val)
    return create_app(cfg, queue=queue).test_client()


def _predict(client: Any, urls: list[str], project: Any = "3.1700000000", **kw: Any) -> Any:
    tasks = [{"id": i + 1, "data": {"image": u}} for i, u in enumerate(urls)]
    return client.post("/predict", json={"tasks": tasks, "label_config": SEG, "project": project}, **kw)


def _painted(resp: Any) -> list[bool]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [bool(r["result"]) for r in resp.get_json()["results"]]


# -- 1. authentication --------------------------------------------------------------------------------


def test_credentials_are_required_on_every_route_basic_or_bearer(tree, monkeypatch) -> None:
    cfg = _config(tree, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1],
                  backend_token="bearer-token-0123456789")
    c = _client(cfg, monkeypatch)
    for method, path in (("get", "/health"), ("post", "/predict"), ("post", "/webhook"), ("post", "/setup"),
                         ("get", "/versions"), ("post", "/train"), ("get", "/is_training")):
        assert getattr(c, method)(path, json={}).status_code == 401, path
    assert c.get("/health", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    import base64

    wrong = base64.b64encode(b"backend-user:nope").decode()
    assert c.get("/health", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    # positive controls
    good = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    assert c.get("/health", headers={"Authorization": f"Basic {good}"}).status_code == 200
    assert c.get("/health", headers={"Authorization": "Bearer bearer-token-0123456789"}).status_code == 200


# -- 2. credentials go only where configured --------------------------------------------------------------


def test_api_key_goes_only_to_label_studio_url(tree, monkeypatch, servers, image_bytes) -> None:
    ls = servers({"/data/upload/1/a.jpg": lambda r: (200, {}, image_bytes)})
    evil = servers({"/data/upload/1/a.jpg": lambda r: (200, {}, image_bytes)})
    # positive control: LABEL_STUDIO_URL set -> its origin gets the key, the image is predicted
    c = _client(_config(tree), monkeypatch, {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": API_KEY})
    assert c.post("/setup", json={"schema": SEG, "project": "3.1", "hostname": evil.url,
                                  "access_token": SETUP_TOKEN}).status_code == 200
    assert _painted(_predict(c, ["/data/upload/1/a.jpg"])) == [True]
    assert ls.requests[-1].headers.get("Authorization") == f"Token {API_KEY}"
    assert evil.requests == []  # the /setup hostname cannot take the place of LABEL_STUDIO_URL

    # attack: LABEL_STUDIO_URL unset, an unauthenticated /setup names another host: nothing goes there
    c = _client(_config(tree), monkeypatch, {"LABEL_STUDIO_API_KEY": API_KEY})
    assert c.post("/setup", json={"schema": SEG, "project": "4.1", "hostname": evil.url,
                                  "access_token": SETUP_TOKEN}).status_code == 200
    assert _painted(_predict(c, ["/data/upload/1/a.jpg"], project="4.1")) == [False]
    assert evil.requests == []

    # an authenticated /setup: that host gets its own token, never the configured key
    cfg = _config(tree, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    c = _client(cfg, monkeypatch, {"LABEL_STUDIO_API_KEY": API_KEY})
    assert c.post("/setup", json={"schema": SEG, "project": "5.1", "hostname": evil.url,
                                  "access_token": SETUP_TOKEN}, auth=AUTH).status_code == 200
    assert _painted(_predict(c, ["/data/upload/1/a.jpg"], project="5.1", auth=AUTH)) == [True]
    sent = [r.headers.get("Authorization", "") for r in evil.requests]
    assert sent == [f"Token {SETUP_TOKEN}"] and not any(API_KEY in s for s in sent)


# -- 3. where task images may come from -----------------------------------------------------------------


def test_local_files_confined_to_the_root_without_ground_truth(tree, monkeypatch, caplog) -> None:
    c = _client(_config(tree), monkeypatch)
    rel_outside = "../outside.jpg"
    urls = [
        "/data/local-files/?d=pool/a.jpg",                        # positive control
        f"/data/local-files/?d={rel_outside}",
        "/data/local-files/?d=../../../../../../etc/passwd",
        f"/data/local-files/?d={tree['outside']}",                # absolute, outside the root
        "/data/local-files/?d=gt/a.png",                          # ground truth under the root
        "/data/local-files/?d=pool/a.jpg%00.png",                 # NUL byte
    ]
    with caplog.at_level(logging.ERROR, logger="ml_backend.model"):
        assert _painted(_predict(c, urls)) == [True, False, False, False, False, False]
    for task_id in range(2, 7):
        assert any(f"no prediction for task {task_id}:" in r.getMessage() for r in caplog.records), task_id


def test_experiment_pool_folders_narrow_a_broad_root(tree, monkeypatch) -> None:
    other = tree["root"] / "other"
    other.mkdir()
    shutil.copy(tree["pool"] / "a.jpg", other / "b.jpg")
    c = _client(_config(tree, local_dirs=(tree["pool"],)), monkeypatch)
    assert _painted(_predict(c, ["/data/local-files/?d=pool/a.jpg", "/data/local-files/?d=other/b.jpg"])) \
        == [True, False]


def test_url_policy_in_predict(tree, monkeypatch, servers, image_bytes) -> None:
    internal = servers({"/": lambda r: (200, {}, b"+PONG\r\n"), "/a.jpg": lambda r: (200, {}, image_bytes)})
    allowed = servers({"/a.jpg": lambda r: (200, {}, image_bytes)})
    cfg = _config(tree, image_hosts=parse_host_rules(f"127.0.0.1:{allowed.port}"))
    c = _client(cfg, monkeypatch)
    urls = [
        f"{allowed.url}/a.jpg",                                        # positive control: listed host
        f"{internal.url}/a.jpg",                                       # not listed (an internal service)
        f"http://2130706433:{internal.port}/a.jpg",                    # decimal spelling of 127.0.0.1
        f"http://0177.0.0.1:{internal.port}/a.jpg",                    # octal
        f"http://[::ffff:127.0.0.1]:{internal.port}/a.jpg",            # IPv4-mapped IPv6
        f"http://localhost:{internal.port}/a.jpg",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_PING",
        f"{allowed.url}/a.jpg\x00",                                    # NUL byte in the URL
    ]
    assert _painted(_predict(c, urls)) == [True] + [False] * 8
    assert internal.requests == []


def test_a_decompression_bomb_task_is_refused_quickly(tree, monkeypatch, servers, image_bytes) -> None:
    import time

    bomb = png_bomb(13000, 13000)
    ls = servers({"/data/upload/1/bomb.png": lambda r: (200, {}, bomb),
                  "/data/upload/1/a.jpg": lambda r: (200, {}, image_bytes)})
    c = _client(_config(tree), monkeypatch, {"LABEL_STUDIO_URL": ls.url})
    t0 = time.perf_counter()
    assert _painted(_predict(c, ["/data/upload/1/bomb.png", "/data/upload/1/a.jpg"])) == [False, True]
    assert time.perf_counter() - t0 < 30  # unbounded: 125 s and +3 GB


def test_large_image_is_predicted_at_the_pixel_cap(tree, monkeypatch) -> None:
    from PIL import Image

    Image.new("RGB", (1600, 1200), (40, 90, 160)).save(tree["pool"] / "big.jpg")
    c = _client(_config(tree, predict_pixels=300_000), monkeypatch)
    res = _predict(c, ["/data/local-files/?d=pool/big.jpg"]).get_json()["results"][0]["result"]
    assert res
    w, h = res[0]["original_width"], res[0]["original_height"]
    assert w * h <= 300_000 and abs(w / h - 4 / 3) < 0.01


# -- 4. limits ------------------------------------------------------------------------------------------


def test_task_cap(tree, monkeypatch) -> None:
    c = _client(_config(tree, max_tasks=3), monkeypatch)
    assert _painted(_predict(c, ["/data/local-files/?d=pool/a.jpg"] * 3)) == [True] * 3  # positive control
    r = _predict(c, ["/data/local-files/?d=pool/a.jpg"] * 4)
    assert r.status_code == 413 and "MADSEG_MAX_TASKS" in r.get_json()["error"]


def test_body_over_the_limit_is_413(tree, monkeypatch) -> None:
    c = _client(_config(tree, max_body_bytes=64 * 1024), monkeypatch)
    assert c.post("/webhook", json={"action": "PROJECT_UPDATED", "pad": "x" * 1000}).status_code == 200
    r = c.post("/webhook", json={"action": "PROJECT_UPDATED", "pad": "x" * 70_000})
    assert r.status_code == 413


# -- 5. webhooks ----------------------------------------------------------------------------------------


def _event(pid: Any, action: str = "ANNOTATION_CREATED") -> dict:
    return {"action": action, "project": {"id": pid, "label_config": SEG}, "annotation": {"id": 1}}


def test_webhooks_queue_only_for_known_projects(tree, monkeypatch) -> None:
    cfg = _config(tree, train_projects=(7,))
    q = InProcessFinetuneQueue(cfg.job_settings(), max_queued=cfg.max_queued_jobs)
    c = _client(cfg, monkeypatch, queue=q)
    # attack: 200 webhooks from 51 project ids
    answers = [c.post("/webhook", json=_event(100 + i % 51)) for i in range(200)]
    assert {r.status_code for r in answers} == {200}
    assert {r.get_json()["status"] for r in answers} == {"ignored"}
    assert "not known" in answers[0].get_json()["reason"]
    # positive control: the configured project queues one job; more events coalesce into it
    first = c.post("/webhook", json=_event(7))
    assert first.status_code == 201 and not first.get_json()["coalesced"]
    assert c.post("/webhook", json=_event(7, "START_TRAINING")).get_json()["coalesced"]
    assert q.describe()["pending"] == {"7": first.get_json()["job_id"]}
    assert not (tree["models"] / "jobs").exists()  # nothing on disk for ignored or coalesced events
    assert c.post("/train", json={"project": "8.1"}).get_json()["status"] == "ignored"


def test_authenticated_setup_makes_a_project_known(tree, monkeypatch) -> None:
    cfg = _config(tree, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    q = InProcessFinetuneQueue(cfg.job_settings())
    c = _client(cfg, monkeypatch, queue=q)
    assert c.post("/webhook", json=_event(21), auth=AUTH).get_json()["status"] == "ignored"
    assert c.post("/setup", json={"schema": SEG, "project": "21.1700000000"}, auth=AUTH).status_code == 200
    assert c.post("/webhook", json=_event(21), auth=AUTH).status_code == 201
    assert json.loads((tree["models"] / "known_projects.json").read_text())["projects"] == [21]
    # without credentials configured, /setup registers nothing (anyone could call it)
    cfg2 = _config(tree, model_dir=tree["models"].parent / "m2")
    c2 = _client(cfg2, monkeypatch, queue=InProcessFinetuneQueue(cfg2.job_settings()))
    assert c2.post("/setup", json={"schema": SEG, "project": 22}).status_code == 200
    assert c2.post("/webhook", json=_event(22)).get_json()["status"] == "ignored"


def test_global_cap_on_queued_jobs(tree, monkeypatch) -> None:
    cfg = _config(tree, train_projects=(1, 2, 3), max_queued_jobs=2)
    q = InProcessFinetuneQueue(cfg.job_settings(), max_queued=cfg.max_queued_jobs)
    c = _client(cfg, monkeypatch, queue=q)
    assert c.post("/webhook", json=_event(1)).status_code == 201
    assert c.post("/webhook", json=_event(2)).status_code == 201
    third = c.post("/webhook", json=_event(3))
    assert third.status_code == 200 and "MADSEG_MAX_QUEUED_JOBS" in third.get_json()["reason"]
    assert c.post("/webhook", json=_event(1)).get_json()["coalesced"]  # joining a queued job still works
    assert len(q.describe()["pending"]) == 2


# -- 6. error hygiene -----------------------------------------------------------------------------------


BAD_CONFIGS = [
    "not xml at all",
    "<View><BrushLabels",
    "<View><Image name='i' value='$i'/></View>",
    "<View><BrushLabels name='l' toName='nope'><Label value='cat'/></BrushLabels></View>",
]


@pytest.mark.parametrize("schema", BAD_CONFIGS)
def test_malformed_label_config_is_400(tree, monkeypatch, schema: str) -> None:
    c = _client(_config(tree), monkeypatch)
    r = c.post("/setup", json={"schema": schema, "project": "3.1"})
    assert r.status_code == 400 and r.get_json()["status"] == "error"
    r = c.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/x"}}], "label_config": schema})
    assert r.status_code == 400
    assert c.post("/setup", json={"schema": SEG, "project": "3.1"}).status_code == 200  # positive control


@pytest.mark.parametrize("pid", ["²", "-3", "x.1", "0", "3" * 30, [3], {"id": "x"}, True, 1.5])
def test_bad_project_ids_are_400(tree, monkeypatch, pid: Any) -> None:
    c = _client(_config(tree, train_projects=(3,)), monkeypatch,
                queue=InProcessFinetuneQueue({"start_delay_s": 600}))
    assert c.post("/setup", json={"schema": SEG, "project": pid}).status_code == 400
    assert _predict(c, ["/data/local-files/?d=pool/a.jpg"], project=pid).status_code == 400
    assert c.post("/train", json={"project": pid}).status_code == 400
    assert c.post("/webhook", json=_event(pid if not isinstance(pid, dict) else pid)).status_code == 400
    assert c.post("/webhook", json=_event(3)).status_code == 201  # positive control


def test_a_bad_task_fails_only_itself(tree, monkeypatch) -> None:
    c = _client(_config(tree), monkeypatch)
    tasks = [{"id": 1, "data": {"image": "/data/local-files/?d=pool/a.jpg"}},
             {"id": 2, "data": {"image": "/data/local-files/?d=pool/a\x00.jpg"}},
             {"id": 3, "data": {"image": 17}}, {"id": 4, "data": "nope"}, {"id": 5}, "not a task", None,
             {"id": 8, "data": {"image": "/data/local-files/?d=pool/a.jpg"}}]
    r = c.post("/predict", json={"tasks": tasks, "label_config": SEG})
    assert _painted(r) == [True, False, False, False, False, False, False, True]


def test_versions_show_names_and_metadata_not_paths(tree, monkeypatch) -> None:
    from ml_backend.versions import new_record, record_version

    rec = new_record(version="espnetv2-ft-abc", name="espnetv2", checkpoint=tree["models"] / "v" / "w.pth",
                     options={}, job_id="job1", projects=(3,), n_train=4)
    record_version(tree["models"], rec)
    c = _client(_config(tree), monkeypatch)
    r = c.get("/versions")
    assert r.status_code == 200 and "espnetv2-ft-abc" in r.get_json()["versions"]
    text = r.get_data(as_text=True)
    assert str(tree["models"]) not in text and str(tree["root"].parent) not in text and "w.pth" not in text


def test_token_refresh_never_follows_a_redirect(servers) -> None:
    """A personal access token is exchanged at Label Studio's /api/token/refresh; a 307 from there
    to another origin must not re-send it."""
    import base64 as b64

    from ml_backend.errors import MadsegError
    from ml_backend.labelstudio.task_images import LabelStudioAuth

    def jwt(claims: dict) -> str:
        enc = b64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"e30.{enc}.sig"

    pat = jwt({"token_type": "refresh", "exp": 4102444800})
    access = jwt({"token_type": "access", "exp": 4102444800})
    other = servers({"/steal": lambda r: (200, {"Content-Type": "application/json"}, b'{"access": "x"}')})
    bad_ls = servers({"/api/token/refresh": lambda r: (307, {"Location": f"{other.url}/steal"}, b"")})
    with pytest.raises(MadsegError, match="HTTP 307"):
        LabelStudioAuth(bad_ls.url, pat).headers()
    assert other.requests == []
    # positive control: a Label Studio that answers gets the token exchanged
    good_ls = servers({"/api/token/refresh": lambda r: (
        200, {"Content-Type": "application/json"}, json.dumps({"access": access}).encode())})
    assert LabelStudioAuth(good_ls.url, pat).headers() == {"Authorization": f"Bearer {access}"}


@pytest.mark.redis
def test_global_cap_on_queued_jobs_in_redis_mode(tmp_path) -> None:
    import uuid

    from ml_backend.jobs import QueueFull, RedisFinetuneQueue, purge_queue, redis_connection

    conn = redis_connection("redis://127.0.0.1:6379/0")
    name = f"madseg-test-cap-{uuid.uuid4().hex[:8]}"
    q = RedisFinetuneQueue(conn, {"queue_name": name, "model_dir": str(tmp_path)}, max_queued=2)
    try:
        a, b = q.submit(1), q.submit(2)
        assert not a.coalesced and not b.coalesced
        with pytest.raises(QueueFull, match="MADSEG_MAX_QUEUED_JOBS"):
            q.submit(3)
        assert q.submit(1).coalesced  # joining a queued job is always accepted
        assert q.queue.count == 2
    finally:
        purge_queue(conn, name)


def test_label_studio_redirect_to_another_origin_in_predict(tree, monkeypatch, servers, image_bytes) -> None:
    """Label Studio answers an image URL with a redirect to another (listed) host: the image is
    fetched, but the API key is not sent there; a redirect to an unlisted host is refused."""
    cdn = servers({"/img.jpg": lambda r: (200, {}, image_bytes)})
    internal = servers({"/": lambda r: (200, {}, b"secret")})
    ls = servers({"/data/upload/1/a.jpg": lambda r: (302, {"Location": f"{cdn.url}/img.jpg"}, b""),
                  "/data/upload/1/b.jpg": lambda r: (302, {"Location": f"{internal.url}/"}, b"")})
    cfg = _config(tree, image_hosts=parse_host_rules(f"127.0.0.1:{cdn.port}"))
    c = _client(cfg, monkeypatch, {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": API_KEY})
    assert _painted(_predict(c, ["/data/upload/1/a.jpg", "/data/upload/1/b.jpg"])) == [True, False]
    assert all(r.headers.get("Authorization") == f"Token {API_KEY}" for r in ls.requests)
    assert [r.headers.get("Authorization") for r in cdn.requests] == [None]
    assert internal.requests == []
