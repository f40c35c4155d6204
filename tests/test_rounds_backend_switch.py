"""The switch the round orchestrator relies on: MADSEG_TRAIN_ON_ANNOTATION=0 keeps the ML backend
from queueing a fine-tune on every (oracle) annotation, while START_TRAINING still trains."""

from __future__ import annotations

from pathlib import Path

from ml_backend.app import create_app
from ml_backend.backend_config import BackendConfig
from ml_backend.jobs import Submission

SEG_CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="label" toName="image">'
    '<Label value="background" background="#000000"/><Label value="cat" background="#400000"/>'
    "</BrushLabels></View>"
)


class RecordingQueue:
    """Records submissions instead of fine-tuning (the real queue would train a network)."""

    mode = "recording"

    def __init__(self) -> None:
        self.submitted: list[int] = []

    def submit(self, project_id: int) -> Submission:
        self.submitted.append(project_id)
        return Submission(f"job-{len(self.submitted)}", project_id, coalesced=False)

    def describe(self) -> dict:
        return {"mode": self.mode, "submitted": list(self.submitted)}


def _post(client, action: str) -> int:
    payload = {"action": action, "project": {"id": 5, "label_config": SEG_CONFIG},
               "annotation": {"id": 1, "result": []}}
    return client.post("/webhook", json=payload).status_code


def test_env_switch_is_parsed(tmp_path: Path) -> None:
    env = {"MADSEG_MODEL": "espnetv2", "MADSEG_MODEL_DIR": str(tmp_path)}
    assert BackendConfig.from_env(env).train_on_annotation is True
    for off in ("0", "false", "OFF"):
        assert BackendConfig.from_env({**env, "MADSEG_TRAIN_ON_ANNOTATION": off}).train_on_annotation is False


def test_annotations_do_not_train_when_switched_off(tmp_path: Path) -> None:
    cfg = BackendConfig(target={"name": "espnetv2", "checkpoint": None, "options": {}}, model_dir=tmp_path,
                        train_on_annotation=False, train_projects=(5,))
    q = RecordingQueue()
    client = create_app(cfg, queue=q).test_client()
    assert _post(client, "ANNOTATION_CREATED") == 200
    assert _post(client, "ANNOTATION_UPDATED") == 200
    assert q.submitted == []
    assert _post(client, "START_TRAINING") == 201
    assert q.submitted == [5]


def test_annotations_train_by_default(tmp_path: Path) -> None:
    cfg = BackendConfig(target={"name": "espnetv2", "checkpoint": None, "options": {}}, model_dir=tmp_path,
                        train_projects=(5,))  # only known projects train (MADSEG_TRAIN_PROJECTS)
    q = RecordingQueue()
    client = create_app(cfg, queue=q).test_client()
    assert _post(client, "ANNOTATION_CREATED") == 201
    assert q.submitted == [5]
