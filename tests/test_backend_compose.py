"""docker-compose.yml validates (without a Docker engine), wires the services together and is
secure by default: no fallback secrets, nothing published beyond 127.0.0.1, Redis with a password.

Needs Debian's ``docker-compose`` (1.29) binary: ``apt-get install -y docker-compose`` (or run
``scripts/system-deps.sh``). ``docker-compose config`` resolves and validates the file offline.
Every call passes ``--env-file`` explicitly, so an operator's ``.env`` beside the file never
changes what is tested.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Every secret the compose file needs, each with a distinct test value (letters and digits).
SECRETS = {
    "POSTGRES_PASSWORD": "pgSecret4711",
    "LS_ADMIN_PASSWORD": "adminSecret4712",
    "LS_TOKEN": "tokenSecret4713",
    "BACKEND_PASSWORD": "backendSecret4714",
    "REDIS_PASSWORD": "redisSecret4715",
}
_SECRET_KEY = re.compile(r"PASS|TOKEN|SECRET|API_KEY")


def _compose_config(env_file: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: run `sudo apt-get install -y docker-compose` "
                    "(or scripts/system-deps.sh) to validate docker-compose.yml")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MADSEG_", "LS_", "BACKEND_", "POSTGRES_", "REDIS_"))}
    env.update(extra_env or {})
    return subprocess.run(
        [exe, "-f", str(REPO / "docker-compose.yml"), "--env-file", str(env_file), "config"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )


def _env_file(tmp_path: Path, values: dict[str, str], name: str = "test.env") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def _rendered(tmp_path: Path, values: dict[str, str] | None = None) -> dict:
    import yaml

    proc = _compose_config(_env_file(tmp_path, SECRETS if values is None else values))
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def _published(cfg: dict) -> list[tuple[str, str]]:
    """``(service, port spec)`` of every port published on the host."""
    out = []
    for name, svc in cfg["services"].items():
        for p in svc.get("ports", []):
            out.append((name, p if isinstance(p, str) else
                        f"{p.get('host_ip', '')}:{p.get('published', '')}:{p.get('target', '')}"))
    return out


def _wide_publishes(cfg: dict) -> list[tuple[str, str]]:
    """Published ports not bound to 127.0.0.1 (no address = all interfaces)."""
    return [(n, p) for n, p in _published(cfg) if not p.startswith("127.0.0.1:")]


def test_compose_file_is_valid_and_wires_the_services(tmp_path) -> None:
    cfg = _rendered(tmp_path)
    services = cfg["services"]
    assert set(services) == {"db", "redis", "label-studio", "ml-backend", "worker"}

    ls = services["label-studio"]["environment"]
    assert ls["POSTGRE_HOST"] == "db" and ls["DJANGO_DB"] == "default"
    backend, worker = services["ml-backend"], services["worker"]
    assert backend["command"][:2] == ["madseg", "backend"]
    assert worker["command"] == ["madseg", "worker"]
    for svc in (backend, worker):
        env = svc["environment"]
        assert env["REDIS_URL"].startswith("redis://")
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["LABEL_STUDIO_API_KEY"] == ls["LABEL_STUDIO_USER_TOKEN"]
        assert env["MADSEG_MODEL_DIR"] == "/models"
        assert any(v.startswith("models:/models") for v in svc["volumes"])
        assert any(v.endswith(":/madseg/pool:ro") for v in svc["volumes"])
    # backend and worker share the queue and the model volume; the image builds from the Dockerfile
    assert backend["environment"]["MADSEG_QUEUE"] == worker["environment"]["MADSEG_QUEUE"]
    assert backend["image"] == worker["image"] and "build" in backend
    assert (REPO / "Dockerfile").is_file()
    # Label Studio and the backend see the pool at the same document root
    assert ls["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == backend["environment"][
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
    ]
    assert set(cfg["volumes"]) >= {"pgdata", "models", "redisdata"}


def test_every_secret_comes_from_the_env_file(tmp_path) -> None:
    """Positive control: with the secrets supplied the file renders, and every password/token
    setting of every service is one of the supplied values — never a constant from the file."""
    cfg = _rendered(tmp_path)
    secret_settings = 0
    for name, svc in cfg["services"].items():
        for key, val in (svc.get("environment") or {}).items():
            if _SECRET_KEY.search(key) and key != "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN":
                secret_settings += 1
                assert val in SECRETS.values(), f"{name}: {key}={val!r} is not taken from .env"
    assert secret_settings >= 9
    env = cfg["services"]["ml-backend"]["environment"]
    assert env["BASIC_AUTH_PASS"] == SECRETS["BACKEND_PASSWORD"]
    assert env["LABEL_STUDIO_API_KEY"] == SECRETS["LS_TOKEN"]


def test_compose_has_no_fallback_secrets() -> None:
    """Every ``${VAR}`` naming a password or token is ``${VAR:?...}`` (refuse when unset), never
    ``${VAR:-default}`` / ``${VAR-default}`` / a bare ``${VAR}`` that renders empty."""
    text = (REPO / "docker-compose.yml").read_text()
    refs = re.findall(r"\$\{([A-Z0-9_]+)([^}]*)\}", text)
    secret_refs = [(var, rest) for var, rest in refs if _SECRET_KEY.search(var)]
    assert {var for var, _ in secret_refs} == set(SECRETS)
    for var, rest in secret_refs:
        assert rest.startswith(":?"), (
            f"${{{var}{rest}}} in docker-compose.yml falls back; use ${{{var}:?...}}")
    # and no literal password/token values are written in the file (only ${...} references)
    for line in text.splitlines():
        m = re.match(r"\s*([A-Z0-9_]+):\s*(.+)$", line)
        if m and _SECRET_KEY.search(m.group(1)) and m.group(1) != "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN":
            assert m.group(2).strip().startswith("${"), (
                f"literal secret in docker-compose.yml: {line.strip()}")


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_render_without_each_secret(tmp_path, missing) -> None:
    values = {k: ("" if k == missing else v) for k, v in SECRETS.items()}
    proc = _compose_config(_env_file(tmp_path, values))
    assert proc.returncode != 0
    assert f"set {missing} in .env" in proc.stderr
    # the same variable supplied through the environment instead of the file is accepted
    ok = _compose_config(_env_file(tmp_path, values, "partial.env"), {missing: SECRETS[missing]})
    assert ok.returncode == 0, ok.stderr


def test_nothing_is_published_beyond_localhost(tmp_path) -> None:
    cfg = _rendered(tmp_path)
    published = _published(cfg)
    assert published == [("label-studio", "127.0.0.1:8080:8080/tcp")]
    assert _wide_publishes(cfg) == []
    # the backend is reachable inside the compose network only (Label Studio uses the service name)
    backend = cfg["services"]["ml-backend"]
    assert "ports" not in backend and "9090" in [str(p) for p in backend.get("expose", [])]
    for svc in ("db", "redis", "worker"):
        assert "ports" not in cfg["services"][svc]
    # negative control of the check: an operator's explicit wider bind shows up as such
    wide = _rendered(tmp_path, {**SECRETS, "LS_BIND": "0.0.0.0"})
    assert _wide_publishes(wide) == [("label-studio", "0.0.0.0:8080:8080/tcp")]


def test_env_example_lists_every_required_setting_with_empty_secrets(tmp_path) -> None:
    example = (REPO / ".env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert set(SECRETS) <= set(values)
    for key in SECRETS:
        assert values[key] == "", f".env.example must not ship a value for {key}"
    # as shipped it refuses to render; filled in it renders and binds Label Studio to 127.0.0.1
    shipped = tmp_path / "shipped.env"
    shipped.write_text(example)
    assert _compose_config(shipped).returncode != 0
    filled = {**values, **SECRETS}
    cfg = _rendered(tmp_path, filled)
    assert _published(cfg) == [("label-studio", "127.0.0.1:8080:8080/tcp")]
    # secrets stay out of git and out of the Docker build context
    assert ".env" in (REPO / ".gitignore").read_text().split()
    assert ".env" in (REPO / ".dockerignore").read_text().split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_requires_the_password_and_the_services_url_carries_it(tmp_path) -> None:
    """Runs the rendered Redis command (the real redis-server, on a free port): a client without
    the password is refused; the backend's REDIS_URL (host swapped for 127.0.0.1) gets in."""
    import redis

    cfg = _rendered(tmp_path)
    rsvc = cfg["services"]["redis"]
    assert rsvc["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    cmd = rsvc["command"]
    assert cmd[:2] == ["sh", "-c"] and "--requirepass" in cmd[2]
    url = cfg["services"]["ml-backend"]["environment"]["REDIS_URL"]
    assert url == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    assert cfg["services"]["worker"]["environment"]["REDIS_URL"] == url

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    port = _free_port()
    local = f"{exe} --port {port} --save '' --dir {tmp_path}"
    script = cmd[2].replace("$$", "$").replace("redis-server", local)
    proc = subprocess.Popen(["sh", "-c", script], env={**os.environ, **rsvc["environment"]},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        anon = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                anon.ping()
                pytest.fail("Redis answered a client without the password")
            except redis.AuthenticationError:
                break  # NOAUTH: the password is required
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        authed = redis.Redis.from_url(url.replace("@redis:6379", f"@127.0.0.1:{port}"), socket_timeout=5)
        assert authed.ping() is True
        wrong = redis.Redis.from_url(f"redis://:wrong@127.0.0.1:{port}/0", socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
