"""docker-compose.yml validates (without a Docker engine) and wires the services together.

Needs Debian's ``docker-compose`` (1.29) binary: ``apt-get install -y docker-compose`` (or run
``scripts/system-deps.sh``). ``docker-compose config`` resolves and validates the file offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _compose_config() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: run `sudo apt-get install -y docker-compose` "
                    "(or scripts/system-deps.sh) to validate docker-compose.yml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MADSEG_", "LS_", "BACKEND_"))}
    proc = subprocess.run(
        [exe, "-f", str(REPO / "docker-compose.yml"), "config"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return proc.stdout


def test_compose_file_is_valid_and_wires_the_services() -> None:
    import yaml

    cfg = yaml.safe_load(_compose_config())
    services = cfg["services"]
    assert set(services) == {"db", "redis", "label-studio", "ml-backend", "worker"}

    ls = services["label-studio"]["environment"]
    assert ls["POSTGRE_HOST"] == "db" and ls["DJANGO_DB"] == "default"
    backend, worker = services["ml-backend"], services["worker"]
    assert backend["command"][:2] == ["madseg", "backend"]
    assert worker["command"] == ["madseg", "worker"]
    for svc in (backend, worker):
        env = svc["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:")
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
