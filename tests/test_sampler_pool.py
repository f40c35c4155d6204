"""Pool scanning: sources (folders, list files, URLs), content ids, and every bad-image kind."""

from __future__ import annotations

import functools
import http.server
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.errors import ImageReadError, MadsegError
from sampler.pool import (
    check_sources,
    content_id,
    count_pool_entries,
    decode_image,
    iter_pool_entries,
    read_source,
)


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
