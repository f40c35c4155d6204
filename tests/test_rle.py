"""ml_backend.labelstudio.rle against the Label Studio SDK's brush RLE codec (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from ml_backend.labelstudio.rle import RLEError, decode, encode
from ml_backend.shared import shared_dir


def _sdk_encode(mask: np.ndarray) -> list[int]:
    return mask2rle(np.where(mask != 0, 255, 0).astype(np.uint8))


def _sdk_decode(rle: list[int], h: int, w: int) -> np.ndarray:
    return decode_rle(rle).reshape(h, w, 4)[:, :, 3]


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out: list[np.ndarray] = [np.zeros((5, 7)), np.ones((5, 7)), np.zeros((1, 1)), np.ones((1, 1)),
                             np.zeros((300, 300), np.uint8), np.full((300, 300), 9, np.int32)]
    for r, c in [(4, 5), (0, 0), (8, 10)]:
        m = np.zeros((9, 11), bool)
        m[r, c] = True
        out += [m, ~m]
    for shape in [(1, 100), (100, 1), (37, 53)]:
        for p in (0.02, 0.5, 0.98):
            out.append(rng.random(shape) < p)
    # run lengths around the 3/4/8/16-bit field limits and the 65536-value chunking
    for n in (1, 2, 3, 4, 5, 63, 64, 65, 66, 16383, 16384, 16385, 32768, 32769, 50000):
        m = np.zeros(70000, bool)
        m[1000:1000 + n] = True
        out.append(m.reshape(350, 200))
    m = np.zeros((129, 128))
    m[:128] = 1  # 16384 px = exactly 65536 values
    out.append(m)
    out.append(rng.integers(0, 3, (40, 60)).astype(np.float32))  # any nonzero value is inside
    return out


@pytest.mark.parametrize("k", range(len(_masks())))
def test_encode_decode_equal_sdk(k):
    mask = _masks()[k]
    h, w = mask.shape
    ref = _sdk_encode(mask)
    assert encode(mask) == ref
    np.testing.assert_array_equal(decode(ref, h, w), _sdk_decode(ref, h, w))
    np.testing.assert_array_equal(decode(ref, h, w), np.where(mask != 0, 255, 0))


def test_real_masks_equal_sdk():
    data = shared_dir() / "data" / "coco_voc" / "masks"
    files = sorted(data.glob("*.png"))[::20]
    assert files
    n = 0
    for f in files:
        labels = np.asarray(Image.open(f))
        h, w = labels.shape
        for c in np.unique(labels):
            m = labels == c
            ref = _sdk_encode(m)
            assert encode(m) == ref, (f.name, c)
            np.testing.assert_array_equal(decode(ref, h, w), _sdk_decode(ref, h, w))
            n += 1
    assert n > 20


def test_noise_500x375_equal_sdk():
    m = np.random.default_rng(1).random((375, 500)) < 0.5
    ref = _sdk_encode(m)
    assert encode(m) == ref
    np.testing.assert_array_equal(decode(ref, 375, 500), np.where(m, 255, 0))


# --- streams the SDK encoder never writes, as the browser does (literal runs, other sizes) ------


def _bits(value: int, n: int) -> str:
    return format(value, f"0{n}b")


def _general_stream(values: list[int], word_size: int, sizes: tuple[int, ...], rng) -> list[int]:
    """rle-pack bit stream of ``values`` mixing literal and repeat codes at random."""
    out = [_bits(len(values), 32), _bits(word_size - 1, 5)] + [_bits(s - 1, 4) for s in sizes]
    i = 0
    while i < len(values):
        idx = int(rng.integers(0, 4))
        maxlen = 1 << sizes[idx]
        j = i + 1
        while j < len(values) and values[j] == values[i] and j - i < maxlen:
            j += 1
        if j - i > 1 and rng.random() < 0.7:
            out += ["1", _bits(idx, 2), _bits(j - i - 1, sizes[idx]), _bits(values[i], word_size)]
            i = j
        else:
            n = int(min(rng.integers(1, 6), maxlen, len(values) - i))
            out += ["0", _bits(idx, 2), _bits(n - 1, sizes[idx])]
            out += [_bits(v, word_size) for v in values[i:i + n]]
            i += n
    s = "".join(out)
    s += "0" * (-len(s) % 8)
    return [int(s[k:k + 8], 2) for k in range(0, len(s), 8)]


@pytest.mark.parametrize("word_size,sizes", [(8, (3, 4, 8, 16)), (8, (1, 2, 5, 16)), (9, (2, 3, 6, 12))])
def test_decode_literal_runs_and_other_headers(word_size, sizes):
    rng = np.random.default_rng(word_size + sizes[0])
    h, w = 13, 17
    alpha = np.where(rng.random((h, w)) < 0.3, 255, 0)
    alpha[3:9, 2:15] = 255
    rgba = np.stack([rng.integers(0, 256, (h, w)), alpha // 2, alpha, alpha], axis=-1)
    values = [int(v) for v in rgba.reshape(-1)]
    rle = _general_stream(values, word_size, sizes, rng)
    ref = _sdk_decode(rle, h, w)
    np.testing.assert_array_equal(ref, alpha)
    np.testing.assert_array_equal(decode(rle, h, w), ref)


# --- malformed input --------------------------------------------------------------------------


def test_wrong_size_names_where():
    rle = encode(np.ones((10, 10)))
    with pytest.raises(RLEError, match=r"task 7, annotation 3: malformed brush RLE .*400 values.*21x5 image"):
        decode(rle, 5, 21, where="task 7, annotation 3")


@pytest.mark.parametrize(
    "rle,reason",
    [
        ([], "shorter than the 53-bit header"),
        ([0, 0, 1], "shorter than the 53-bit header"),
        ("abc", "expected a list of byte values"),
        ({"rle": [1]}, "expected a list of byte values"),
        (None, "expected a list of byte values"),
        ([1, 2, 300, 4, 5, 6, 7, 8], "0..255"),
        ([1, 2, -1, 4, 5, 6, 7, 8], "0..255"),
        ([1.5, 2, 3, 4, 5, 6, 7], "expected integers"),
        (["a"] * 8, "expected integers"),
        (np.zeros((2, 8), np.int64), "flat list"),
    ],
)
def test_garbage_is_a_clear_error(rle, reason):
    with pytest.raises(RLEError, match=reason):
        decode(rle, 4, 4, where="task 1")


def test_truncated_stream():
    mask = np.random.default_rng(3).random((20, 30)) < 0.5
    rle = encode(mask)
    for cut in (8, len(rle) // 2, len(rle) - 2):
        with pytest.raises(RLEError, match="truncated|cut off"):
            decode(rle[:cut], 20, 30, where="task 9")


def test_random_garbage_never_crashes_unclearly():
    rng = np.random.default_rng(5)
    for n in range(160):
        body = rng.integers(0, 256, int(rng.integers(0, 40))).tolist()
        header = list((4 * 6 * 5).to_bytes(4, "big"))
        rle = header + body if n % 2 else body
        try:
            out = decode(rle, 6, 5, where="fuzz")
        except RLEError as exc:
            assert str(exc).startswith("fuzz: malformed brush RLE")
        else:
            assert out.shape == (6, 5) and out.dtype == np.uint8


def test_encode_refuses_non_2d():
    with pytest.raises(RLEError, match="shape"):
        encode(np.zeros((2, 3, 4)))
    with pytest.raises(RLEError, match="shape"):
        encode(np.zeros((0, 3)))


def test_decode_accepts_bytes_and_arrays():
    m = np.eye(6, dtype=bool)
    rle = encode(m)
    for form in (bytes(rle), np.array(rle, np.int64), tuple(rle)):
        np.testing.assert_array_equal(decode(form, 6, 6), np.where(m, 255, 0))


def test_check_is_a_cheap_header_check():
    from ml_backend.labelstudio.rle import check

    rle = encode(np.eye(8, dtype=bool))
    check(rle, 8, 8)
    with pytest.raises(RLEError, match="task 3: malformed brush RLE.*256 values.*needs 288"):
        check(rle, 9, 8, where="task 3")
    with pytest.raises(RLEError, match="cannot hold a header"):
        check(rle[:6], 8, 8)
    with pytest.raises(RLEError, match="0..255"):
        check([999] * 20, 8, 8)
