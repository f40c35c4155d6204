"""`torchrun --nproc-per-node 2 madseg score` (gloo, CPU) gives the same store content and the same
MAD selection as a single process; every image is scored by exactly one rank."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml_backend.shared import shared_dir
from sampler import candidates as cand
from sampler import store as S

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARGS = ["--target", "espnetv2,scale=0.5,input_size=256", "--competitor", "espnetv2,scale=0.5,input_size=384",
        "--competitor", "espnetv2,scale=1.0,input_size=256", "--batch-size", "1", "--workers", "1",
        "--no-progress", "--json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    return json.loads(out[out.index("{"):])


def test_two_process_torchrun_equals_single_process(tmp_path):
    imgs = sorted((shared_dir() / "data" / "coco_voc" / "images").glob("*.jpg"))[20:29]
    dup = tmp_path / "dup.jpg"
    shutil.copyfile(imgs[0], dup)
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(map(str, [*imgs, dup])) + "\n")

    single = _run([str(BIN / "madseg"), "score", str(pool), "--store", str(tmp_path / "single"), *ARGS])
    multi = _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(_free_port()),
                  str(BIN / "madseg"), "score", str(pool), "--store", str(tmp_path / "multi"), *ARGS])

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
