"""Label Studio's brush RLE codec, vectorised with numpy.

Label Studio stores a brush mask as the run-length-encoded bytes of an RGBA image of the mask
(``thi.ng/rle-pack`` bit format); the alpha byte is what the browser draws. The bit stream is::

    num        32 bits     number of values (4 * H * W: one RGBA quadruple per pixel)
    word_size   5 bits     bits per value, minus 1
    rle_sizes  4 x 4 bits  widths of the four run-length fields, minus 1
    codes:     flag (1 bit), size index (2 bits), run length - 1 (rle_sizes[index] bits), then
               flag 1 -> one value repeated (run length) times,
               flag 0 -> (run length) literal values,
    zero padding to a byte boundary (the SDK always adds at least one bit, so a stream whose
    length is a multiple of 8 gains a whole zero byte).

:func:`encode` produces exactly what ``label_studio_sdk.converter.brush.mask2rle`` produces for a
0/255 mask (word size 8, run-length widths 3, 4, 8, 16; a run longer than 65536 values is split
into chunks that all use the 16-bit field), and :func:`decode` reads any stream the SDK's
``decode_rle`` reads (any word size up to 32 bits, any widths, the literal runs the browser writes)
and returns the alpha channel, ``decode_rle(rle).reshape(h, w, 4)[:, :, 3]``.

Both work on whole arrays: encoding skips the outside pixels before the first and after the last
inside pixel with ``bytes.find``/``rfind`` (memchr), finds the runs in between with one comparison,
and looks every run's code bits up in a table (one row per run length and value) before packing
them; decoding computes the length of a code that would start at every bit position (a lookup
table on the next 19 bits), follows the chain of code starts (one cheap step per code), reads each
repeat code's value from its last bits and expands the runs with ``np.repeat``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from ml_backend.errors import MadsegError

__all__ = ["RLEError", "encode", "decode", "check", "HEADER_BITS"]

#: Header length in bits: 32 (count) + 5 (word size) + 4 * 4 (run-length widths).
HEADER_BITS = 53
_WORD_SIZE = 8
_RLE_SIZES = (3, 4, 8, 16)
_CHUNK_PX = (1 << 16) // 4  # pixels in the longest run one 16-bit length field holds

# Per pixel-run length n (index min(n, 65)): code length in bits and the code's flag + size-index
# bits in place. Runs are 4n values long: n <= 2 -> 3-bit field, <= 4 -> 4-bit, <= 64 -> 8-bit,
# longer -> 16-bit field (split into chunks of at most 65536 values).
_CODE_BITS = np.zeros(66, dtype=np.int64)
_CODE_HEAD = np.zeros(66, dtype=np.int64)
for _n in range(1, 66):
    _idx = 0 if 4 * _n <= 8 else 1 if 4 * _n <= 16 else 2 if 4 * _n <= 256 else 3
    _CODE_BITS[_n] = 3 + _RLE_SIZES[_idx] + _WORD_SIZE
    _CODE_HEAD[_n] = (1 << int(_CODE_BITS[_n] - 1)) | (_idx << int(_CODE_BITS[_n] - 3))
_CODE_KEEP = np.arange(32)[None, :] >= (32 - _CODE_BITS)[:, None]  # (66, 32) bits of a code
_PREFIX_SHIFTS32 = np.arange(13, 5, -1, dtype=np.int32)  # bit offset s in a byte -> shift 13 - s


class RLEError(MadsegError):
    """A brush RLE is malformed (not bytes, truncated, wrong size for the image, garbage)."""


def _fail(where: str | None, reason: str) -> RLEError:
    prefix = f"{where}: " if where else ""
    return RLEError(
        f"{prefix}malformed brush RLE ({reason}); redraw or delete that brush region in "
        "Label Studio, or regenerate the prediction"
    )


def _header(num: int) -> bytes:
    """The 53 header bits (word size 8, widths 3, 4, 8, 16) as 7 bytes, 3 low bits zero."""
    head = (num << 21) | ((_WORD_SIZE - 1) << 16)
    for k, size in enumerate(_RLE_SIZES):
        head |= (size - 1) << (12 - 4 * k)
    return (head << 3).to_bytes(7, "big")


# Every code of a run of n <= _CHUNK_PX pixels with value v (0 outside, 1 inside) in section
# v (row v * _V_OFF + n) and, with the 16-bit length field the SDK uses for every piece of a
# split run, in section 2 + v: its 32 bits, right-aligned (one 0/1 byte each), and which of them
# the code keeps. (4 x 16385 x 32 bytes each.)
_V_OFF = _CHUNK_PX + 1
_TAB_KIND = np.full(4 * _V_OFF, 65, dtype=np.int64)
_TAB_N = np.tile(np.arange(_V_OFF, dtype=np.int64), 4)
_TAB_KIND[: 2 * _V_OFF] = np.minimum(_TAB_N[: 2 * _V_OFF], 65)
_TAB_CODES = _CODE_HEAD[_TAB_KIND] + (_TAB_N << (2 + _WORD_SIZE)) - (1 << _WORD_SIZE)
_TAB_CODES[_V_OFF : 2 * _V_OFF] += 255
_TAB_CODES[3 * _V_OFF :] += 255
_TAB_CODES[_TAB_N == 0] = 0  # unused rows
_TAB_BITS = np.unpackbits(_TAB_CODES.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)
_TAB_KEEP = _CODE_KEEP[_TAB_KIND]
_TAB_KEEP[_TAB_N == 0] = False


@functools.lru_cache(maxsize=8)
def _header_bits(num: int) -> np.ndarray:
    """The 53 header bits (0/1 uint8) for a stream of ``num`` values."""
    return np.unpackbits(np.frombuffer(_header(num), dtype=np.uint8))[:HEADER_BITS]


def encode(mask: np.ndarray) -> list[int]:
    """Brush RLE of a mask: (H, W) array, nonzero = inside -> list of byte values (0..255).

    Equal to ``mask2rle(np.where(mask != 0, 255, 0).astype(np.uint8))`` of the Label Studio SDK.
    The outside runs before the first and after the last inside pixel are found with
    ``bytes.find`` / ``rfind`` (memchr); only the span between them is compared pixel by pixel.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise RLEError(f"cannot encode a brush mask of shape {mask.shape}; expected a non-empty (H, W) array")
    flat = (mask if mask.dtype == np.bool_ else mask != 0).reshape(-1)
    npix = flat.size
    data = flat.tobytes()  # one 0/1 byte per pixel
    a = data.find(1)  # first inside pixel
    if a < 0:
        run_px = np.array([npix, 0], dtype=np.int64)  # one outside run (the 0 is not used)
        begin, stop = 0, 1
    else:
        b = data.rfind(1)  # last inside pixel
        span = flat[a : b + 1]
        inner = (span[1:] != span[:-1]).nonzero()[0]  # last pixel of every span run but the last
        # run_px: outside before a, the span's runs (inside first), outside after b; even = outside.
        m = inner.size + 1  # runs in the span
        run_px = np.empty(m + 2, dtype=np.int64)
        run_px[0] = a
        if m > 1:
            run_px[1] = inner[0] + 1
            np.subtract(inner[1:], inner[:-1], out=run_px[2:m])
            run_px[m] = b - a - inner[-1]
        else:
            run_px[1] = b - a + 1
        run_px[m + 1] = npix - 1 - b
        begin, stop = (1 if a == 0 else 0), (m + 1 if b == npix - 1 else m + 2)
    split = bool(run_px.max() > _CHUNK_PX)
    if split:
        long_runs = (run_px[begin:stop] > _CHUNK_PX).nonzero()[0] + begin
        long_px = run_px[long_runs].tolist()
    rows = run_px  # rows of the runs' codes in the tables (run_px is not needed after this)
    rows[1::2] += _V_OFF
    rows = rows[begin:stop]
    if split:
        # A run over 65536 values becomes full 65536-value chunks, then the remainder, all with
        # the 16-bit length field, as in the SDK.
        parts: list[np.ndarray | list[int]] = []
        prev = 0
        for i, n in zip(long_runs.tolist(), long_px, strict=True):
            full = (n - 1) // _CHUNK_PX
            section = (2 + (i & 1)) * _V_OFF
            parts += [rows[prev : i - begin], [section + _CHUNK_PX] * full + [section + n - full * _CHUNK_PX]]
            prev = i - begin + 1
        parts.append(rows[prev:])
        rows = np.concatenate(parts)
    body = _TAB_BITS.take(rows, axis=0)[_TAB_KEEP.take(rows, axis=0)]
    out = np.packbits(np.concatenate((_header_bits(4 * npix), body))).tolist()  # zero-padded
    if body.size % 8 == 3:  # HEADER_BITS + body.size is a multiple of 8: the SDK adds a zero byte
        out.append(0)
    return out


