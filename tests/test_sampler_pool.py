"""Pool scanning: sources (folders, list files, URLs), content ids, and every bad-image kind."""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.errors import ImageReadError, MadsegError
from sampler.pool import (
    SkippedEntry,
    check_sources,
    content_id,
    count_pool_entries,
    decode_image,
    iter_pool_entries,
    read_source,
    stat_source,
)

REPO = Path(__file__).resolve().parents[1]


def _rgb(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _bomb_png() -> bytes:
    """A tiny PNG whose header claims 60000 x 60000 pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + \
        chunk(b"IEND", b"")


def make_pool(folder: Path) -> dict[str, Path]:
    """Good images (jpg/png/webp/bmp, nested), odd modes that must be converted, bad files, and a
    duplicate. Returns name -> path."""
    f: dict[str, Path] = {}
    f["rgb_jpg"] = _save(Image.fromarray(_rgb(1)), folder / "a" / "rgb.jpg", quality=90)
    f["rgb_webp"] = _save(Image.fromarray(_rgb(2)), folder / "a" / "deep" / "rgb.webp")
    f["rgb_bmp"] = _save(Image.fromarray(_rgb(3)), folder / "rgb.BMP")
    f["cmyk"] = _save(Image.fromarray(_rgb(4)).convert("CMYK"), folder / "cmyk.jpg")
    f["gray"] = _save(Image.fromarray(_rgb(5)).convert("L"), folder / "gray.jpg")
    f["palette"] = _save(Image.fromarray(_rgb(6)).convert("P"), folder / "palette.png")
    rgba = Image.fromarray(_rgb(7)).convert("RGBA")
    rgba.putalpha(128)
    f["alpha"] = _save(rgba, folder / "alpha.png")
    sixteen = (np.random.default_rng(8).integers(0, 65535, size=(40, 56))).astype(np.uint16)
    f["16bit"] = _save(Image.fromarray(sixteen), folder / "sixteen.png")
    f["duplicate"] = folder / "b" / "copy_of_rgb.jpg"
    f["duplicate"].parent.mkdir(parents=True, exist_ok=True)
    f["duplicate"].write_bytes(f["rgb_jpg"].read_bytes())
    # bad ones
    good = io.BytesIO()
    Image.fromarray(_rgb(9, 200, 200)).save(good, format="JPEG", quality=95)
    f["truncated"] = folder / "truncated.jpg"
    f["truncated"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    f["corrupt"] = folder / "corrupt.png"
    f["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(10).integers(0, 255, 300,
                                                                                            dtype=np.uint8)))
    f["zero"] = folder / "zero.png"
    f["zero"].write_bytes(b"")
    f["text"] = folder / "notes.jpg"
    f["text"].write_text("this is not an image\n")
    f["bomb"] = folder / "bomb.png"
    f["bomb"].write_bytes(_bomb_png())
    (folder / "readme.txt").write_text("ignored: not an image suffix inside a folder\n")
    return f


GOOD = ("rgb_jpg", "rgb_webp", "rgb_bmp")
CONVERTED = {"cmyk": "CMYK", "gray": "L", "palette": "P", "alpha": "RGBA", "16bit": "I;16"}
BAD = ("truncated", "corrupt", "text", "bomb")


def test_folder_is_walked_recursively_in_sorted_order(tmp_path):
    files = make_pool(tmp_path / "pool")
    entries = list(iter_pool_entries([tmp_path / "pool"]))
    root = tmp_path / "pool"
    top = sorted(["alpha.png", "bomb.png", "cmyk.jpg", "corrupt.png", "gray.jpg", "notes.jpg", "palette.png",
                  "rgb.BMP", "sixteen.png", "truncated.jpg", "zero.png"])
    nested = [root / "a" / "rgb.jpg", root / "a" / "deep" / "rgb.webp", root / "b" / "copy_of_rgb.jpg"]
    expected = [str(root / n) for n in top] + [str(p) for p in nested]
    assert entries == expected  # files of a folder (sorted), then its sub-folders depth-first, sorted
    assert set(entries) == {str(p) for p in files.values()}
    assert count_pool_entries([tmp_path / "pool"]) == len(files)


def test_list_files_txt_and_csv(tmp_path):
    files = make_pool(tmp_path / "pool")
    (tmp_path / "list.txt").write_text(
        "# comment\n\npool/a/rgb.jpg\n" + str(files["gray"]) + "\npool/b\nhttps://example.org/x.jpg\n"
    )
    got = list(iter_pool_entries([tmp_path / "list.txt"]))
    assert got == [str(files["rgb_jpg"]), str(files["gray"]), str(files["duplicate"]), "https://example.org/x.jpg"]
    (tmp_path / "list.csv").write_text("id,path\n1,pool/cmyk.jpg\n2,pool/alpha.png\n")
    assert list(iter_pool_entries([tmp_path / "list.csv"])) == [str(files["cmyk"]), str(files["alpha"])]
    (tmp_path / "plain.csv").write_text("pool/cmyk.jpg,x\n")
    assert list(iter_pool_entries([tmp_path / "plain.csv"])) == [str(files["cmyk"])]


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(MadsegError, match="does not exist"):
        check_sources([tmp_path / "missing"])
    (tmp_path / "doc.pdf").write_bytes(b"%PDF")
    with pytest.raises(MadsegError, match="neither a folder"):
        check_sources([tmp_path / "doc.pdf"])
    with pytest.raises(MadsegError, match="no pool"):
        check_sources([])


def test_content_ids_are_stable_and_content_based(tmp_path):
    files = make_pool(tmp_path / "pool")
    a = content_id(files["rgb_jpg"].read_bytes())
    assert a == content_id(files["duplicate"].read_bytes())
    assert len(a) == 32 and a != content_id(files["gray"].read_bytes())


@pytest.mark.parametrize("kind", list(CONVERTED))
def test_odd_modes_are_converted_to_rgb(tmp_path, kind):
    files = make_pool(tmp_path / "pool")
    rgb, mode = decode_image(files[kind].read_bytes(), str(files[kind]))
    assert rgb.dtype == np.uint8 and rgb.shape == (40, 56, 3)
    assert mode == CONVERTED[kind]


@pytest.mark.parametrize("kind", [*BAD, "zero"])
def test_bad_files_raise_image_read_error_naming_the_file(tmp_path, kind):
    files = make_pool(tmp_path / "pool")
    with pytest.raises(ImageReadError) as exc:
        decode_image(files[kind].read_bytes(), str(files[kind]))
    assert str(files[kind]) in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.fixture()
def http_root(tmp_path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server (127.0.0.1 only) serving a temporary folder."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", root
    finally:
        srv.shutdown()
        srv.server_close()


def test_read_source_from_url(http_root):
    base, root = http_root
    data = b"\x89PNGfake"
    (root / "x.png").write_bytes(data)
    assert read_source(f"{base}/x.png") == data
    with pytest.raises(ImageReadError, match="HTTP 404"):
        read_source(f"{base}/missing.png")
    with pytest.raises(ImageReadError, match="download failed"):
        read_source("http://127.0.0.1:9/nothing.png", timeout=2)


# ------------------------------------------------------------------ loops and unreadable entries
def _problem_tree(tmp: Path) -> dict[str, Path]:
    """A pool with good images, a symlinked folder that is not a loop (followed), two symlink loops,
    a broken symlink and a FIFO named like an image. Returns name -> path."""
    root = tmp / "pool"
    f = {"root": root}
    f["a"] = _save(Image.fromarray(_rgb(21)), root / "a.jpg")
    f["b"] = _save(Image.fromarray(_rgb(22)), root / "sub" / "b.png")
    f["c"] = _save(Image.fromarray(_rgb(23)), tmp / "outside" / "c.jpg")
    f["link"] = root / "linked"
    f["link"].symlink_to(tmp / "outside", target_is_directory=True)  # not a loop: followed
    f["back"] = root / "sub" / "back"
    f["back"].symlink_to("..", target_is_directory=True)  # loop: leads back to the pool folder
    f["self"] = root / "self"
    f["self"].symlink_to("self")  # ELOOP on every stat
    f["dangling"] = root / "dangling.jpg"
    f["dangling"].symlink_to(tmp / "gone.jpg")
    f["fifo"] = root / "pipe.jpg"
    os.mkfifo(f["fifo"])
    return f


def test_symlink_loops_are_reported_and_skipped_and_the_walk_continues(tmp_path, caplog):
    f = _problem_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sampler.pool"):
        entries = list(iter_pool_entries([f["root"]]))
    good = [e for e in entries if not isinstance(e, SkippedEntry)]
    skipped = {e: e.reason for e in entries if isinstance(e, SkippedEntry)}
    # positive control: every real image is found, also through the symlinked folder that is no loop
    assert good == [str(f["a"]), str(f["link"] / "c.jpg"), str(f["b"])]
    assert set(skipped) == {str(f[k]) for k in ("back", "self", "dangling", "fifo")}
    assert "symlink loop" in skipped[str(f["back"])] and str(f["root"]) in skipped[str(f["back"])]
    assert "symlink loop" in skipped[str(f["self"])]
    assert "broken symlink" in skipped[str(f["dangling"])]
    assert "FIFO" in skipped[str(f["fifo"])]
    for path in skipped:  # one log line naming each skipped path
        assert sum(path in r.getMessage() for r in caplog.records) == 1
    # the scorer sees them as unreadable entries with the reason
    for path, reason in skipped.items():
        with pytest.raises(ImageReadError) as exc:
            stat_source(path)
        assert str(exc.value) == f"{path}: {reason}"
    assert count_pool_entries([f["root"]]) == 7


@pytest.mark.timeout(60)
def test_a_fifo_or_folder_given_as_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for entry in (str(fifo), str(tmp_path)):
        with pytest.raises(ImageReadError, match="not an image file"):
            read_source(entry)  # a plain open() of a FIFO would wait for a writer forever
        with pytest.raises(ImageReadError, match="not an image file"):
            stat_source(entry)
    good = _save(Image.fromarray(_rgb(24)), tmp_path / "good.png")  # positive control
    assert read_source(str(good)) == good.read_bytes() and stat_source(str(good))[0] == good.stat().st_size


def test_a_folder_that_cannot_be_listed_is_reported_and_skipped(tmp_path, monkeypatch, caplog):
    """We run as root, which ignores permissions: a PermissionError from scandir is injected for one
    folder (the real chmod-000 case runs unprivileged in the next test)."""
    f = _problem_tree(tmp_path)
    locked = f["root"] / "locked"
    _save(Image.fromarray(_rgb(25)), locked / "hidden.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if os.path.abspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr("sampler.pool.os.scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="sampler.pool"):
        entries = list(iter_pool_entries([f["root"]]))
    skipped = {e: e.reason for e in entries if isinstance(e, SkippedEntry)}
    assert skipped[str(locked)] == "cannot list folder (Permission denied)"
    assert any(str(locked) in r.getMessage() for r in caplog.records)
    # the rest of the pool is still walked, before and after the locked folder
    assert [e for e in entries if not isinstance(e, SkippedEntry)] == [
        str(f["a"]), str(f["link"] / "c.jpg"), str(f["b"])]
    monkeypatch.setattr("sampler.pool.os.scandir", real_scandir)  # positive control
    assert str(locked / "hidden.jpg") in list(iter_pool_entries([f["root"]]))


_WALK = ("import json, sys; from sampler.pool import SkippedEntry, iter_pool_entries; "
         "print(json.dumps([[e, getattr(e, 'reason', None)] for e in iter_pool_entries([sys.argv[1]])]))")


def test_a_chmod_000_folder_is_reported_and_skipped_for_an_unprivileged_user():
    """A real permission error: the walk runs as user nobody when we are root (root reads anything)."""
    base = Path(tempfile.mkdtemp(prefix="madseg-perm-"))
    try:
        base.chmod(0o755)
        root = base / "pool"
        a = _save(Image.fromarray(_rgb(26)), root / "a.jpg")
        z = _save(Image.fromarray(_rgb(27)), root / "z" / "z.jpg")
        locked = root / "locked"
        _save(Image.fromarray(_rgb(28)), locked / "hidden.jpg")
        for p in (root, root / "z"):
            p.chmod(0o755)
        cmd = [sys.executable, "-c", _WALK, str(root)]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.fail("setpriv (util-linux) is needed to run the walk unprivileged")
            cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]

        def walk() -> tuple[list[list], str]:
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, res.stderr
            return json.loads(res.stdout), res.stderr

        locked.chmod(0o755)  # positive control: readable, walked
        entries, err = walk()
        assert entries == [[str(a), None], [str(locked / "hidden.jpg"), None], [str(z), None]]
        assert "skipped" not in err
        locked.chmod(0o000)
        entries, err = walk()
        assert entries == [[str(a), None], [str(locked), "cannot list folder (Permission denied)"],
                           [str(z), None]]
        assert f"pool: skipped {locked}: cannot list folder (Permission denied)" in err
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.slow
def test_madseg_score_reports_loops_and_unreadable_entries_and_scores_the_rest(tmp_path, capsys):
    """The CLI on a pool with symlink loops, a broken symlink and a FIFO: exit 0, every real image
    scored, each problem path one ``unreadable`` line of pool_report.tsv with its reason."""
    from projects.cli import main as madseg_main

    f = _problem_tree(tmp_path)
    store = tmp_path / "store"
    rc = madseg_main(["score", str(f["root"]), "--store", str(store),
                      "--target", "espnetv2,scale=0.5,input_size=256",
                      "--competitor", "espnetv2,scale=1.0,input_size=256",
                      "--batch-size", "2", "--workers", "0", "--no-progress", "--json"])
    out = capsys.readouterr().out
    assert rc in (0, None)
    stats = json.loads(out[out.index("{"):])
    assert stats["images"] == 3 and stats["bad"] == 0 and stats["unreadable"] == 4
    assert sorted(stats["inferred"].values()) == [3, 3]
    rows = [line.split("\t") for line in (store / "pool_report.tsv").read_text().splitlines()[1:]]
    report = {path: (kind, detail) for kind, path, detail in rows}
    for key, words in (("back", "symlink loop"), ("self", "symlink loop"), ("dangling", "broken symlink"),
                       ("fifo", "FIFO")):
        kind, detail = report[str(f[key])]
        assert kind == "unreadable" and words in detail, (key, detail)
