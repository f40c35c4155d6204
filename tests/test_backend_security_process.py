"""The ML backend as a real process (``python -m ml_backend``: gunicorn, gthread): binding and
credentials at start, 413 before the body is read (Content-Length and chunked), per-request
deadlines, and ``/health`` within a second while predictions hang on slow image hosts. Image
hosts are test servers on 127.0.0.1 only. Each refusal beside a positive control."""

from __future__ import annotations

import concurrent.futures as cf
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ml_backend.backend_cli import check_exposure, is_loopback_host
from ml_backend.backend_config import BackendConfig
from ml_backend.classes import VOC_CLASSES
from ml_backend.labelstudio.configs import segmentation_config
from ml_backend.shared import shared_dir
from projects.simulation.ls_local import free_port
from tests.backend_proc import BackendProcess
from tests.security_servers import TestServer, drip

pytestmark = [pytest.mark.slow]

SEG = segmentation_config(VOC_CLASSES)
LIMIT = 1024 * 1024  # MADSEG_MAX_BODY_BYTES of the test backend


def _checkpoint() -> Path:
    return shared_dir() / "models" / "espnetv2" / "espnetv2_s_0.5_pascal_256x256.pth"


def _env(tmp: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MADSEG_", "BASIC_AUTH", "REDIS_URL", "LABEL_STUDIO_"))}
    env.update({"MADSEG_MODEL": "espnetv2", "MADSEG_CHECKPOINT": str(_checkpoint()),
                "MADSEG_MODEL_DIR": str(tmp / "models"), "MADSEG_BACKEND_PORT": str(port),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ml_backend", *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def image_bytes() -> bytes:
    return sorted((shared_dir() / "data" / "voc_samples" / "images").iterdir())[0].read_bytes()


@pytest.fixture(scope="module")
def hosts(image_bytes: bytes) -> Iterator[dict[str, TestServer]]:
    """An allowed image host with a good image and one that drips bytes (0.5 s per byte)."""
    good = TestServer({"/a.jpg": lambda r: (200, {}, image_bytes)})
    slow = TestServer({"/slow.jpg": drip(image_bytes[:4000], 0.5)})
    yield {"good": good, "slow": slow}
    good.close()
    slow.close()


@pytest.fixture(scope="module")
def backend(
    tmp_path_factory: pytest.TempPathFactory, hosts: dict[str, TestServer]
) -> Iterator[BackendProcess]:
    tmp = tmp_path_factory.mktemp("secproc")
    env = _env(tmp, free_port(), MADSEG_BACKEND_THREADS="4", MADSEG_MAX_BODY_BYTES=str(LIMIT),
               MADSEG_PREDICT_DEADLINE="4", MADSEG_BODY_TIMEOUT="2",
               MADSEG_IMAGE_HOSTS=f"127.0.0.1:{hosts['good'].port},127.0.0.1:{hosts['slow'].port}")
    # no MADSEG_BACKEND_HOST: the default address
    proc = BackendProcess(env, tmp / "backend.log", timeout=120)
    yield proc
    proc.stop()


# -- binding --------------------------------------------------------------------------------------------


def test_default_listen_address_is_loopback(backend: BackendProcess) -> None:
    assert f"Listening at: {backend.url}" in backend.log()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_other_addresses_without_credentials_are_refused_at_start(tmp_path: Path, host: str) -> None:
    r = _run_cli(_env(tmp_path, free_port()), "--host", host)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "refusing to listen" in line and "BASIC_AUTH_USER" in line and "MADSEG_BACKEND_TOKEN" in line
    assert "Traceback" not in r.stderr


def test_exposure_rule_positive_controls(tmp_path: Path) -> None:
    cfg = BackendConfig(target={"name": "espnetv2"}, model_dir=tmp_path, host="0.0.0.0")
    check_exposure(cfg.with_(backend_token="t" * 24))
    check_exposure(cfg.with_(basic_auth_user="u", basic_auth_pass="p"))
    check_exposure(cfg.with_(host="127.0.0.1"))
    assert is_loopback_host("::1") and is_loopback_host("localhost") and is_loopback_host("127.0.0.2")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("10.0.0.1")


def test_a_label_studio_url_that_is_not_http_is_refused_at_start(tmp_path: Path) -> None:
    from ml_backend.errors import MadsegError
    from ml_backend.model import check_label_studio_url

    check_label_studio_url("http://label-studio:8080")  # positive control
    for bad in ("localhost:8080", "file:///etc", "/data", "http://user:pw@ls:8080"):
        with pytest.raises(MadsegError, match="LABEL_STUDIO_URL"):
            check_label_studio_url(bad)
    r = _run_cli(_env(tmp_path, free_port(), LABEL_STUDIO_URL="ftp://ls:21"))
    assert r.returncode == 2 and "LABEL_STUDIO_URL" in r.stderr and "Traceback" not in r.stderr


def test_a_document_root_of_slash_is_refused_at_start(tmp_path: Path) -> None:
    r = _run_cli(_env(tmp_path, free_port(), LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="/"))
    assert r.returncode == 2 and "document root of /" in r.stderr and "Traceback" not in r.stderr


# -- body limit ------------------------------------------------------------------------------------------


def _raw(url: str, head: bytes, body_chunks: list[bytes], pause: float = 0.0) -> tuple[bytes, int]:
    """Send a raw request; returns (the answer's first bytes, how many body bytes were sent)."""
    port = int(url.rsplit(":", 1)[1])
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
                sent += len(chunk)
                if pause:
                    time.sleep(pause)
        except OSError:  # the server answered and closed while we were still sending
            pass
        s.settimeout(10)
        return s.recv(4096), sent


def test_content_length_over_the_limit_is_413_before_reading(backend: BackendProcess) -> None:
    for size in (40 * 1024 * 1024, 512 * 1024 * 1024):
        head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {size}\r\n\r\n").encode()
        t0 = time.monotonic()
        answer, _ = _raw(backend.url, head, [])  # no body byte is ever sent
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.monotonic() - t0 < 2
    ok = requests.post(f"{backend.url}/webhook", json={"action": "PROJECT_UPDATED", "pad": "x" * 1000},
                       timeout=10)
    assert ok.status_code == 200  # positive control


def test_chunked_body_over_the_limit_is_413(backend: BackendProcess) -> None:
    head = (b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    chunks = [f"{len(piece):x}\r\n".encode() + piece + b"\r\n"] * 64  # 4 MB offered, the limit is 1 MB
    answer, sent = _raw(backend.url, head, chunks, pause=0.01)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # positive control: a small chunked body is read and answered
    body = b'{"action": "PROJECT_UPDATED"}'
    answer, _ = _raw(backend.url, head, [f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_a_body_sent_a_byte_at_a_time_is_cut_at_the_body_timeout(backend: BackendProcess) -> None:
    """Six clients each announce 100 kB and send one byte per second (more clients than threads):
    each gets 408 after MADSEG_BODY_TIMEOUT (2 s) instead of holding a thread for 100 000 s."""
    head = (b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _raw(backend.url, head, [b" "] * 30, pause=1.0)[0], range(6)))
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:40] for a in answers]
    assert time.monotonic() - t0 < 12
    h0 = time.monotonic()
    assert requests.get(f"{backend.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - h0 < 1.0
    # positive control: a body that arrives in time is read and answered
    ok = requests.post(f"{backend.url}/webhook", json={"action": "PROJECT_UPDATED"}, timeout=10)
    assert ok.status_code == 200


# -- deadlines and /health under load ------------------------------------------------------------------


def _predict(url: str, urls: list[str]) -> requests.Response:
    tasks = [{"id": i + 1, "data": {"image": u}} for i, u in enumerate(urls)]
    return requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": SEG}, timeout=60)


def test_slow_image_hosts_cannot_starve_the_backend(
    backend: BackendProcess, hosts: dict[str, TestServer]
) -> None:
    good, slow = f"{hosts['good'].url}/a.jpg", f"{hosts['slow'].url}/slow.jpg"
    # positive control: an allowed host's image is predicted
    r = _predict(backend.url, [good])
    assert r.status_code == 200 and r.json()["results"][0]["result"]
    with cf.ThreadPoolExecutor(5) as pool:
        t0 = time.monotonic()
        futures = [pool.submit(_predict, backend.url, [slow, good]) for _ in range(4)]
        time.sleep(1.0)
        health_times = []
        for _ in range(3):
            h0 = time.monotonic()
            assert requests.get(f"{backend.url}/health", timeout=5).status_code == 200
            health_times.append(time.monotonic() - h0)
            time.sleep(0.3)
        answers = [f.result() for f in futures]
        elapsed = time.monotonic() - t0
    assert max(health_times) < 1.0, health_times
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) == 3 and codes.count(503) == 1, codes  # 4 threads: 3 prediction slots
    for a in answers:
        if a.status_code == 200:
            painted = [bool(p["result"]) for p in a.json()["results"]]
            assert painted == [False, True], painted  # slow task cut at its deadline, the rest answered
    assert elapsed < 15, elapsed  # deadline 4 s (+ inference), not 4000 bytes x 0.5 s
    assert "no prediction for task 1" in backend.log()


def test_demo_experiment_serves_pool_images_never_the_oracles_ground_truth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``madseg backend`` with the demo's experiment (as ``madseg demo`` starts it): the document root
    is the broad common parent of the experiment and pool folders, but only the pool folders are read;
    the oracle's hidden masks, S(0)/T(0) masks and anything else under the root are refused."""
    from projects.experiment import load_experiment

    toml = Path(__file__).resolve().parents[1] / "projects" / "templates" / "demo.toml"
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(toml)
    root = exp.document_root()
    shared = shared_dir() / "data"
    image = sorted((shared / "coco_voc" / "images").iterdir())[0]
    mask = sorted((shared / "coco_voc" / "masks").iterdir())[0]
    s0_mask = sorted((shared / "voc_samples" / "masks").iterdir())[0]

    def d(p: Path) -> str:
        return "/data/local-files/?d=" + os.path.relpath(p, root)

    port = free_port()
    env = _env(tmp_path, port, MADSEG_EXPERIMENT=str(toml), LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(root))
    for key in ("MADSEG_MODEL", "MADSEG_CHECKPOINT"):
        env.pop(key)
    madseg = Path(sys.executable).with_name("madseg")
    with BackendProcess(env, tmp_path / "demo-backend.log", argv=[str(madseg), "backend"], cwd=tmp_path,
                        timeout=180) as proc:
        r = _predict(proc.url, [d(image), d(mask), d(s0_mask), "/data/local-files/?d=etc/passwd",
                                "/data/local-files/?d=../../../../etc/hostname"])
        assert r.status_code == 200, r.text
        assert [bool(p["result"]) for p in r.json()["results"]] == [True, False, False, False, False]
