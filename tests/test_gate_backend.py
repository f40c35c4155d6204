"""The backend's fine-tune path gates before it moves the serving pointer (real fine-tunes of the
cheapest real model, ESPNetv2 s=0.5 @256, on voc_samples; T(0) = voc_samples half1).

- a forced regression (a huge learning rate) is rejected: kept under versions/, listed by
  ``/versions`` as rejected with the reason, the pointer does not move, the target is served;
- without a T(0) nothing is promoted;
- positive control: an improving version (a near-copy of the target, against a damaged parent
  that was let through with a wide tolerance) is promoted and served.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ml_backend.app import create_app
from ml_backend.backend_config import BackendConfig
from ml_backend.errors import MadsegError
from ml_backend.jobs import Submission, train_gate_publish
from ml_backend.shared import shared_dir
from ml_backend.versions import list_versions, new_record, read_pointer, write_pointer
from ml_backend.zoo import load_model_spec

VOC = shared_dir() / "data" / "voc_samples"
TARGET = {"name": "espnetv2",
          "checkpoint": str(shared_dir() / "models" / "espnetv2" / "espnetv2_s_0.5_pascal_256x256.pth"),
          "options": {}}
TRAIN_STEMS = ["voc_0", "voc_1", "voc_114"]
BAD = {"epochs": 2, "lr": 0.05, "num_workers": 0, "crop_size": [128, 128]}
GENTLE = {"epochs": 1, "lr": 1e-9, "num_workers": 0, "crop_size": [128, 128]}


class _NoQueue:
    mode = "none"

    def submit(self, project_id: int) -> Submission:
        raise AssertionError("no job is queued in this test")

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("train")
    for sub in ("images", "masks"):
        (d / sub).mkdir()
        for s in TRAIN_STEMS:
            shutil.copy(VOC / sub / f"{s}.png", d / sub / f"{s}.png")
    return d


@pytest.fixture(scope="module")
def target_model() -> Any:
    return load_model_spec(TARGET, device="cpu")


def _settings(model_dir: Path, finetune: dict[str, Any], gate: dict[str, Any] | None = None,
              val: bool = True) -> dict[str, Any]:
    cfg = BackendConfig(target=TARGET, model_dir=model_dir, val_dir=VOC if val else None, val_subset="half1",
                        finetune_options=finetune, gate_options=gate or {}, device="cpu")
    return cfg.job_settings()


def _versions(model_dir: Path) -> dict[str, Any]:
    cfg = BackendConfig(target=TARGET, model_dir=model_dir, device="cpu")
    resp = create_app(cfg, queue=_NoQueue()).test_client().get("/versions")
    assert resp.status_code == 200
    return resp.get_json()


@pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")
def test_forced_regression_is_rejected_and_never_served(tmp_path: Path, data_dir: Path,
                                                        target_model: Any) -> None:
    rec = train_gate_publish("job-bad", target_model, data_dir, _settings(tmp_path, BAD), projects=[3],
                             n_train=3)
    assert rec.status == "rejected", rec.reason
    assert "T(0): forgetting" in rec.reason
    t0 = rec.gate["metrics"]["T(0)"]
    assert t0["n_images"] == 7 and t0["delta_gt_miou"] < -0.01
    # kept on disk, listed with the reason, never served
    assert (tmp_path / "versions" / "job-bad" / "model.pth").is_file()
    assert read_pointer(tmp_path) is None and not (tmp_path / "current.json").exists()
    listed = _versions(tmp_path)
    assert listed["current"] is None  # the configured target is served
    (detail,) = listed["details"]
    assert detail["status"] == "rejected" and detail["version"] == rec.version
    assert "forgetting" in detail["reason"] and detail["serving"] is False
    # even a direct attempt cannot serve it, nor a record that skipped the gate
    with pytest.raises(MadsegError, match="rejected by the promotion gate"):
        write_pointer(tmp_path, list_versions(tmp_path)[0])
    ungated = new_record(version="v", name="espnetv2", checkpoint=rec.checkpoint, options={}, job_id="x",
                         projects=(), n_train=1)
    with pytest.raises(MadsegError, match="no promotion-gate decision"):
        write_pointer(tmp_path, ungated)
    assert read_pointer(tmp_path) is None


@pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")
def test_without_t0_nothing_is_promoted(tmp_path: Path, data_dir: Path, target_model: Any) -> None:
    rec = train_gate_publish("job-noval", target_model, data_dir, _settings(tmp_path, GENTLE, val=False),
                             projects=[3], n_train=3)
    assert rec.status == "rejected" and "no images to check forgetting" in rec.reason
    assert read_pointer(tmp_path) is None


@pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")
def test_improving_version_is_promoted_over_a_worse_parent(tmp_path: Path, data_dir: Path,
                                                           target_model: Any) -> None:
    # a damaged version let through by a gate with a wide tolerance becomes the served parent ...
    bad = train_gate_publish("job-1", target_model, data_dir, _settings(tmp_path, BAD, {"t0_tolerance": 1.0}),
                             projects=[3], n_train=3)
    assert bad.status == "promoted" and read_pointer(tmp_path).version == bad.version
    # ... the next job (a near-copy of the target) is better than it on T(0): promoted and served
    good = train_gate_publish("job-2", target_model, data_dir, _settings(tmp_path, GENTLE), projects=[3],
                              n_train=3)
    assert good.status == "promoted", good.reason
    t0 = good.gate["metrics"]["T(0)"]
    assert t0["delta_gt_miou"] > 0.01
    assert read_pointer(tmp_path).version == good.version
    listed = _versions(tmp_path)
    assert listed["current"] == good.version
    assert [d["status"] for d in listed["details"]] == ["promoted", "promoted"]
    assert [d["serving"] for d in listed["details"]] == [False, True]
    status = json.loads((tmp_path / "versions" / "job-2" / "version.json").read_text())
    assert status["status"] == "promoted" and status["gate"]["promoted"] is True
