"""`torchrun --nproc-per-node 2 madseg score` (gloo, CPU) gives the same store content and the same
MAD selection as a single process; every image is scored by exactly one rank."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ml_backend.shared import shared_dir
from sampler import candidates as cand
from sampler import store as S

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARGS = ["--target", "espnetv2,scale=0.5,input_size=256", "--competitor", "espnetv2,scale=0.5,input_size=384",
        "--competitor", "espnetv2,scale=1.0,input_size=256", "--batch-size", "1", "--workers", "1",
        "--no-progress", "--json"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _json_of(out: str) -> dict:
    return json.loads(out[out.index("{"):])


def _run(cmd: list[str]) -> dict:
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return _json_of(res.stdout)


def _rank_logs(log_dir: Path) -> dict[str, str]:
    """``attempt_N/<rank>/std{out,err}.log`` -> text, for every rank torchrun started."""
    return {str(p.relative_to(log_dir)): p.read_text(errors="replace")
            for p in sorted(log_dir.rglob("std*.log"))}


def _run_torchrun(nproc: int, args: list[str], log_dir: Path) -> dict:
    """torchrun with every rank's stdout and stderr in its own file under ``log_dir``; a failure
    shows all of them (a rank that dies first is the cause, the others only see a closed peer)."""
    # --standalone: the rendezvous store binds a free port itself (no pick-then-bind race)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc),
           "--log-dir", str(log_dir), "--redirects", "3", str(BIN / "madseg"), *args]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    logs = _rank_logs(log_dir)
    if res.returncode != 0:
        parts = [f"torchrun exit {res.returncode}; its stderr:\n{res.stderr[-2000:]}"]
        parts += [f"--- {name}:\n{text[-3000:]}" for name, text in logs.items()]
        pytest.fail("\n".join(parts))
    assert sum(name.endswith("stderr.log") for name in logs) == nproc, list(logs)
    rank0 = [text for name, text in logs.items() if name.endswith("/0/stdout.log")]
    assert len(rank0) == 1, list(logs)
    return _json_of(rank0[0])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_torchrun_equals_single_process(tmp_path):
    imgs = sorted((shared_dir() / "data" / "coco_voc" / "images").glob("*.jpg"))[20:29]
    dup = tmp_path / "dup.jpg"
    shutil.copyfile(imgs[0], dup)
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(map(str, [*imgs, dup])) + "\n")

    single = _run([str(BIN / "madseg"), "score", str(pool), "--store", str(tmp_path / "single"), *ARGS])
    multi = _run_torchrun(2, ["score", str(pool), "--store", str(tmp_path / "multi"), *ARGS],
                          tmp_path / "torchrun-logs")

    for stats in (single, multi):
        assert stats["images"] == 9 and stats["duplicates"] == 1 and stats["paths"] == 10
        assert sorted(stats["inferred"].values()) == [9, 9, 9]  # each image once, over both ranks
        assert stats["distances"] == 18
    assert single["rank_images"] == [9]
    assert len(multi["rank_images"]) == 2 and min(multi["rank_images"]) > 0  # both ranks did a share
    # the ranks' shards were merged into one
    assert [p.name for p in (tmp_path / "multi" / "shards").glob("shard-*.sqlite")] == ["shard-00000.sqlite"]

    tv = single["target_version"]
    for v in [tv, *single["competitor_versions"]]:
        a_ids, a, ae = S.read_areas(tmp_path / "single", v)
        b_ids, b, be = S.read_areas(tmp_path / "multi", v)
        assert a_ids.tolist() == b_ids.tolist()
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(ae, be, rtol=1e-6)
    bounds = cand.bounds_from_folder(shared_dir() / "data" / "voc_samples", 21, min_count=2)
    sel_single = cand.select_candidates(tmp_path / "single", bounds=bounds, n3=3)
    sel_multi = cand.select_candidates(tmp_path / "multi", bounds=bounds, n3=3)
    assert sel_single and sel_single == sel_multi


def test_a_shard_being_created_is_never_seen_half_made(tmp_path, monkeypatch):
    """The cause of a rare failure of the torchrun test: rank 0 read all shards (``lookup_file``)
    while rank 1 was still creating its own, found the file without tables, died with "no such
    table: files", and rank 1 then saw "Connection closed by peer". Here rank 1's creation is held
    inside ``sqlite3.connect`` while this thread reads: the reader must not fail."""
    real_connect = sqlite3.connect
    inside, release = threading.Event(), threading.Event()

    def slow_connect(path, *args, **kwargs):
        conn = real_connect(path, *args, **kwargs)
        if "shard-00001" in str(path) and not inside.is_set():
            inside.set()
            release.wait(30)
        return conn

    root = tmp_path / "store"
    reader = S.ScoreStore(root, writer_rank=0)
    with reader.transaction() as conn:
        S.ScoreStore.put_files(conn, [("/pool/a.jpg", 1, 1, "a" * 32, None, "run", 1.0)])
    monkeypatch.setattr(S.sqlite3, "connect", slow_connect)
    other = S.ScoreStore(root, writer_rank=1)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            other.writer  # noqa: B018  (creates shard-00001)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    th = threading.Thread(target=create)
    th.start()
    try:
        assert inside.wait(30)
        reader.close()  # forget cached connections: list the shards afresh, as a new phase does
        assert reader.lookup_file("/pool/a.jpg").image_id == "a" * 32
        assert reader.lookup_file("/pool/missing.jpg") is None
    finally:
        release.set()
        th.join(30)
    assert not errors
    # positive control: once created, the new shard is read like any other
    with other.transaction() as conn:
        S.ScoreStore.put_files(conn, [("/pool/b.jpg", 2, 2, "b" * 32, None, "run", 2.0)])
    reader.close()
    assert reader.lookup_file("/pool/b.jpg").image_id == "b" * 32
    other.close()
    reader.close()