def _as_bytes(rle: Sequence[int] | np.ndarray | bytes, where: str | None) -> bytes:
    """The RLE as bytes, or :class:`RLEError` if it is not a list of byte values."""
    if isinstance(rle, (list, tuple)):
        try:
            return bytes(rle)
        except ValueError:
            bad = next((v for v in rle if isinstance(v, int) and not 0 <= v <= 255), None)
            raise _fail(where, f"byte values must be 0..255, found {bad}") from None
        except TypeError:
            bad = next((v for v in rle if not isinstance(v, (int, np.integer))), None)
            shown = f"{type(bad).__name__} {str(bad)[:20]!r}"
            raise _fail(where, f"expected integers 0..255, found {shown}") from None
    if isinstance(rle, (bytes, bytearray)):
        return bytes(rle)
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or (rle.size and rle.dtype.kind not in "iu"):
            raise _fail(where, f"expected a flat list of byte values, got an array {rle.dtype} {rle.shape}")
        if rle.size and (int(rle.min()) < 0 or int(rle.max()) > 255):
            raise _fail(where, f"byte values must be 0..255, found {int(rle.min())}..{int(rle.max())}")
        return rle.astype(np.uint8).tobytes()
    raise _fail(where, f"expected a list of byte values, got {type(rle).__name__}")


