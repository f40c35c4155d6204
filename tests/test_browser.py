"""A person's view: headless Chromium logs in to the real Label Studio through the login form,
opens a rating task and a segmentation task, and the screenshots show the photo, the overlay and
the pre-filled mask where they should be. Screenshots are kept under ``test-artifacts/``."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from ml_backend.classes import IGNORE_INDEX, voc_palette
from ml_backend.imageio import read_mask, read_rgb
from ml_backend.labelstudio.client import connect
from ml_backend.shared import REPO_ROOT, shared_dir
from projects import rating, round_projects, segmentation
from tests.chromium import Chromium, find_chromium

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

ARTIFACTS = REPO_ROOT / "test-artifacts"
IMAGE_STEM = "000000370208"  # 500x375, a bicycle covering a quarter of the photo
BICYCLE = 2  # VOC colour (0, 128, 0)


def _rects(br: Chromium, selector_js: str) -> list[dict]:
    return json.loads(br.evaluate(
        f"JSON.stringify(Array.from({selector_js}).map(e => {{ const r = e.getBoundingClientRect(); "
        "return {x: r.x, y: r.y, w: r.width, h: r.height, nw: e.naturalWidth || e.width}; }))"))


def _crop(shot: np.ndarray, r: dict, size: tuple[int, int]) -> np.ndarray:
    """Screenshot region ``r`` resampled to ``size`` (w, h)."""
    x0, y0 = int(round(r["x"])), int(round(r["y"]))
    x1, y1 = int(round(r["x"] + r["w"])), int(round(r["y"] + r["h"]))
    region = Image.fromarray(shot[y0:y1, x0:x1])
    return np.asarray(region.resize(size, Image.BILINEAR)).astype(np.float32)


def _login(br: Chromium, url: str, email: str, password: str) -> None:
    br.goto(url + "/user/login/")
    br.wait_for("!!document.querySelector('form input[name=email]')", 60)
    br.evaluate(
        "(() => { const f = document.querySelector('form');"
        f" f.querySelector('input[name=email]').value = {json.dumps(email)};"
        f" f.querySelector('input[name=password]').value = {json.dumps(password)};"
        " f.submit(); return true; })()"
    )
    br.wait_for("!location.pathname.startsWith('/user/login') && document.readyState === 'complete'", 60)


def _open_task(br: Chromium, url: str, project: int, task: int, n_images: int) -> None:
    br.goto(f"{url}/projects/{project}/data?task={task}")
    # The labelling view has loaded the task's images (blob URLs) at full size on screen.
    br.wait_for(
        "Array.from(document.images).filter(i => i.complete && i.naturalWidth === 500"
        f" && i.getBoundingClientRect().width > 200).length >= {n_images}", 120)
    time.sleep(2.0)  # let the canvas layers (brush regions) paint


def _shot(br: Chromium, name: str) -> np.ndarray:
    path = br.screenshot(ARTIFACTS / name)
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))


def test_rating_and_segmentation_tasks_render(ls_server, tmp_path):
    exe = find_chromium()
    assert exe, "headless Chromium is needed: apt-get install -y chromium (or set MADSEG_CHROMIUM)"
    data = shared_dir() / "data" / "coco_voc"
    photo_path = data / "images" / f"{IMAGE_STEM}.jpg"
    label_map = read_mask(data / "masks" / f"{IMAGE_STEM}.png", 21)
    label_map[label_map == IGNORE_INDEX] = 0
    assert (label_map == BICYCLE).mean() > 0.2
    client = connect(ls_server.url, ls_server.api_key)
    pids = round_projects.create_round_projects(client, "browser-test", 1, raters_per_task=1)
    cand = [{"id": "bike-1", "path": str(photo_path)}]
    overlays = tmp_path / "overlays"
    rated = rating.push_rating_tasks(client, pids.rating, cand, predictions=lambda _i: label_map,
                                     overlay_dir=overlays, document_root=ls_server.document_root,
                                     progress=False)
    seg = segmentation.push_segmentation_tasks(client, pids.segmentation, cand,
                                               predictions=lambda _i: label_map,
                                               model_version="target@browser",
                                               document_root=ls_server.document_root,
                                               progress=False)
    user = ls_server.user("browser-viewer")
    photo = read_rgb(photo_path).astype(np.float32)
    overlay = np.asarray(Image.open(overlays / "bike-1.png").convert("RGB")).astype(np.float32)
    obj = label_map == BICYCLE

    with Chromium(exe) as br:
        _login(br, ls_server.url, user.email, user.password)

        # Rating task: photo and overlay side by side, each drawn where its <img> is.
        _open_task(br, ls_server.url, pids.rating, rated.task_ids["bike-1"], n_images=2)
        shot = _shot(br, "browser-rating-task.png")
        shown = sorted((r for r in _rects(br, "document.images") if r["nw"] == 500 and r["w"] > 200),
                       key=lambda r: r["x"])
        assert len(shown) == 2, shown
        left, right = (_crop(shot, r, (500, 375)) for r in shown)
        assert np.abs(left - photo).mean() < 12, "the photo is not shown on the left"
        assert np.abs(right - overlay).mean() < 12, "the overlay is not shown on the right"
        # where the bicycle is, the right image carries its colour, the left does not
        colour = voc_palette()[BICYCLE].astype(np.float32)
        d_left = np.linalg.norm(left[obj] - colour, axis=1).mean()
        d_right = np.linalg.norm(right[obj] - colour, axis=1).mean()
        assert d_right < d_left - 20, (d_left, d_right)

        # Segmentation task: the prediction is pre-filled as brush regions over the photo.
        _open_task(br, ls_server.url, pids.segmentation, seg.task_ids["bike-1"], n_images=1)
        shot = _shot(br, "browser-segmentation-task.png")
        stages = [r for r in _rects(br, "document.querySelectorAll('canvas')") if r["w"] > 300]
        assert stages, "no labelling canvas on the page"
        stage = max(stages, key=lambda r: r["w"] * r["h"])
        view = _crop(shot, stage, (500, 375))
        # The image fills the stage; compare its pixels to the photo: the bicycle pixels moved towards
        # its colour, the background ones are darkened by the background label (black).
        d_photo = np.linalg.norm(photo[obj] - colour, axis=1).mean()
        d_view = np.linalg.norm(view[obj] - colour, axis=1).mean()
        assert d_view < d_photo - 15, (d_photo, d_view)
        bg = label_map == 0
        assert view[bg].mean() < photo[bg].mean() * 0.9
