"""`madseg score` interrupted by Ctrl-C and by kill -9, then re-run: it finishes only the rest."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_backend.shared import shared_dir
from sampler.score import score_pool

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MADSEG = str(Path(sys.executable).with_name("madseg"))
TARGET = "espnetv2,scale=0.5,input_size=256"
COMPETITOR = "espnetv2,scale=0.5,input_size=384"
N_IMAGES = 16


def _counts(store: Path) -> dict[str, int]:
    """Rows per model version in the areas table of every shard (0 if none yet)."""
    out: dict[str, int] = {}
    for shard in sorted((store / "shards").glob("shard-*.sqlite")):
        try:
            with sqlite3.connect(f"file:{shard}?mode=ro", uri=True, timeout=5) as conn:
                for v, n in conn.execute("SELECT model_version, COUNT(*) FROM areas GROUP BY model_version"):
                    out[v] = out.get(v, 0) + n
        except sqlite3.OperationalError:  # tables not created yet
            pass
    return out


def _start(pool: Path, store: Path) -> subprocess.Popen:
    cmd = [MADSEG, "score", str(pool), "--store", str(store), "--target", TARGET, "--competitor", COMPETITOR,
           "--batch-size", "2", "--workers", "1", "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_progress(proc: subprocess.Popen, store: Path, at_least: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = min(_counts(store).values(), default=0)
        if n >= at_least:
            return n
        if proc.poll() is not None:
            pytest.fail(f"madseg score ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("madseg score made no progress")


def test_interrupt_and_kill_then_rerun_finishes_only_the_rest(tmp_path):
    imgs = sorted((shared_dir() / "data" / "coco_voc" / "images").glob("*.jpg"))[:N_IMAGES]
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(map(str, imgs)) + "\n")
    store = tmp_path / "store"

    # 1) Ctrl-C (SIGINT to the whole process group, as a terminal does)
    proc = _start(pool, store)
    _wait_for_progress(proc, store, 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; re-run the same command to resume" in err
    assert "Traceback" not in err
    after_int = _counts(store)

    # 2) kill -9 mid-run (the main process and its data-loader workers)
    proc = _start(pool, store)
    _wait_for_progress(proc, store, max(after_int.values()) + 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    done = _counts(store)
    assert len(done) == 2 and len(set(done.values())) == 1, done  # a batch is all-or-nothing
    n_done = next(iter(done.values()))
    assert n_done < N_IMAGES, "the run finished before it could be killed; use more images"

    # 3) re-run: only the remaining images are scored, nothing is duplicated
    stats = score_pool([pool], TARGET, [COMPETITOR], store, batch_size=4, workers=1, progress=False)
    assert stats.hashed == 0  # the index survived both interruptions
    assert sorted(stats.inferred.values()) == [N_IMAGES - n_done] * 2
    assert stats.already_done == n_done and stats.distances == N_IMAGES - n_done
    final = _counts(store)
    assert sorted(final.values()) == [N_IMAGES, N_IMAGES]
    for shard in (store / "shards").glob("shard-*.sqlite"):
        with sqlite3.connect(shard) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT image_id) FROM distances").fetchone() == (
                N_IMAGES, N_IMAGES)