def check(
    rle: Sequence[int] | np.ndarray | bytes, height: int, width: int, where: str | None = None
) -> None:
    """Cheap structural check of a brush RLE for a (height, width) image, without decoding:
    a list of byte values whose header announces 4 * height * width values. :class:`RLEError`
    otherwise. (:func:`decode` checks the whole stream.)"""
    data = _as_bytes(rle, where)
    if len(data) * 8 < HEADER_BITS + 14:
        raise _fail(where, f"{len(data)} bytes cannot hold a header and one run")
    num = int.from_bytes(data[:4], "big")
    if num != 4 * int(height) * int(width):
        raise _fail(where, f"it holds {num} values but a {width}x{height} image needs {4 * height * width}")


@functools.lru_cache(maxsize=16)
def _code_tables(word_size: int, sizes: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
    """For every 19-bit prefix t of a code: (code length in bits, values it yields, offset of its
    first value: 3 + field width)."""
    t = np.arange(1 << 19, dtype=np.int64)
    flag = t >> 18
    field = np.asarray(sizes, dtype=np.int64)[(t >> 16) & 3]
    run = ((t >> (16 - field)) & ((1 << field) - 1)) + 1
    step = 3 + field + np.where(flag == 1, word_size, run * word_size)
    return step, run, 3 + field


def decode(
    rle: Sequence[int] | np.ndarray | bytes, height: int, width: int, where: str | None = None
) -> np.ndarray:
    """Decode a brush RLE to the mask's alpha channel: (height, width) uint8 (255 inside, 0 outside).

    Equal to ``decode_rle(rle).reshape(height, width, 4)[:, :, 3]`` of the Label Studio SDK.
    ``where`` (e.g. ``"task 12, annotation 7"``) prefixes the message of the :class:`RLEError`
    raised for a malformed RLE: not a list of bytes, shorter than its header, a value count other
    than 4 * height * width, a stream that ends early, or values over 255.
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise _fail(where, f"image size {width}x{height} is not positive")
    raw = _as_bytes(rle, where)
    nbytes = len(raw)
    nbits = nbytes * 8
    if nbits < HEADER_BITS:
        raise _fail(where, f"{nbytes} bytes is shorter than the {HEADER_BITS}-bit header")
    head = int.from_bytes(raw[:7], "big") >> 3  # the 53 header bits
    num = head >> 21
    expected = 4 * height * width
    if num != expected:
        raise _fail(
            where,
            f"it holds {num} values but a {width}x{height} image needs {expected} (4 per pixel); "
            "wrong image size or garbage",
        )
    word_size = ((head >> 16) & 31) + 1
    sizes = (((head >> 12) & 15) + 1, ((head >> 8) & 15) + 1, ((head >> 4) & 15) + 1, (head & 15) + 1)
    step_of, run_of, value_off = _code_tables(word_size, sizes)

    # The 19 bits at every bit position from the end of the header, from the big-endian 32-bit
    # window at every byte (as int32: the masked shifts only keep bits 6..24 of it).
    window = np.ndarray((nbytes,), dtype=">u4", buffer=raw + bytes(4), strides=(1,)).astype(np.int32)
    prefix = np.right_shift(window[:, None], _PREFIX_SHIFTS32)
    prefix &= 0x7FFFF
    prefix = prefix.reshape(-1)[HEADER_BITS:]
    hop = memoryview(step_of.take(prefix))
    chain: list[int] = []  # code starts, in bits after the header, then the end of the last
    q, end = 0, nbits - HEADER_BITS
    while q < end:
        chain.append(q)
        q += hop[q]
    chain.append(q)
    pos = np.fromiter(chain, dtype=np.int64, count=len(chain))  # (C + 1,)
    code = prefix.take(pos[:-1])
    produced = run_of.take(code).cumsum()
    ncodes = int(produced.searchsorted(num)) + 1  # codes needed to reach num values
    if ncodes > code.size:
        got = int(produced[-1]) if produced.size else 0
        raise _fail(where, f"the stream ends after {min(got, num)} of {num} values (truncated)")
    if chain[ncodes] > end:
        raise _fail(where, "the last run is cut off (truncated)")
    if ncodes < code.size:
        code, produced = code[:ncodes], produced[:ncodes]
    if int(code.min()) >= 1 << 18:  # only repeat codes: one value each, their last bits
        value_at = pos[1 : ncodes + 1] - word_size
        if word_size <= 8:
            values = _value_table(word_size).take(prefix.take(value_at))
        elif word_size <= 19:
            values = prefix.take(value_at) >> (19 - word_size)
        else:  # wider than the 19-bit window: read the value from the 64-bit words
            word = _words(raw)
            value_at += HEADER_BITS
            values = (word.take(value_at >> 3) << (value_at & 7)) >> (64 - word_size) & ((1 << word_size) - 1)
        ends = produced
    else:
        values, ends = _literal_values(
            _words(raw), pos[:ncodes], code, produced, num, word_size, value_off, where
        )
    if word_size > 8 and int(values.max()) > 255:
        raise _fail(where, f"value {int(values.max())} does not fit in a byte")
    if int(ends[-1]) > num:
        ends = np.minimum(ends, num)
    # Alpha values sit at indices 4k + 3; [begin, end) holds end // 4 - begin // 4 of them.
    alpha = ends >> 2
    alpha[1:] -= alpha[:-1]  # numpy buffers the overlapping operands
    return values.astype(np.uint8, copy=False).repeat(alpha).reshape(height, width)


def _words(raw: bytes) -> np.ndarray:
    """The big-endian 64-bit word starting at every byte of ``raw`` (int64, (len(raw),)); bits
    ``8 * i + s`` onwards are ``word[i] << s`` (the signed shifts used keep them intact)."""
    return np.ndarray((len(raw),), dtype=">i8", buffer=raw + bytes(8), strides=(1,)).astype(np.int64)


@functools.lru_cache(maxsize=8)
def _value_table(word_size: int) -> np.ndarray:
    """The value (uint8) in the first ``word_size`` (<= 8) bits of every 19-bit window."""
    return (np.arange(1 << 19, dtype=np.int64) >> (19 - word_size)).astype(np.uint8)


def _literal_values(
    word: np.ndarray, starts: np.ndarray, code: np.ndarray, produced: np.ndarray, num: int,
    word_size: int, value_off: np.ndarray, where: str | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(values (V,), cumulative ends (V,)) of codes (C,) that include literal codes, which
    expand to ``count`` values of one each; repeat codes stay one value each."""
    ncodes = code.size
    is_run = code >= (1 << 18)
    counts = np.diff(produced, prepend=0)  # values each code yields
    if not is_run[-1] and int(produced[-1]) > num:
        raise _fail(where, f"literal values run past the {num} values the header announces")
    value_at = starts + HEADER_BITS + value_off.take(code)
    nelem = np.where(is_run, 1, counts)
    owner = np.repeat(np.arange(ncodes), nelem)
    within = np.arange(owner.size) - np.repeat(np.cumsum(nelem) - nelem, nelem)
    value_at = value_at[owner] + np.where(is_run[owner], 0, within * word_size)
    lengths = np.where(is_run[owner], counts[owner], 1)
    values = (np.take(word, value_at >> 3) << (value_at & 7)) >> (64 - word_size) & ((1 << word_size) - 1)
    return values, np.cumsum(lengths)
