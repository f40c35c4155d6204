"""ml_backend.imageio: odd image modes, broken files and bad masks give arrays or one clear error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.datasets import image_hw
from ml_backend.errors import ImageReadError, MaskError
from ml_backend.imageio import decode_rgb, encode_mask_png, list_images, read_mask, read_rgb, write_mask


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_rgb_jpeg_and_png(tmp_path: Path) -> None:
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :15] = (250, 10, 10)
    png = _save(Image.fromarray(arr), tmp_path / "a.png")
    out = read_rgb(png)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert np.array_equal(out, arr)
    jpg = _save(Image.fromarray(arr), tmp_path / "a.jpg", quality=95)
    out = read_rgb(jpg)
    assert out.shape == (20, 30, 3)
    assert abs(int(out[10, 2, 0]) - 250) < 12 and int(out[10, 25, 0]) < 12


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    im = Image.new("CMYK", (16, 12), (0, 255, 255, 0))  # pure red in CMYK
    out = read_rgb(_save(im, tmp_path / "cmyk.jpg"))
    assert out.shape == (12, 16, 3)
    r, g, b = (int(v) for v in out[6, 8])
    assert r > 200 and g < 60 and b < 60


def test_16bit_grayscale_is_rescaled(tmp_path: Path) -> None:
    arr = np.zeros((8, 10), np.uint16)
    arr[:, 5:] = 65535
    arr[:, :5] = 32768
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    out = read_rgb(_save(im, tmp_path / "deep.png"))
    assert out.shape == (8, 10, 3)
    assert out[0, 9].tolist() == [255, 255, 255]
    assert 120 <= out[0, 0, 0] <= 135 and out[0, 0, 0] == out[0, 0, 1] == out[0, 0, 2]


def test_grayscale_and_palette(tmp_path: Path) -> None:
    gray = read_rgb(_save(Image.new("L", (5, 4), 77), tmp_path / "g.png"))
    assert gray.shape == (4, 5, 3) and (gray == 77).all()
    pal = Image.new("P", (6, 3), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    out = read_rgb(_save(pal, tmp_path / "p.png"))
    assert out.shape == (3, 6, 3) and out[1, 1].tolist() == [10, 200, 30]


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :2, 3] = 255  # left half opaque red-ish, right half fully transparent
    out = read_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 3].tolist() == [255, 255, 255]
    la = Image.new("LA", (3, 3), (10, 0))
    assert read_rgb(_save(la, tmp_path / "la.png"))[1, 1].tolist() == [255, 255, 255]
    ptrans = Image.new("P", (3, 3), 0)
    ptrans.putpalette([9, 9, 9] * 256)
    ptrans.info["transparency"] = 0
    assert read_rgb(_save(ptrans, tmp_path / "pt.png", transparency=0))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_applied_and_header_size_agrees(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 10), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes())
    out = read_rgb(path)
    assert out.shape == (40, 10, 3)
    assert image_hw(path) == (40, 10)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.jpg.*0 bytes"):
        read_rgb(p)


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: not a readable image"):
        read_rgb(p)


def test_not_an_image_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture")
    with pytest.raises(ImageReadError, match=r"notes\.png"):
        read_rgb(p)
    with pytest.raises(ImageReadError, match=r"missing\.png: cannot read file"):
        read_rgb(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="upload.bin"):
        decode_rgb(b"\x00\x01garbage", "upload.bin")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    """A 120-byte PNG that claims 30000 x 30000 pixels is refused before decoding."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    data += _png_chunk(b"IEND", b"")
    p = tmp_path / "bomb.png"
    p.write_bytes(data)
    assert p.stat().st_size < 200
    with pytest.raises(ImageReadError, match=r"bomb\.png.*(too large|over the limit)"):
        read_rgb(p)


def test_mask_roundtrip_and_bad_values(tmp_path: Path) -> None:
    mask = np.zeros((6, 7), np.uint8)
    mask[1:3, 2:5] = 15
    mask[5, :] = 255
    p = write_mask(tmp_path / "m.png", mask)
    with Image.open(p) as im:
        assert im.mode == "P"
    assert np.array_equal(read_mask(p, 21), mask)
    assert encode_mask_png(mask)[:8] == b"\x89PNG\r\n\x1a\n"

    bad = mask.copy()
    bad[0, 0] = 42
    write_mask(tmp_path / "bad.png", bad)
    with pytest.raises(MaskError, match=r"bad\.png: mask has values \[42\] outside 0\.\.20 and 255"):
        read_mask(tmp_path / "bad.png", 21)
    # the same mask is fine with more classes
    assert read_mask(tmp_path / "bad.png", 50)[0, 0] == 42


def test_mask_wrong_mode_and_unreadable(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(MaskError, match=r"rgb\.png: mask has mode RGB"):
        read_mask(tmp_path / "rgb.png", 21)
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(MaskError, match=r"junk\.png: not a readable mask"):
        read_mask(tmp_path / "junk.png", 21)


def test_list_images_recursive_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.PNG", "b.jpg", "sub/c.webp"]
