"""End to end: one MAD round (+ entropy baseline, evaluation pass, report) through the real Label
Studio server, the real ML backend (rq on the real Redis) and `madseg round` in subprocesses that
are killed with SIGKILL after given stages and re-run.

Small and cheap: 12 coco_voc images + 2 out-of-domain photos, ESPNetv2 s=0.5 @256 as the target,
the TFLite DeepLabV3 and DiCENet s=0.5 @256 as competitors, 1 epoch, one learning rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ml_backend.shared import shared_dir
from projects.simulation.ls_local import free_port
from projects.state import RoundState
from tests.backend_proc import BackendProcess

ROOT = Path(__file__).resolve().parents[1]
MADSEG = [sys.executable, "-m", "projects.cli"]


def _write_experiment(tmp: Path, ls_url: str, doc_root: Path, backend_url: str) -> Path:
    shared = shared_dir()
    imgs = sorted((shared / "data" / "coco_voc" / "images").glob("*.jpg"))[:12]
    imgs += sorted((shared / "data" / "unlabelled" / "edgenets").glob("*"))[:2]
    (tmp / "pool.txt").write_text("".join(f"{p}\n" for p in imgs))
    cfg = tmp / "exp.toml"
    cfg.write_text(f"""
[experiment]
name = "e2e"
dir = "{tmp}/exp"
seed = 0

[pool]
lists = ["{tmp}/pool.txt"]

[target]
key = "esp-s0.5"
name = "espnetv2"
checkpoint = "{{shared}}/models/espnetv2/espnetv2_s_0.5_pascal_256x256.pth"

[[competitors]]
key = "deeplabv3-mnv2"
name = "tflite"
checkpoint = "{{shared}}/models/tflite/deeplabv3_mnv2_dm05_voc.tflite"

[[competitors]]
key = "dicenet-s0.5"
name = "dicenet"
checkpoint = "{{shared}}/models/dicenet/dicenet_s_0.5_pascal_256x256.pth"

[s0]
root = "{{shared}}/data/voc_samples"
subset = "half0"

[t0]
root = "{{shared}}/data/voc_samples"
subset = "half1"

[selection]
n3 = 2
n4 = 1
test_size = 3
max_per_class = 2
baseline = "entropy"

[finetune]
preset = "demo"
epochs = 1
lrs = [1e-4]

[label_studio]
url = "{ls_url}"
document_root = "{doc_root}"
raters_per_task = 3
backend_url = "{backend_url}"

