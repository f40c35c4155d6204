"""The ML backend for real: gunicorn (``python -m ml_backend``), the real Label Studio server
(session fixture ``ls_server``), the real Redis, the cheapest real model (ESPNetv2 s=0.5 @256).

- Label Studio connects the backend (``/health`` + ``/setup``, basic auth) and auto-creates its
  ``/webhook``; annotations submitted to the segmentation project then queue exactly ONE fine-tune
  job (rq on the real Redis with a unique queue; and the in-process mode), the job exports the
  masks, fine-tunes 1 epoch and the backend serves the new version in ``/predict`` without restart.
- ``/predict`` returns brush results that decode exactly to the model's prediction.
- Broken webhook payloads answer 4xx; a missing basic auth 401.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from ml_backend.classes import VOC_CLASSES
from ml_backend.imageio import read_mask, read_rgb
from ml_backend.jobs import purge_queue
from ml_backend.labelstudio import brush, configs
from ml_backend.labelstudio.client import connect
from ml_backend.labelstudio.connect import connect_ml_backend
from ml_backend.labelstudio.local_files import local_files_url
from ml_backend.labelstudio.rle import decode
from ml_backend.shared import shared_dir
from projects import round_projects
from projects.simulation.ls_local import free_port
from tests.backend_proc import BackendProcess

pytestmark = [pytest.mark.server, pytest.mark.redis, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/0"
AUTH = ("madseg-backend", "backend-pass-42")
N_IMAGES = 3
#: the cheapest real fine-tune: 1 epoch (2 steps of 2 images), one learning rate, small crops
FINETUNE = {"epochs": 1, "lrs": [1e-4], "num_workers": 0, "crop_size": [128, 128]}


def _checkpoint() -> Path:
    return shared_dir() / "models" / "espnetv2" / "espnetv2_s_0.5_pascal_256x256.pth"


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, Path, Path]]:
    """(image id, image path, mask path) of a few real VOC images."""
    root = shared_dir() / "data" / "voc_samples"
    imgs = sorted((root / "images").iterdir())[:N_IMAGES]
    return [(p.stem, p, root / "masks" / f"{p.stem}.png") for p in imgs]


def _backend_env(ls_server: Any, model_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MADSEG_", "BASIC_AUTH", "REDIS_URL"))}
    env.update(ls_server.env())
    env.update({
        "MADSEG_MODEL": "espnetv2",
        "MADSEG_CHECKPOINT": str(_checkpoint()),
        "MADSEG_MODEL_DIR": str(model_dir),
        "MADSEG_FINETUNE_OPTIONS": json.dumps(FINETUNE),
        # the promotion gate needs a T(0); a wide tolerance lets this 1-epoch version through so the
        # pointer move is exercised (the gate's verdicts: tests/test_gate.py, test_gate_backend.py)
        "MADSEG_VAL_DIR": str(shared_dir() / "data" / "voc_samples"),
        "MADSEG_VAL_SUBSET": "half1",
        "MADSEG_GATE_OPTIONS": json.dumps({"t0_tolerance": 1.0}),
        "MADSEG_BACKEND_HOST": "127.0.0.1",
        "MADSEG_BACKEND_PORT": str(port),
        "MADSEG_BACKEND_THREADS": "4",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(ls_server.document_root),
        # the test root may be /: the backend reads local task images only from the folders named here
        "MADSEG_LOCAL_FILES_DIRS": str(shared_dir() / "data" / "voc_samples" / "images"),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


@pytest.fixture()
def start_backend(ls_server: Any, tmp_path: Path) -> Iterator[Any]:
    started: list[BackendProcess] = []

    def start(auth: tuple[str, str] | None = None, **extra: str) -> BackendProcess:
        model_dir = tmp_path / f"models{len(started)}"
        env = _backend_env(ls_server, model_dir, free_port(), **extra)
        if auth:
            env.update({"BASIC_AUTH_USER": auth[0], "BASIC_AUTH_PASS": auth[1]})
        b = BackendProcess(env, tmp_path / f"backend{len(started)}.log", auth=auth)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


def _segmentation_project(
    ls_server: Any, samples: list[tuple[str, Path, Path]], title: str
) -> tuple[Any, int]:
    client = connect(ls_server.url, ls_server.api_key)
    project = client.projects.create(title=title, label_config=configs.segmentation_config(VOC_CLASSES))
    root = Path(ls_server.document_root)
    tasks = [{"data": {configs.IMAGE_KEY: local_files_url(img, root), "image_id": iid},
              "meta": {"image_id": iid, "path": str(img)}} for iid, img, _ in samples]
    client.projects.import_tasks(id=project.id, request=tasks)
    return client, int(project.id)


def _tasks(client: Any, pid: int) -> list[dict[str, Any]]:
    return sorted(round_projects.iter_tasks(client, pid), key=lambda t: t["id"])


def _annotate_all(client: Any, pid: int, samples: list[tuple[str, Path, Path]]) -> None:
    """Submit the ground-truth mask of every task as an annotation (each fires the webhook)."""
    ctl = configs.validate_segmentation_config(configs.segmentation_config(VOC_CLASSES))
    masks = {iid: mask for iid, _, mask in samples}
    for task in _tasks(client, pid):
        gt = read_mask(masks[task["data"]["image_id"]], len(VOC_CLASSES))
        result = brush.class_map_results(gt, VOC_CLASSES, ctl)
        client.annotations.create(id=task["id"], result=result, was_cancelled=False)


def _label_map_from_results(results: list[dict[str, Any]], h: int, w: int) -> np.ndarray:
    out = np.full((h, w), 255, np.uint8)
    for r in results:
        assert (r["from_name"], r["to_name"], r["type"]) == ("label", "image", "brushlabels")
        assert (r["original_width"], r["original_height"]) == (w, h)
        alpha = decode(r["value"]["rle"], h, w) > 0
        assert not (alpha & (out != 255)).any(), "two brush results paint the same pixel"
        out[alpha] = VOC_CLASSES.index(r["value"]["brushlabels"][0])
    return out


def _predict(backend: BackendProcess, client: Any, pid: int) -> dict[str, Any]:
    tasks = _tasks(client, pid)
    r = backend.post("/predict", {"tasks": tasks, "project": f"{pid}.0",
                                  "label_config": configs.segmentation_config(VOC_CLASSES)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == len(tasks)
    return body


def test_rq_mode_webhook_queues_one_job_and_backend_serves_the_new_version(
    ls_server: Any, start_backend: Any, samples: list[tuple[str, Path, Path]], tmp_path: Path
) -> None:
    from redis import Redis
    from rq import Queue
    from rq.registry import FinishedJobRegistry

    from ml_backend.zoo import load_model

    queue_name = f"madseg-test-{uuid.uuid4().hex[:10]}"
    backend = start_backend(AUTH, REDIS_URL=REDIS_URL, MADSEG_QUEUE=queue_name, MADSEG_JOB_DELAY="0")
    conn = Redis.from_url(REDIS_URL)
    rq_queue = Queue(queue_name, connection=conn)
    try:
        client, pid = _segmentation_project(ls_server, samples, f"backend rq {queue_name}")
        # Label Studio checks /health and /setup (with basic auth) and creates the /webhook
        connect_ml_backend(client, pid, backend.url, basic_auth=AUTH)
        hooks = [h for h in client.webhooks.list(project=str(pid)) if h.url == backend.url + "/webhook"]
        assert len(hooks) == 1 and hooks[0].headers.get("Authorization", "").startswith("Basic ")

        # bad requests: 4xx, not 500
        assert requests.post(f"{backend.url}/webhook", json={"action": "START_TRAINING"}).status_code == 401
        assert backend.post("/webhook", None, data=b"{not json").status_code == 400
        assert backend.post("/webhook", ["ANNOTATION_CREATED"]).status_code == 400
        assert backend.post("/webhook", {"action": "ANNOTATION_CREATED", "project": {}}).status_code == 400
        assert backend.post("/predict", {"tasks": "nope"}).status_code == 400
        ignored = backend.post("/webhook", {"action": "PROJECT_UPDATED", "project": {"id": pid}})
        assert ignored.status_code == 200 and ignored.json()["status"] == "ignored"

        # /predict: the base version; its brush results decode to the model's prediction exactly
        model = load_model("espnetv2", str(_checkpoint()))
        before = _predict(backend, client, pid)
        assert before["model_version"] == model.version
        for iid, img_path, _ in samples:
            task_index = [t["data"]["image_id"] for t in _tasks(client, pid)].index(iid)
            pred = before["results"][task_index]
            assert pred["model_version"] == model.version and 0 < pred["score"] <= 1
            image = read_rgb(img_path)
            expected = model.predict([image])[0]
            got = _label_map_from_results(pred["result"], *image.shape[:2])
            np.testing.assert_array_equal(got, expected)

        # annotations through the real webhook: exactly one queued job
        assert rq_queue.count == 0
        _annotate_all(client, pid, samples)
        assert rq_queue.count == 1, backend.log()
        job = rq_queue.jobs[0]
        assert job.meta.get("project") == pid

        # the worker runs it: export, 1-epoch fine-tune, new version, pointer moved
        env = dict(backend.env)
        worker = subprocess.run([sys.executable, "-m", "projects.cli", "worker", "--burst"], env=env,
                                capture_output=True, text=True, timeout=300)
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
        assert FinishedJobRegistry(queue_name, connection=conn).get_job_ids() == [job.id]
        pointer = json.loads((Path(env["MADSEG_MODEL_DIR"]) / "current.json").read_text())
        assert pointer["job_id"] == job.id and pointer["n_train"] == N_IMAGES
        assert pointer["version"] != model.version

        # the running backend serves the new version (no restart) ...
        after = _predict(backend, client, pid)
        assert after["model_version"] == pointer["version"]
        assert {p["model_version"] for p in after["results"]} == {pointer["version"]}
        versions = requests.get(f"{backend.url}/versions", auth=AUTH, timeout=10).json()
        assert versions["current"] == pointer["version"] and pointer["version"] in versions["versions"]
        # ... and so does Label Studio when it asks for predictions
        client.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True})
        preds = client.predictions.list(task=_tasks(client, pid)[0]["id"])
        assert pointer["version"] in {p.model_version for p in preds}
    finally:
        purge_queue(conn, queue_name)


def test_in_process_mode_burst_of_annotations_is_one_fine_tune(
    ls_server: Any, start_backend: Any, samples: list[tuple[str, Path, Path]]
) -> None:
    backend = start_backend(AUTH, MADSEG_JOB_DELAY="3")  # an authenticated /setup makes the project known
    client, pid = _segmentation_project(ls_server, samples, f"backend in-process {uuid.uuid4().hex[:8]}")
    connect_ml_backend(client, pid, backend.url, basic_auth=AUTH)
    base = _predict(backend, client, pid)["model_version"]

    _annotate_all(client, pid, samples)
    state = requests.get(f"{backend.url}/is_training", auth=AUTH, timeout=10).json()
    assert state["mode"] == "in-process"
    assert len(state["pending"]) + len(state["running"]) == 1 and not state["finished"]

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = requests.get(f"{backend.url}/is_training", auth=AUTH, timeout=10).json()
        if state["finished"] and not state["pending"] and not state["running"]:
            break
        time.sleep(0.5)
    assert [f["state"] for f in state["finished"]] == ["finished"], backend.log()

    after = _predict(backend, client, pid)
    assert after["model_version"] != base
    pointer = json.loads((Path(backend.env["MADSEG_MODEL_DIR"]) / "current.json").read_text())
    assert after["model_version"] == pointer["version"] and pointer["projects"] == [pid]


def test_predict_downloads_task_images_from_label_studio(
    ls_server: Any, samples: list[tuple[str, Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a local document root the backend downloads task images from Label Studio, with a
    legacy token or a personal access token (JWT, refreshed); a refused token gives empty
    predictions for those tasks, not an error for the whole request."""
    from ml_backend.app import create_app
    from ml_backend.backend_config import BackendConfig
    from ml_backend.zoo import load_model

    client, pid = _segmentation_project(ls_server, samples[:1], f"backend download {uuid.uuid4().hex[:8]}")
    round_projects.ensure_storages(client, pid, [samples[0][1].parent], Path(ls_server.document_root))
    tasks = _tasks(client, pid)
    body = {"tasks": tasks, "project": f"{pid}.0", "label_config": configs.segmentation_config(VOC_CLASSES)}
    cfg = BackendConfig(target={"name": "espnetv2", "checkpoint": str(_checkpoint()), "options": {}},
                        model_dir=tmp_path / "models", document_root=None)
    model = load_model("espnetv2", str(_checkpoint()))
    paths = {iid: img for iid, img, _ in samples}
    pat = client.tokens.create().token
    monkeypatch.delenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_URL", ls_server.url)
    for key in (ls_server.api_key, pat):
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", key)
        r = create_app(cfg).test_client().post("/predict", json=body)
        assert r.status_code == 200, r.get_data(as_text=True)
        for task, pred in zip(tasks, r.get_json()["results"], strict=True):
            image = read_rgb(paths[task["data"]["image_id"]])
            got = _label_map_from_results(pred["result"], *image.shape[:2])
            np.testing.assert_array_equal(got, model.predict([image])[0])

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-valid-token")
    r = create_app(cfg).test_client().post("/predict", json=body)
    assert r.status_code == 200
    assert [p["result"] for p in r.get_json()["results"]] == [[]]
