"""Where the fine-tune export (``ml_backend.labelstudio.export``) may read task images from.

The export turns finished Label Studio tasks into a labelled training folder; anyone who can import
tasks sets their data URLs and ``meta``. Each refusal below sits beside a positive control in the
same export: a local file inside the servable folders, a Label Studio upload URL, a listed host.
Label Studio is played by a small HTTP server on 127.0.0.1 (``tests/security_servers.py``) that
answers the project, export and upload requests and records every request, so a test can prove a
refused image was never fetched (no download fallback) and that credentials went only to it.
"""

from __future__ import annotations

import io
import json
import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ml_backend.backend_config import BackendConfig
from ml_backend.classes import VOC_CLASSES
from ml_backend.errors import MadsegError
from ml_backend.imageio import read_mask
from ml_backend.labelstudio import brush, configs
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.export import ExportImagePolicy, export_masks
from ml_backend.netguard import parse_host_rules
from tests.security_servers import Request, TestServer

PID = 7
TOKEN = "export-test-legacy-token"
CTL = configs.validate_segmentation_config(configs.segmentation_config(VOC_CLASSES))


def _png(w: int, h: int, value: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (value, 2 * value % 256, 40)).save(buf, "PNG")
    return buf.getvalue()


def _mask(w: int, h: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[: h // 2] = 8  # cat
    return m


class FakeLabelStudio:
    """Label Studio's project, export, upload and local-files endpoints on 127.0.0.1."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, Any]] = []
        self.uploads: dict[str, bytes] = {}
        self.server = TestServer({
            f"/api/projects/{PID}": self._project,
            f"/api/projects/{PID}/export": self._export,
            "/data/local-files/": self._local_files,
        })
        self.url = self.server.url

    def _project(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        body = {"id": PID, "title": "seg", "label_config": configs.segmentation_config(VOC_CLASSES)}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    def _export(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json"}, json.dumps(self.tasks).encode()

    def _local_files(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        return 404, {}, b""  # a refused path must never get here

    def upload(self, name: str, data: bytes) -> str:
        path = f"/data/upload/{PID}/{name}"
        self.uploads[path] = data
        self.server.routes[path] = lambda req: (200, {"Content-Type": "image/png"}, self.uploads[path])
        return path

    def add_task(self, tid: int, url: str, w: int, h: int, meta: dict[str, Any] | None = None) -> None:
        result = brush.class_map_results(_mask(w, h), VOC_CLASSES, CTL)
        self.tasks.append({
            "id": tid, "data": {configs.IMAGE_KEY: url, "image_id": f"img{tid}"},
            "meta": {"image_id": f"img{tid}", **(meta or {})},
            "annotations": [{"id": 100 + tid, "result": result, "was_cancelled": False,
                             "updated_at": "2026-01-01T00:00:00Z"}],
        })

    def image_requests(self) -> list[Request]:
        return [r for r in self.server.requests if r.path.startswith("/data/")]


@pytest.fixture()
def ls() -> Iterator[FakeLabelStudio]:
    fake = FakeLabelStudio()
    yield fake
    fake.server.close()


@pytest.fixture()
def other_host() -> Iterator[TestServer]:
    img = _png(5, 4, 200)
    srv = TestServer({"/img.png": lambda req: (200, {"Content-Type": "image/png"}, img)})
    yield srv
    srv.close()


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/pool (servable), root/gt (ground truth), root/labelled/masks (S(0) masks), outside/."""
    root = tmp_path / "root"
    files = {
        "pool_img": root / "pool" / "a" / "cat.png",
        "pool_img2": root / "pool" / "a" / "dog.png",
        "gt_mask": root / "gt" / "cat.png",
        "s0_mask": root / "labelled" / "masks" / "x.png",
        "other_root_img": root / "elsewhere" / "e.png",
        "outside_img": tmp_path / "outside" / "secret.png",
    }
    for i, p in enumerate(files.values()):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_png(6 + i, 4, 30 * i))
    (root / "labelled" / "images").mkdir()
    (root / "pool" / "a" / "link.png").symlink_to(files["outside_img"])
    return {"root": root, "pool": root / "pool", "gt": root / "gt", "labelled": root / "labelled",
            "tmp": tmp_path, **files}


def _client(ls: FakeLabelStudio) -> LabelStudioClient:
    return LabelStudioClient(ls.url, TOKEN, retries=0)


def _policy(tree: dict[str, Path], **caps: Any) -> ExportImagePolicy:
    return ExportImagePolicy.for_folders(tree["root"], [tree["pool"]],
                                         [tree["gt"], tree["labelled"] / "masks"], **caps)


def _d(path: Path, root: Path) -> str:
    return "/data/local-files/?d=" + path.relative_to(root).as_posix()


def _skipped(caplog: pytest.LogCaptureFixture) -> dict[int, str]:
    out = {}
    for r in caplog.records:
        msg = r.getMessage()
        if "image skipped" in msg:
            out[int(msg.split("task ")[1].split(":")[0])] = msg
    return out


# ----------------------------------------------------------------------------------------------
# local files
# ----------------------------------------------------------------------------------------------


def test_local_files_outside_root_or_servable_folders_are_refused_beside_one_inside(
    ls: FakeLabelStudio, tree: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tree["root"]
    ls.add_task(1, _d(tree["pool_img"], root), 6, 4)                              # positive control
    ls.add_task(2, "/data/local-files/?d=/etc/passwd", 6, 4)                      # absolute, outside
    ls.add_task(3, "/data/local-files/?d=../outside/secret.png", 6, 4)            # .. out of the root
    ls.add_task(4, f"/data/local-files/?d={tree['outside_img']}", 6, 4)            # absolute image, outside
    ls.add_task(5, "/data/local-files/?d=pool/a/link.png", 6, 4)                  # symlink leading out
    ls.add_task(6, _d(tree["other_root_img"], root), 6, 4)                        # in root, not servable
    ls.add_task(7, f"{ls.url}/data/local-files/?d=pool/a/../../../outside/secret.png", 6, 4)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ml_backend.labelstudio.export"):
        written = export_masks(_client(ls), PID, out, images=_policy(tree))
    assert written == {"img1": "img1"}
    assert (out / "images" / "img1.png").read_bytes() == tree["pool_img"].read_bytes()
    np.testing.assert_array_equal(read_mask(out / "masks" / "img1.png", 21), _mask(6, 4))
    assert sorted(p.name for p in (out / "images").iterdir()) == ["img1.png"]
    skipped = _skipped(caplog)
    assert sorted(skipped) == [2, 3, 4, 5, 6, 7]
    assert all(f"segmentation project {PID}, task" in m for m in skipped.values())
    assert "outside" in skipped[2] and "outside the folders the backend serves" in skipped[5]
    assert ls.image_requests() == []  # refused paths are not downloaded from Label Studio either


def test_ground_truth_folders_are_never_read_even_inside_the_root(
    ls: FakeLabelStudio, tree: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tree["root"]
    # a policy whose servable folder is the whole root: ground truth is still denied
    policy = ExportImagePolicy.for_folders(root, [], [tree["gt"], tree["labelled"] / "masks"])
    ls.add_task(1, _d(tree["pool_img"], root), 6, 4)
    ls.add_task(2, _d(tree["gt_mask"], root), 8, 4)
    ls.add_task(3, _d(tree["s0_mask"], root), 9, 4)
    ls.add_task(4, "/data/local-files/?d=pool/../gt/cat.png", 8, 4)
    with caplog.at_level(logging.WARNING, logger="ml_backend.labelstudio.export"):
        written = export_masks(_client(ls), PID, tmp_path / "out", images=policy)
    assert written == {"img1": "img1"}
    skipped = _skipped(caplog)
    assert sorted(skipped) == [2, 3, 4]
    assert all("never serves (ground truth" in m for m in skipped.values())
    assert ls.image_requests() == []


def test_meta_path_is_not_trusted_the_data_url_is_the_image(
    ls: FakeLabelStudio, tree: dict[str, Path], tmp_path: Path
) -> None:
    root = tree["root"]
    ls.add_task(1, _d(tree["pool_img"], root), 6, 4, meta={"path": str(tree["gt_mask"])})
    ls.add_task(2, _d(tree["pool_img2"], root), 7, 4, meta={"path": "/etc/passwd"})
    out = tmp_path / "out"
    written = export_masks(_client(ls), PID, out, images=_policy(tree))
    assert written == {"img1": "img1", "img2": "img2"}
    assert (out / "images" / "img1.png").read_bytes() == tree["pool_img"].read_bytes()
    assert (out / "images" / "img2.png").read_bytes() == tree["pool_img2"].read_bytes()


def test_every_image_refused_is_one_clear_error_and_no_finished_task_is_an_empty_export(
    ls: FakeLabelStudio, tree: dict[str, Path], tmp_path: Path
) -> None:
    assert export_masks(_client(ls), PID, tmp_path / "empty", images=_policy(tree)) == {}
    ls.add_task(1, _d(tree["gt_mask"], tree["root"]), 8, 4)
    ls.add_task(2, "/data/local-files/?d=/etc/passwd", 6, 4)
    with pytest.raises(MadsegError, match=rf"segmentation project {PID}: none of its 2 finished task\(s\).*"
                                          r"task 1: local file 'gt/cat.png'"):
        export_masks(_client(ls), PID, tmp_path / "out", images=_policy(tree))
    assert not (tmp_path / "out" / "images").exists()


# ----------------------------------------------------------------------------------------------
# URLs
# ----------------------------------------------------------------------------------------------


def test_upload_url_is_exported_with_credentials_only_to_label_studio_and_loopback_hosts_are_refused(
    ls: FakeLabelStudio, other_host: TestServer, tree: dict[str, Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = _png(6, 4, 77)
    ls.add_task(1, ls.upload("up.png", up), 6, 4)                                 # relative upload URL
    ls.add_task(2, ls.url + ls.upload("up2.png", _png(7, 4, 11)), 7, 4)            # absolute, LS origin
    ls.add_task(3, f"{other_host.url}/img.png", 5, 4)                              # loopback, not listed
    ls.add_task(4, f"http://localhost:{other_host.port}/img.png", 5, 4)            # a name, not listed
    ls.add_task(5, f"http://2130706433:{other_host.port}/img.png", 5, 4)           # decimal 127.0.0.1
    ls.add_task(6, "file:///etc/passwd", 5, 4)
    ls.add_task(7, "http://127.0.0.1:1/img\x00.png", 5, 4)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ml_backend.labelstudio.export"):
        written = export_masks(_client(ls), PID, out, images=_policy(tree))
    assert written == {"img1": "img1", "img2": "img2"}
    assert (out / "images" / "img1.png").read_bytes() == up
    assert other_host.requests == []
    assert sorted(_skipped(caplog)) == [3, 4, 5, 6, 7]
    assert "not Label Studio and not listed in MADSEG_IMAGE_HOSTS" in _skipped(caplog)[3]
    uploads = [r for r in ls.image_requests() if r.path.startswith("/data/upload/")]
    assert len(uploads) == 2 and all(r.headers.get("Authorization") == f"Token {TOKEN}" for r in uploads)


def test_listed_host_that_resolves_to_loopback_is_refused_a_listed_ip_is_allowed_without_credentials(
    ls: FakeLabelStudio, other_host: TestServer, tree: dict[str, Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ls.add_task(1, f"http://localhost:{other_host.port}/img.png", 5, 4)
    by_name = ExportImagePolicy(local=None, image_hosts=parse_host_rules(f"localhost:{other_host.port}"))
    with caplog.at_level(logging.WARNING, logger="ml_backend.labelstudio.export"), \
            pytest.raises(MadsegError, match="none of its 1 finished"):
        export_masks(_client(ls), PID, tmp_path / "a", images=by_name)
    assert "non-public address" in _skipped(caplog)[1]
    assert other_host.requests == []
    # positive control: an IP literal the operator listed is their explicit choice; no credentials go there
    ls.tasks.clear()
    ls.add_task(1, f"{other_host.url}/img.png", 5, 4)
    by_ip = ExportImagePolicy(local=None, image_hosts=parse_host_rules(f"127.0.0.1:{other_host.port}"))
    assert export_masks(_client(ls), PID, tmp_path / "b", images=by_ip) == {"img1": "img1"}
    assert len(other_host.requests) == 1
    assert not any(k.lower() in ("authorization", "x-api-key") for k in other_host.requests[0].headers)


def test_redirect_from_label_studio_to_an_unlisted_host_is_refused(
    ls: FakeLabelStudio, other_host: TestServer, tree: dict[str, Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    moved = {"Location": f"{other_host.url}/img.png"}
    ls.server.routes["/data/upload/7/moved.png"] = lambda req: (302, moved, b"")
    ls.add_task(1, ls.upload("ok.png", _png(6, 4)), 6, 4)
    ls.add_task(2, "/data/upload/7/moved.png", 5, 4)
    with caplog.at_level(logging.WARNING, logger="ml_backend.labelstudio.export"):
        written = export_masks(_client(ls), PID, tmp_path / "out", images=_policy(tree))
    assert written == {"img1": "img1"}
    assert "image URL refused" in _skipped(caplog)[2]
    assert other_host.requests == []


# ----------------------------------------------------------------------------------------------
# byte and pixel caps
# ----------------------------------------------------------------------------------------------


def test_byte_and_pixel_caps(ls: FakeLabelStudio, tree: dict[str, Path], tmp_path: Path,
                             caplog: pytest.LogCaptureFixture) -> None:
    big_pixels = _png(300, 200)                       # 60000 pixels, small file
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(noisy, "PNG")
    big_bytes = noisy.getvalue()                      # 3600 pixels, > 10 KB
    assert len(big_bytes) > 10_000
    (tree["pool"] / "a" / "huge.png").write_bytes(big_bytes)
    ls.add_task(1, ls.upload("ok.png", _png(6, 4)), 6, 4)                          # positive control
    ls.add_task(2, ls.upload("wide.png", big_pixels), 300, 200)
    ls.add_task(3, ls.upload("heavy.png", big_bytes), 60, 60)
    ls.add_task(4, "/data/local-files/?d=pool/a/huge.png", 60, 60)
    ls.add_task(5, _d(tree["pool_img"], tree["root"]), 6, 4)                       # positive control
    ls.add_task(6, ls.upload("text.png", b"not an image at all"), 6, 4)
    with caplog.at_level(logging.WARNING, logger="ml_backend.labelstudio.export"):
        written = export_masks(_client(ls), PID, tmp_path / "out",
                               images=_policy(tree, max_bytes=10_000, max_pixels=50_000))
    assert written == {"img1": "img1", "img5": "img5"}
    skipped = _skipped(caplog)
    assert sorted(skipped) == [2, 3, 4, 6]
    assert "over the limit of 50000 pixels" in skipped[2]
    assert "limit of 10000 bytes" in skipped[3] and "over the limit of 10000" in skipped[4]
    assert "not a readable image" in skipped[6]
    # the same images pass with caps above them (the caps, not the images, refused them)
    caplog.clear()
    written = export_masks(_client(ls), PID, tmp_path / "out2", images=_policy(tree))
    assert sorted(written) == ["img1", "img2", "img3", "img4", "img5"]


# ----------------------------------------------------------------------------------------------
# the callers: the fine-tune job (backend settings) and the round (experiment pool folders)
# ----------------------------------------------------------------------------------------------


def test_fine_tune_job_settings_carry_the_predict_policy(
    ls: FakeLabelStudio, tree: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ml_backend.jobs import export_training_data

    cfg = BackendConfig(target={"name": "espnetv2"}, model_dir=tmp_path / "models",
                        document_root=tree["root"], local_dirs=(tree["pool"],),
                        ground_truth_dirs=(tree["gt"],),
                        val_dir=tree["labelled"], image_hosts=parse_host_rules("images.example.org"),
                        max_image_bytes=5000, max_image_pixels=123_456)
    settings = json.loads(json.dumps(cfg.job_settings()))  # what an rq job carries
    policy = ExportImagePolicy.from_json(settings["images"])
    assert policy == ExportImagePolicy.from_backend_config(cfg)
    assert policy.local is not None and policy.local.servable == (tree["pool"].resolve(),)
    assert tree["labelled"].resolve() / "masks" in policy.local.denied and policy.max_pixels == 123_456
    assert [r.host for r in policy.image_hosts] == ["images.example.org"]

    monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    ls.server.routes["/api/current-user/whoami"] = lambda req: (200, {}, b'{"id": 1}')
    root = tree["root"]
    ls.add_task(1, _d(tree["pool_img"], root), 6, 4)
    ls.add_task(2, _d(tree["gt_mask"], root), 8, 4)
    ls.add_task(3, _d(tree["s0_mask"], root), 9, 4)
    ls.add_task(4, _d(tree["other_root_img"], root), 9, 4)
    out = tmp_path / "job" / "data"
    with caplog.at_level(logging.WARNING, logger="ml_backend.labelstudio.export"):
        assert export_training_data([PID], out, list(VOC_CLASSES), settings["images"]) == 1
    assert sorted(_skipped(caplog)) == [2, 3, 4]
    assert [p.name for p in (out / "images").iterdir()] == ["img1.png"]
    # a job without an image policy (settings from before it existed) reads nothing from disk:
    # local-files images go to Label Studio, which answers 404 here
    caplog.clear()
    with pytest.raises(MadsegError, match="none of its 4 finished"):
        export_training_data([PID], tmp_path / "job2", list(VOC_CLASSES), None)


def test_operator_export_with_a_document_root_of_slash_reads_nothing_from_disk(
    ls: FakeLabelStudio, tree: dict[str, Path], tmp_path: Path
) -> None:
    ls.server.routes["/data/local-files/"] = lambda req: (200, {}, tree["pool_img"].read_bytes())
    ls.add_task(1, f"/data/local-files/?d={tree['pool_img']}", 6, 4)
    assert ExportImagePolicy.for_document_root("/").local is None
    written = export_masks(_client(ls), PID, tmp_path / "out", document_root="/")
    assert written == {"img1": "img1"}
    (req,) = ls.image_requests()  # downloaded from Label Studio (its own local-files rules apply)
    assert req.path.startswith("/data/local-files/") and req.headers["Authorization"] == f"Token {TOKEN}"
    # positive control: a narrow root is read from disk, no request
    ls.server.requests.clear()
    ls.tasks.clear()
    ls.add_task(1, _d(tree["pool_img"], tree["root"]), 6, 4)
    assert export_masks(_client(ls), PID, tmp_path / "out2", document_root=tree["root"]) == {"img1": "img1"}
    assert ls.image_requests() == []


EXPERIMENT = """
[experiment]
name = "t"
dir = "runs/t"

[pool]
folders = ["root/pool"]

[target]
name = "espnetv2"
checkpoint = "ckpt/target.pth"

[[competitors]]
key = "comp"
name = "dicenet"
checkpoint = "ckpt/comp.pth"

[s0]
root = "root/labelled"

[t0]
root = "root/labelled"

[selection]
n3 = 2
n4 = 5

[oracle]
enabled = true
gt = ["root/gt"]
"""


def test_round_export_reads_only_the_experiment_pool_folders(
    ls: FakeLabelStudio, tree: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from projects.experiment import load_experiment
    from projects.rounds import RunOptions, Services

    (tmp_path / "ckpt").mkdir()
    for n in ("target.pth", "comp.pth"):
        (tmp_path / "ckpt" / n).write_bytes(b"x")
    exp_file = tmp_path / "experiment.toml"
    exp_file.write_text(textwrap.dedent(EXPERIMENT))
    exp = load_experiment(exp_file, check_paths=False)
    services = Services(exp, RunOptions(progress=False), tmp_path / "store", tmp_path / "models")
    policy = services.export_images()
    assert policy.local is not None and policy.local.servable == (tree["pool"].resolve(),)
    doc_root = exp.document_root()
    ls.add_task(1, _d(tree["pool_img"], doc_root), 6, 4)
    ls.add_task(2, _d(tree["gt_mask"], doc_root), 8, 4)
    ls.add_task(3, _d(tree["s0_mask"], doc_root), 9, 4)
    ls.add_task(4, _d(tree["outside_img"], doc_root), 10, 4)  # inside the document root, not the pool
    with caplog.at_level(logging.WARNING, logger="ml_backend.labelstudio.export"):
        written = export_masks(_client(ls), PID, tmp_path / "out", images=policy)
    assert written == {"img1": "img1"}
    assert sorted(_skipped(caplog)) == [2, 3, 4]
    assert ls.image_requests() == []
