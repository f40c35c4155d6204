"""Unit tests of the score store: shards, merge, transactions, paging, label-map PNGs."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.errors import MadsegError
from sampler import store as S
from sampler.store import ScoreStore, decode_label_png, encode_label_png, merge_shards


def _areas(c: int, k: int) -> bytes:
    a = np.zeros(c, np.float32)
    a[k % c] = 1.0
    return a.tobytes()


def _fill(st: ScoreStore, ids: list[str], run: str, t: float = 1.0) -> None:
    with st.transaction() as conn:
        st.put_files(conn, [(f"/pool/{i}.jpg", 10, 1, i, None, run, t) for i in ids])
        conn.executemany("INSERT OR IGNORE INTO images VALUES(?,?,?,?)", [(i, 4, 5, "RGB") for i in ids])
        conn.executemany("INSERT OR IGNORE INTO areas VALUES(?,?,?,?)",
                         [("T", i, _areas(3, n), 0.1 * n) for n, i in enumerate(ids)])
        maps = [(i, "T", encode_label_png(np.full((2, 3), n % 3, np.uint8))) for n, i in enumerate(ids)]
        conn.executemany("INSERT OR IGNORE INTO maps VALUES(?,?,?)", maps)
        conn.executemany("INSERT OR IGNORE INTO distances VALUES(?,?,?,?,?)",
                         [("T", "C", i, 0.5, 0.25) for i in ids])


def _ids(n: int, prefix: str) -> list[str]:
    return [f"{prefix}{k:031x}" for k in range(n)]


def test_label_png_round_trip():
    m = np.random.default_rng(0).integers(0, 21, size=(37, 53)).astype(np.uint8)
    m[0, 0] = 255
    assert np.array_equal(decode_label_png(encode_label_png(m)), m)


def test_reads_cover_all_shards_and_merge_keeps_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "PAGE_SIZE", 3)  # exercise keyset paging
    root = tmp_path / "store"
    a, b = _ids(7, "a"), _ids(5, "b")
    with ScoreStore(root, writer_rank=0) as s0, ScoreStore(root, writer_rank=1) as s1:
        s0.ensure_meta(None, 3, ["bg", "x", "y"], (2, 3))
        _fill(s0, a + b[:2], "r1")
        _fill(s1, b, "r1")  # b[:2] present in both shards
        assert len(s0.shard_paths()) == 2
        ids, areas, ent = s0.read_areas("T")
        assert ids.tolist() == sorted(a + b)
        assert areas.shape == (12, 3)
        assert [i for i, _ in s0.iter_run_ids("r1")] == sorted(a + b)
        assert s0.count_run_entries("r1") == 12  # b[:2]'s paths are in both shards, counted once
        assert [p for _, p in s0.iter_run_paths("r1")] == [f"/pool/{i}.jpg" for i in sorted(a + b)]
        assert s0.done_models(b[4]) == {"T"}
        assert s0.has_distance("T", "C", b[4]) and not s0.has_distance("T", "X", b[4])
    merged = merge_shards(root)
    assert merged.name == "shard-00000.sqlite"
    rs = S.open_store(root)
    assert len(rs.shard_paths()) == 1
    ids, d = rs.read_distances("T", "C", "pixel_accuracy")
    assert ids.tolist() == sorted(a + b) and set(d.tolist()) == {0.25}
    assert [im.image_id for im in rs.iter_images()] == sorted(a + b)
    assert rs.read_label_map("T", a[1]).tolist() == [[1, 1, 1], [1, 1, 1]]
    assert S.read_label_map(root, "T", a[2], size=(4, 6)).tolist() == [[2] * 6] * 4
    assert S.image_paths(root, [a[0], "f" * 32]) == [f"/pool/{a[0]}.jpg", None]
    rs.close()


def test_merge_keeps_most_recent_file_row(tmp_path):
    root = tmp_path / "s"
    with ScoreStore(root, writer_rank=0) as s0, ScoreStore(root, writer_rank=3) as s3:
        with s0.transaction() as c:
            s0.put_files(c, [("/p.jpg", 1, 1, "old", None, "r1", 1.0)])
        with s3.transaction() as c:
            s3.put_files(c, [("/p.jpg", 2, 2, "new", None, "r2", 2.0)])
        assert s0.lookup_file("/p.jpg").image_id == "new"
    merge_shards(root)
    with S.open_store(root) as rs:
        assert rs.lookup_file("/p.jpg").image_id == "new"


def test_failed_transaction_writes_nothing(tmp_path):
    st = ScoreStore(tmp_path / "s", writer_rank=0)
    with pytest.raises(RuntimeError), st.transaction() as conn:
        st.put_files(conn, [("/x.jpg", 1, 1, "i", None, "r", 1.0)])
        raise RuntimeError("killed mid-batch")
    assert st.lookup_file("/x.jpg") is None
    st.close()


def test_meta_mismatch_and_missing_store_are_clear_errors(tmp_path):
    st = ScoreStore(tmp_path / "s", writer_rank=0)
    st.ensure_meta(None, 21, [str(i) for i in range(21)], (256, 256))
    assert st.read_meta().resolution == (256, 256)
    with pytest.raises(MadsegError, match="256x256"):
        st.ensure_meta((128, 128), 21, [], (384, 384))
    with pytest.raises(MadsegError, match="classes"):
        st.ensure_meta(None, 19, [], (384, 384))
    with pytest.raises(MadsegError, match="no label map"):
        st.read_label_map("T", "0" * 32)
    st.close()
    with pytest.raises(MadsegError, match="not a score store"):
        S.open_store(tmp_path / "nothing")
