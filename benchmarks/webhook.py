"""Webhook answer latency of the ML backend while a fine-tune runs (prints p50 / p95 / max).

    .venv/bin/python benchmarks/webhook.py [--requests 200] [--images 6] [--epochs 4]
                                           [--modes in-process,redis] [--redis redis://127.0.0.1:6379/0]

Everything is real: a Label Studio 1.23 server (``projects.simulation.ls_local``, temp data dir), a
segmentation project with ``--images`` VOC sample images and their ground-truth masks submitted
as annotations, the backend under gunicorn (``python -m ml_backend``, ESPNetv2 s=0.5 @256), and
for ``redis`` a ``madseg worker`` on a private rq queue. For each mode:

1. idle: ``--requests`` webhook posts (``ANNOTATION_UPDATED`` with a real annotation payload, as Label
   Studio sends them) with nothing running (they coalesce into one queued job);
2. busy: the job those posts queued starts (``MADSEG_JOB_DELAY`` = 15 s after the first one) and
   fine-tunes ``--epochs`` epochs on the exported masks; once it is in its training loop, the same
   posts again. Only answers received while the job was still running count as "busy" (the
   script says how many).

The target is < 200 ms (Label Studio waits 1 s for a webhook answer by default). Redis keys of the
private queue are deleted at the end; all processes are stopped.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import requests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml_backend.classes import VOC_CLASSES  # noqa: E402
from ml_backend.imageio import read_mask  # noqa: E402
from ml_backend.labelstudio import brush, configs  # noqa: E402
from ml_backend.labelstudio.client import connect  # noqa: E402
from ml_backend.labelstudio.export import export_tasks  # noqa: E402
from ml_backend.labelstudio.local_files import local_files_url  # noqa: E402
from ml_backend.shared import shared_dir  # noqa: E402
from projects import round_projects  # noqa: E402
from projects.simulation.ls_local import free_port, start_local_label_studio  # noqa: E402

#: the queued job starts this long after its first event: the idle measurement fits in it
JOB_DELAY_S = 15


def _wait(url: str, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s; log {log}")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM twice (an rq worker then also stops the job it runs: cold shutdown), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    for _ in range(2):
        proc.terminate()
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def _stats(ms: list[float]) -> str:
    if not ms:
        return "no samples"
    a = np.asarray(ms)
    return (f"n={len(a):4d}  p50 {np.percentile(a, 50):7.1f} ms  p95 {np.percentile(a, 95):7.1f} ms  "
            f"max {a.max():7.1f} ms")


def _fire(url: str, payload: dict[str, Any], n: int, while_running: Any = None) -> tuple[list[float], int]:
    """POST ``payload`` n times; the latencies (ms) that count, and how many counted.

    With ``while_running`` only answers received while it returns True count.
    """
    session = requests.Session()
    body = json.dumps(payload).encode()
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
        dt = (time.perf_counter() - t0) * 1000
        if r.status_code not in (200, 201):
            raise SystemExit(f"webhook answered {r.status_code}: {r.text[:200]}")
        if while_running is None or while_running():
            out.append(dt)
    return out, len(out)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _job_running(status_path: Path) -> bool:
    try:
        return json.loads(status_path.read_text()).get("state") == "running"
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def run_mode(mode: str, env: dict[str, str], tmp: Path, pid: int, config: str, payload: dict[str, Any],
             n: int) -> None:
    """Start the backend (and worker), measure idle and busy webhook latency, stop them."""
    url = f"http://127.0.0.1:{env['MADSEG_BACKEND_PORT']}"
    blog = tmp / f"backend-{mode}.log"
    backend = worker = None
    try:
        backend = _spawn([sys.executable, "-m", "ml_backend"], env, blog)
        _wait(f"{url}/health", backend, "the backend", blog)
        if mode == "redis":
            worker = _spawn([sys.executable, "-m", "projects.cli", "worker"], env, tmp / "worker.log")
        _fire(f"{url}/webhook", {"action": "PROJECT_UPDATED", "project": {"id": pid}}, 5)  # warm-up
        # idle: the first event queues a job that waits MADSEG_JOB_DELAY before it starts, the
        # others coalesce into it; nothing runs while they are answered
        first = requests.post(f"{url}/webhook", json=payload, timeout=10).json()
        status_path = Path(env["MADSEG_MODEL_DIR"]) / "jobs" / first["job_id"] / "status.json"
        idle, _ = _fire(f"{url}/webhook", payload, n, lambda: not _job_running(status_path))
        # busy: that job runs (export, then the training loop)
        deadline = time.monotonic() + 120
        while not _job_running(status_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _job_running(status_path):
            raise SystemExit(f"{mode}: the fine-tune job did not start; see {blog}")
        time.sleep(3)  # past the export, into the training loop
        busy, n_busy = _fire(f"{url}/webhook", payload, n, lambda: _job_running(status_path))
        where = "rq worker process" if mode == "redis" else "fine-tune inside the backend"
        print(f"\n{mode} queue ({where}):")
        print(f"  idle               {_stats(idle)}   (before the queued job started)")
        print(f"  during fine-tune   {_stats(busy)}   ({n_busy}/{n} answered while it ran)")
    finally:
        _stop(worker)
        _stop(backend)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--modes", default="in-process,redis")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args(argv)

    shared = shared_dir()
    ckpt = shared / "models" / "espnetv2" / "espnetv2_s_0.5_pascal_256x256.pth"
    samples = sorted((shared / "data" / "voc_samples" / "images").iterdir())[: args.images]
    tmp = Path(tempfile.mkdtemp(prefix="madseg-bench-webhook-"))
    doc_root = Path(os.path.commonpath([str(shared), str(tmp)]))
    ls = None
    queue = f"madseg-bench-{uuid.uuid4().hex[:8]}"
    try:
        t0 = time.time()
        ls = start_local_label_studio(tmp / "ls", document_root=doc_root)
        print(f"Label Studio up in {time.time() - t0:.1f} s at {ls.url}")
        client = connect(ls.url, ls.token)
        config = configs.segmentation_config(VOC_CLASSES)
        project = client.projects.create(title="webhook benchmark", label_config=config)
        pid = int(project.id)
        client.projects.import_tasks(id=pid, request=[
            {"data": {"image": local_files_url(p, doc_root), "image_id": p.stem},
             "meta": {"image_id": p.stem, "path": str(p)}} for p in samples])
        ctl = configs.validate_segmentation_config(config, VOC_CLASSES)
        for task in round_projects.iter_tasks(client, pid):
            gt = read_mask(shared / "data" / "voc_samples" / "masks" / f"{task['data']['image_id']}.png", 21)
            client.annotations.create(id=task["id"], result=brush.class_map_results(gt, VOC_CLASSES, ctl))
        exported = export_tasks(client, pid)
        task = dict(exported[0])
        annotation = task.pop("annotations")[0]
        payload = {"action": "ANNOTATION_UPDATED", "annotation": annotation, "task": task,
                   "project": {"id": pid, "title": "webhook benchmark", "label_config": config}}
        size_kb = len(json.dumps(payload)) / 1024
        print(f"project {pid}: {len(exported)} annotated tasks; webhook payload {size_kb:.0f} KB")

        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            if mode not in ("in-process", "redis"):
                raise SystemExit(f"--modes: unknown mode {mode!r} (in-process, redis)")
            skip = ("MADSEG_", "REDIS_URL", "BASIC_AUTH")
            env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
            env.update({
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": ls.token,
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(doc_root),
                # the root may be /: the backend reads local images only from the folders named here
                "MADSEG_LOCAL_FILES_DIRS": str(shared / "data" / "voc_samples" / "images"),
                "MADSEG_TRAIN_PROJECTS": str(pid),  # only known projects queue fine-tunes
                "MADSEG_MODEL": "espnetv2",
                "MADSEG_CHECKPOINT": str(ckpt),
                "MADSEG_MODEL_DIR": str(tmp / f"models-{mode}"),
                "MADSEG_FINETUNE_OPTIONS": json.dumps({"epochs": args.epochs, "lr": 1e-4, "num_workers": 0}),
                "MADSEG_JOB_DELAY": str(JOB_DELAY_S),
                "MADSEG_BACKEND_HOST": "127.0.0.1",
                "MADSEG_BACKEND_PORT": str(free_port()),
                "PYTHONUNBUFFERED": "1",
            })
            if mode == "redis":
                env.update({"REDIS_URL": args.redis, "MADSEG_QUEUE": queue})
            run_mode(mode, env, tmp, pid, config, payload, args.requests)
        return 0
    finally:
        if ls is not None:
            ls.stop()
        try:
            from redis import Redis

            from ml_backend.jobs import purge_queue

            purge_queue(Redis.from_url(args.redis), queue)
        except Exception as exc:  # Redis down: nothing was left there
            print(f"(could not clean Redis queue {queue}: {type(exc).__name__})")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
