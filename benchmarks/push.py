"""Benchmark: pushing tasks with brush pre-annotations into a real local Label Studio.

Starts Label Studio 1.23 on 127.0.0.1 (SQLite in a temp dir, the cached migrated template), creates
a segmentation project and pushes 2,000 tasks whose predictions are real masks from
``../shared/data/coco_voc`` (one brush result per class, validated before sending) with
``projects.segmentation.push_segmentation_tasks`` — bulk import, one request per batch. Prints tasks/s
(target >= 100) and checks a re-push adds nothing.

    python benchmarks/push.py [--tasks 2000] [--batch-size 250]

The webhook answer latency under a running fine-tune is measured by ``benchmarks/webhook.py``
(the ML backend's part).
"""

from __future__ import annotations

import argparse  # noqa: E402
import os
import sys
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from ml_backend.classes import IGNORE_INDEX  # noqa: E402
from ml_backend.imageio import read_mask  # noqa: E402
from ml_backend.labelstudio import configs  # noqa: E402
from ml_backend.labelstudio.client import connect  # noqa: E402
from ml_backend.shared import shared_dir  # noqa: E402
from projects import round_projects, segmentation  # noqa: E402
from projects.simulation.ls_local import start_local_label_studio  # noqa: E402

TARGET_TASKS_PER_S = 100.0


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: Label Studio 1.23 re-validates every imported prediction in Python, byte by byte of each RLE
#: (``label_studio_sdk.label_interface``), which dominates the import time. This feature flag (an
#: environment variable of the server) turns that off; madseg validates predictions before sending.
SERVER_VALIDATION_FLAG = "fflag_feat_utc_210_prediction_validation_15082025"


def bench_push(
    n_tasks: int = 2000, batch_size: int = 250, server_validation: bool = True
) -> dict[str, float]:
    """Push ``n_tasks`` pre-annotated tasks into a fresh local Label Studio; timings and rates."""
    data = shared_dir() / "data" / "coco_voc"
    images = sorted((data / "images").glob("*.jpg"))
    maps = {}
    for img in images:
        lm = read_mask(data / "masks" / f"{img.stem}.png", 21)
        maps[img.stem] = np.where(lm == IGNORE_INDEX, 0, lm).astype(np.uint8)
    cands = [{"id": f"bench-{k:05d}", "path": str(images[k % len(images)])} for k in range(n_tasks)]
    by_id = {c["id"]: maps[Path(c["path"]).stem] for c in cands}
    with tempfile.TemporaryDirectory(prefix="madseg-bench-ls-") as tmp:
        t0 = time.perf_counter()
        extra = None if server_validation else {SERVER_VALIDATION_FLAG: "false"}
        server = start_local_label_studio(Path(tmp) / "ls", document_root="/", extra_env=extra)
        start_s = time.perf_counter() - t0
        try:
            client = connect(server.url, server.api_key)
            pid = round_projects.ensure_project(client, "benchmark push", configs.segmentation_config())
            t0, cpu0, srv0 = time.perf_counter(), time.process_time(), process_cpu_s(server.process.pid)
            res = segmentation.push_segmentation_tasks(client, pid, cands, predictions=by_id.__getitem__,
                                                       model_version="bench@v1", document_root="/",
                                                       batch_size=batch_size, progress=False)
            push_s = time.perf_counter() - t0
            client_cpu = time.process_time() - cpu0
            server_cpu = process_cpu_s(server.process.pid) - srv0
            t0 = time.perf_counter()
            again = segmentation.push_segmentation_tasks(client, pid, cands, predictions=by_id.__getitem__,
                                                         model_version="bench@v1", document_root="/",
                                                         batch_size=batch_size, progress=False)
            repush_s = time.perf_counter() - t0
            regions = sum(len(np.unique(by_id[c["id"]])) for c in cands)
        finally:
            server.stop()
    if res.created != n_tasks or again.created != 0:
        raise SystemExit(f"push created {res.created} (want {n_tasks}), re-push {again.created} (want 0)")
    return {"tasks": n_tasks, "regions": regions, "server_start_s": start_s, "push_s": push_s,
            "tasks_per_s": n_tasks / push_s, "repush_s": repush_s, "client_cpu_s": client_cpu,
            "server_cpu_s": server_cpu, "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--server-validation", choices=["on", "off"], default="on",
                    help=f"Label Studio's own prediction validation ({SERVER_VALIDATION_FLAG})")
    args = ap.parse_args(argv)
    r = bench_push(args.tasks, args.batch_size, args.server_validation == "on")
    print(f"push (server-side prediction validation {args.server_validation}): {r['tasks']} tasks "
          f"({r['regions']} brush regions) in {r['push_s']:.1f} s = {r['tasks_per_s']:.0f} tasks/s "
          f"(target >= {TARGET_TASKS_PER_S:.0f}); re-push (idempotent, 0 new) {r['repush_s']:.1f} s; "
          f"server start {r['server_start_s']:.1f} s")
    per_task_ms = r["server_cpu_s"] / r["tasks"] * 1e3
    print(f"CPU: Label Studio {r['server_cpu_s']:.1f} s ({per_task_ms:.1f} ms/task), "
          f"madseg client {r['client_cpu_s']:.1f} s (built in parallel with the imports); load average "
          f"{r['load']:.1f} on {os.cpu_count()} cores; with a free core each, the server alone allows "
          f"~{r['tasks'] / r['server_cpu_s']:.0f} tasks/s")
    return 0 if r["tasks_per_s"] >= TARGET_TASKS_PER_S else 1


if __name__ == "__main__":
    sys.exit(main())
