"""Pure parts of the backend's limits: pixel caps from the header (ml_backend.image_limits), the
known-projects rule for webhooks (ml_backend.known_projects), deadlines and the concurrency gate
(ml_backend.limits). Each refusal beside a positive control."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.errors import ImageReadError
from ml_backend.image_limits import decode_capped, fit_within, header_size
from ml_backend.known_projects import KnownProjects, experiment_segmentation_projects
from ml_backend.limits import Busy, ConcurrencyGate, Deadline, DeadlineExceeded


def png_bomb(width: int, height: int) -> bytes:
    """A real, complete grayscale PNG of ``width`` x ``height`` zero pixels (compresses ~1000:1)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# -- pixel caps ----------------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_from_its_header_in_milliseconds() -> None:
    bomb = png_bomb(13000, 13000)
    assert len(bomb) < 400_000
    assert header_size(bomb, "bomb") == (13000, 13000)
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match="MADSEG_MAX_IMAGE_PIXELS"):
        decode_capped(bomb, "task 1", max_pixels=40_000_000, predict_pixels=16_000_000)
    assert time.perf_counter() - t0 < 0.5


def test_small_image_decodes_in_full_positive_control() -> None:
    img = decode_capped(_jpeg(64, 48), "t", max_pixels=10_000, predict_pixels=5_000)
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8


def test_large_image_is_downscaled_to_the_prediction_cap() -> None:
    img = decode_capped(_jpeg(1200, 800), "t", max_pixels=2_000_000, predict_pixels=100_000)
    h, w = img.shape[:2]
    assert h * w <= 100_000 and abs(w / h - 1.5) < 0.02 and h * w > 90_000
    png = png_bomb(1000, 500)  # not JPEG: no draft, plain resize
    img = decode_capped(png, "t", max_pixels=2_000_000, predict_pixels=50_000)
    assert img.shape[0] * img.shape[1] <= 50_000 and img.shape[2] == 3


def test_fit_within() -> None:
    assert fit_within(100, 50, 10_000) == (100, 50)
    w, h = fit_within(13000, 13000, 16_000_000)
    assert w * h <= 16_000_000 and w == h
    assert fit_within(10, 1, 3)[0] * fit_within(10, 1, 3)[1] <= 3


def test_garbage_is_a_clear_error() -> None:
    with pytest.raises(ImageReadError, match="not a readable image"):
        decode_capped(b"<html>", "task 9", max_pixels=100, predict_pixels=100)


# -- known projects --------------------------------------------------------------------------------


def _state(exp: Path, i: int, seg: object, status: str = "done") -> None:
    p = exp / f"round-{i}" / "state.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"version": 1, "round": i, "stages": {
        "projects": {"status": status, "outputs": {"rating": 100 + i, "segmentation": seg}}}}))


def test_known_projects_sources(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    _state(exp, 1, 11)
    _state(exp, 2, 12, status="running")
    _state(exp, 3, "x")
    (exp / "round-4").mkdir()
    (exp / "round-4" / "state.json").write_text("{broken")
    kp = KnownProjects(tmp_path / "models", configured=[3], experiment_dir=exp)
    assert kp.why(3) == "MADSEG_TRAIN_PROJECTS"
    assert kp.why(11) == "experiment"
    assert kp.why(12) is None and kp.why(101) is None  # unfinished stage; a rating project
    assert kp.why(99) is None
    _state(exp, 5, 15)  # a new round: known at once
    assert kp.why(15) == "experiment"
    assert kp.register(99) and not kp.register(99)
    assert kp.why(99) == "setup"
    # another process (or a restart) sees the registration
    assert KnownProjects(tmp_path / "models").why(99) == "setup"
    assert kp.all() == [3, 11, 15, 99]
    assert experiment_segmentation_projects(exp) == {11, 15}


def test_unreadable_registry_knows_nothing_but_does_not_fail(tmp_path: Path) -> None:
    (tmp_path / "known_projects.json").write_text("not json")
    kp = KnownProjects(tmp_path, configured=[1])
    assert kp.why(1) == "MADSEG_TRAIN_PROJECTS" and kp.why(2) is None


# -- deadline and gate ---------------------------------------------------------------------------


def test_deadline() -> None:
    d = Deadline(0.2)
    d.check("fetch")  # not yet
    assert 0 < d.remaining() <= 0.2
    time.sleep(0.25)
    assert d.expired and d.remaining() == 0
    with pytest.raises(DeadlineExceeded, match="task 4"):
        d.check("task 4")


def test_gate_refuses_instead_of_queueing() -> None:
    gate = ConcurrencyGate(2)
    with gate.enter("a"), gate.enter("b"), pytest.raises(Busy, match="2 request"), gate.enter("c"):
        pass
    with gate.enter("d"):  # slots released
        pass