[oracle]
enabled = true
gt = ["{{shared}}/data/coco_voc/masks"]
noise = 0.1
""")
    return cfg


def _madseg(args: list[str], env: dict[str, str], crash_after: str | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
    e = dict(env)
    if crash_after:
        e["MADSEG_TEST_CRASH_AFTER"] = crash_after
    return subprocess.run([*MADSEG, *args], env=e, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _task_image_ids(client, project_id: int) -> list[str]:
    ids = []
    for t in client.tasks.list(project=project_id, fields="all", page_size=100):
        d = t.model_dump() if hasattr(t, "model_dump") else dict(t)
        meta, data = d.get("meta") or {}, d.get("data") or {}
        ids.append(str(meta.get("image_id") or data.get("image_id")))
    return ids


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_round_end_to_end_with_crashes(ls_server, tmp_path: Path) -> None:
    import redis

    port = free_port()
    backend_url = f"http://127.0.0.1:{port}"
    cfg = _write_experiment(tmp_path, ls_server.url, ls_server.document_root, backend_url)
    exp_dir = tmp_path / "exp"
    queue = f"madseg-test-rounds-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "LABEL_STUDIO_URL": ls_server.url, "LABEL_STUDIO_API_KEY": ls_server.api_key,
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    backend_env = {**env, "MADSEG_EXPERIMENT": str(cfg), "MADSEG_MODEL_DIR": str(exp_dir / "backend"),
                   "MADSEG_TRAIN_ON_ANNOTATION": "0", "MADSEG_BACKEND_HOST": "127.0.0.1",
                   "MADSEG_BACKEND_PORT": str(port), "REDIS_URL": "redis://127.0.0.1:6379/0",
                   "MADSEG_QUEUE": queue,
                   "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(ls_server.document_root)}
    backend = BackendProcess(backend_env, tmp_path / "backend.log", argv=[*MADSEG, "backend"], cwd=ROOT,
                             new_session=True)
    conn = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        args = ["round", "--config", str(cfg), "--rounds", "1", "--poll", "0.5", "--wait-timeout", "120",
                "--quiet", "--no-lwf"]

        # 1. killed right after M(1) went to the rating project
        p = _madseg(args, env, crash_after="round1.push_rating")
        assert p.returncode == -9, p.stderr[-3000:]
        st = RoundState.load(exp_dir, 1)
        assert st.done_stages() == ["score", "select", "predict", "projects", "push_rating"]
        rating_pid = st.outputs("projects")["rating"]
        seg_pid = st.outputs("projects")["segmentation"]
        cands = [json.loads(line)["id"] for line in (exp_dir / "round-1" / "candidates.jsonl").open()]
        assert cands
        client = ls_server.client()
        assert sorted(_task_image_ids(client, rating_pid)) == sorted(cands)

        # 2. re-run: resumes (no new rating tasks) and is killed right after the fine-tune
        p = _madseg(args, env, crash_after="round1.finetune")
        assert p.returncode == -9, p.stderr[-3000:]
        st = RoundState.load(exp_dir, 1)
        assert st.done("finetune") and st.stages["score"]["finished_at"] is not None
        assert sorted(_task_image_ids(client, rating_pid)) == sorted(cands)
        ft = st.stages["finetune"]
        ckpt = Path(ft["outputs"]["checkpoint"])
        ckpt_mtime = ckpt.stat().st_mtime_ns
        chosen = st.outputs("choose")
        ratings = json.loads((exp_dir / "round-1" / "ratings.json").read_text())
        assert sum(ratings["ood"].values()) >= 1  # the unlabelled photos were vetoed
        assert len(chosen["S"]) == 1 and chosen["T"] and not set(chosen["S"]) & set(chosen["T"])
        assert not set(chosen["S"] + chosen["T"]) & {k for k, v in ratings["ood"].items() if v}
        seg_ids = _task_image_ids(client, seg_pid)
        assert sorted(seg_ids) == sorted(set(chosen["S"]) | set(chosen["T"]))
        # the promotion gate decided; the backend serves f(1) exactly when it was promoted, and a
        # rejected f(1) is recorded with its reasons (the verdicts themselves: test_rounds_gate.py)
        gate = ft["outputs"]["gate"]
        assert gate["status"] in ("promoted", "rejected") and gate["reasons"]
        assert gate["metrics"]["T(0)"]["n_images"] == 7
        version = json.loads((exp_dir / "backend" / "versions" / "round-1" / "version.json").read_text())
        assert version["version"] == ft["outputs"]["version"] and version["status"] == gate["status"]
        pointer_file = exp_dir / "backend" / "current.json"
        if ft["outputs"]["promoted"]:
            assert json.loads(pointer_file.read_text())["version"] == ft["outputs"]["version"]
        else:
            assert not pointer_file.exists()

        # 3. re-run to the end: baseline, evaluation pass, report; nothing of round 1 is redone
        p = _madseg(args, env)
        assert p.returncode == 0, p.stderr[-3000:]
        st = RoundState.load(exp_dir, 1)
        assert st.stages["finetune"] == ft
        assert ckpt.stat().st_mtime_ns == ckpt_mtime
        assert sorted(_task_image_ids(client, rating_pid)) == sorted(cands)
        assert sorted(_task_image_ids(client, seg_pid)) == sorted(seg_ids)
        for sub in ("round-1", "round-2", "baseline-entropy/round-1", "baseline-compare/round-1"):
            assert (exp_dir / sub / "state.json").exists(), sub
        assert RoundState.load(exp_dir, 2).done("masks") and not RoundState.load(exp_dir, 2).done("finetune")

        results = json.loads((exp_dir / "results.json").read_text())
        rows = {r["key"]: r for r in results["table1"]["rows"]}
        assert {"f(0)", "f(1)", "f_entropy", "deeplabv3-mnv2", "dicenet-s0.5"} <= set(rows)
        cols = [c["name"] for c in results["table1"]["columns"]]
        assert cols[0] == "T(0)" and "T(1)" in cols
        assert isinstance(rows["f(0)"]["miou"]["T(0)"], float)
        assert results["baseline"]["rows"] and results["srcc"] and results["failures"]["counts"]
        assert results["galleries"]["candidates"] and results["stages"]
        html = (exp_dir / "report" / "report.html").read_text()
        # the gate's verdict in Table 1, and "did the round help?" for the served model
        assert rows["f(1)"]["gate"]["status"] == gate["status"] and rows["f(0)"]["gate"]["status"] == "start"
        assert isinstance(rows["f(1)"]["gt_miou"]["T(0)"], float)
        served = "f(1)" if ft["outputs"]["promoted"] else "f(0)"
        assert results["help"]["served"] == served
        help_rows = {r["model"]: r for r in results["help"]["rows"]}
        assert help_rows[served]["served"] and help_rows["f(1)"]["images"] >= 1
        assert results["help"]["effort"]["simulated"] and results["help"]["effort"]["total"]["masks"] >= 2
        for section in ("table1", "help", "failures", "baseline", "srcc", "galleries", "stages"):
            assert f'id="{section}"' in html, section

        # the backend never queued a fine-tune for the oracle's annotations
        assert conn.llen(f"rq:queue:{queue}") == 0
        assert not list(conn.scan_iter(f"{queue}:pending:*"))
    finally:
        backend.stop()
        for key in conn.scan_iter(f"*{queue}*"):
            conn.delete(key)
