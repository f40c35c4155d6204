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

Both work on whole arrays: encoding finds the runs with one comparison over the pixels, builds
every code as an integer from lookup tables and concatenates their bits with one boolean mask;
decoding computes the length of a code that would start at every bit position (a lookup table on
the next 19 bits), follows the chain of code starts (one cheap step per code) and expands the
runs with ``np.repeat``.
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
_PREFIX_SHIFTS = np.arange(7, -1, -1, dtype=np.int32)  # bit offset s in a byte -> shift 7 - s


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


def encode(mask: np.ndarray) -> list[int]:
    """Brush RLE of a mask: (H, W) array, nonzero = inside -> list of byte values (0..255).

    Equal to ``mask2rle(np.where(mask != 0, 255, 0).astype(np.uint8))`` of the Label Studio SDK.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise RLEError(f"cannot encode a brush mask of shape {mask.shape}; expected a non-empty (H, W) array")
    flat = mask.reshape(-1)
    if flat.dtype != np.bool_:
        flat = flat.astype(bool)
    npix = flat.size
    last = np.flatnonzero(flat[1:] != flat[:-1])  # last pixel of every run but the final one
    nruns = last.size + 1
    bounds = np.empty(nruns + 1, dtype=np.int64)
    bounds[0] = -1
    bounds[1:nruns] = last
    bounds[nruns] = npix - 1
    run_px = bounds[1:] - bounds[:-1]  # (R,) pixel run lengths; runs alternate outside/inside
    kind = np.minimum(run_px, 65)
    first_inside = 0 if flat[0] else 1
    long_runs = np.flatnonzero(run_px > _CHUNK_PX) if run_px.max() > _CHUNK_PX else None
    if long_runs is not None:
        # A run over 65536 values becomes full 65536-value chunks and a remainder, as in the SDK.
        full = (run_px[long_runs] - 1) // _CHUNK_PX
        run_px = run_px.copy()
        run_px[long_runs] -= full * _CHUNK_PX
    codes = np.take(_CODE_HEAD, kind) + ((run_px << (2 + _WORD_SIZE)) - (1 << _WORD_SIZE))
    codes[first_inside::2] += 255
    if long_runs is not None:
        # Repeat each long run's (remainder) code; its copies before the last get the full length.
        reps = np.ones(nruns, dtype=np.int64)
        reps[long_runs] += full
        codes = np.repeat(codes, reps)
        kind = np.repeat(kind, reps)
        first = long_runs + np.cumsum(full) - full  # index of each long run's first chunk
        for start, count in zip(first.tolist(), full.tolist(), strict=True):
            codes[start : start + count] |= 0xFFFF << _WORD_SIZE
    # Each code (<= 27 bits) as 32 bits, keep its low _CODE_BITS[kind] bits, concatenate, pack.
    bits = np.unpackbits(codes.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)
    body = bits[np.take(_CODE_KEEP, kind, axis=0)]
    total = HEADER_BITS + body.size
    stream = np.zeros((total // 8 + 1) * 8, dtype=np.uint8)  # the SDK always pads with 1..8 zero bits
    stream[HEADER_BITS:total] = body
    out = np.packbits(stream)
    out[:7] |= np.frombuffer(_header(4 * npix), dtype=np.uint8)
    return out.tolist()


def _as_bytes(rle: Sequence[int] | np.ndarray | bytes, where: str | None) -> np.ndarray:
    """The RLE as a uint8 array, or :class:`RLEError` if it is not a list of byte values."""
    if isinstance(rle, (bytes, bytearray)):
        return np.frombuffer(bytes(rle), dtype=np.uint8)
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or (rle.size and rle.dtype.kind not in "iu"):
            raise _fail(where, f"expected a flat list of byte values, got an array {rle.dtype} {rle.shape}")
        if rle.size and (int(rle.min()) < 0 or int(rle.max()) > 255):
            raise _fail(where, f"byte values must be 0..255, found {int(rle.min())}..{int(rle.max())}")
        return rle.astype(np.uint8)
    if not isinstance(rle, (list, tuple)):
        raise _fail(where, f"expected a list of byte values, got {type(rle).__name__}")
    try:
        return np.frombuffer(bytes(rle), dtype=np.uint8)
    except ValueError:
        bad = next((v for v in rle if isinstance(v, int) and not 0 <= v <= 255), None)
        raise _fail(where, f"byte values must be 0..255, found {bad}") from None
    except TypeError:
        bad = next((v for v in rle if not isinstance(v, (int, np.integer))), None)
        shown = f"{type(bad).__name__} {str(bad)[:20]!r}"
        raise _fail(where, f"expected integers 0..255, found {shown}") from None


def check(
    rle: Sequence[int] | np.ndarray | bytes, height: int, width: int, where: str | None = None
) -> None:
    """Cheap structural check of a brush RLE for a (height, width) image, without decoding:
    a list of byte values whose header announces 4 * height * width values. :class:`RLEError`
    otherwise. (:func:`decode` checks the whole stream.)"""
    data = _as_bytes(rle, where)
    if data.size * 8 < HEADER_BITS + 14:
        raise _fail(where, f"{data.size} bytes cannot hold a header and one run")
    num = int.from_bytes(data[:4].tobytes(), "big")
    if num != 4 * int(height) * int(width):
        raise _fail(where, f"it holds {num} values but a {width}x{height} image needs {4 * height * width}")


@functools.lru_cache(maxsize=16)
def _code_tables(word_size: int, sizes: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
    """For every 19-bit prefix t of a code: (code length in bits, values it yields, field width)."""
    t = np.arange(1 << 19, dtype=np.int64)
    flag = t >> 18
    field = np.asarray(sizes, dtype=np.int64)[(t >> 16) & 3]
    run = ((t >> (16 - field)) & ((1 << field) - 1)) + 1
    step = 3 + field + np.where(flag == 1, word_size, run * word_size)
    return step, run.astype(np.int32), field.astype(np.int32)


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
    data = _as_bytes(rle, where)
    nbytes = data.size
    nbits = nbytes * 8
    if nbits < HEADER_BITS:
        raise _fail(where, f"{nbytes} bytes is shorter than the {HEADER_BITS}-bit header")
    padded = data.tobytes() + bytes(8)
    # Big-endian 64-bit word starting at every byte; (word << s) starts at bit 8 * byte + s.
    word = np.ndarray((nbytes,), dtype=">u8", buffer=padded, strides=(1,)).astype(np.uint64)
    num = int(word[0]) >> 32
    expected = 4 * height * width
    if num != expected:
        raise _fail(
            where,
            f"it holds {num} values but a {width}x{height} image needs {expected} (4 per pixel); "
            "wrong image size or garbage",
        )
    head = int(word[4])  # bits 32.. : word size (5 bits) and the four widths (4 bits each)
    word_size = (head >> 59) + 1
    sizes = tuple(((head >> (55 - 4 * k)) & 15) + 1 for k in range(4))
    step_of, run_of, field_of = _code_tables(word_size, sizes)

    # The code that would start at each bit position, its length, and the chain from the first.
    top = (word >> np.uint64(38)).astype(np.int32)  # bits 0..25 of each byte's window
    prefix = ((top[:, None] >> _PREFIX_SHIFTS) & 0x7FFFF).reshape(-1)[HEADER_BITS:]
    nxt = np.arange(HEADER_BITS, nbits, dtype=np.int64)
    nxt += np.take(step_of, prefix)
    hop = memoryview(nxt)
    chain: list[int] = []
    p = HEADER_BITS
    while p < nbits:
        chain.append(p)
        p = hop[p - HEADER_BITS]
    starts = np.fromiter(chain, dtype=np.int64, count=len(chain))
    code = np.take(prefix, starts - HEADER_BITS)
    counts = np.take(run_of, code).astype(np.int64)
    produced = np.cumsum(counts)
    ncodes = int(np.searchsorted(produced, num)) + 1  # codes needed to reach num values
    if ncodes > starts.size:
        got = int(produced[-1]) if produced.size else 0
        raise _fail(where, f"the stream ends after {min(got, num)} of {num} values (truncated)")
    starts, code, counts, produced = starts[:ncodes], code[:ncodes], counts[:ncodes], produced[:ncodes]
    if int(starts[-1] + step_of[code[-1]]) > nbits:
        raise _fail(where, "the last run is cut off (truncated)")
    is_run = code >= (1 << 18)
    value_at = starts + 3 + np.take(field_of, code)
    lengths = counts
    if not is_run.all():
        # Literal codes expand to `count` values of length 1; run codes stay one value each.
        if not is_run[-1] and int(produced[-1]) > num:
            raise _fail(where, f"literal values run past the {num} values the header announces")
        nelem = np.where(is_run, 1, counts)
        owner = np.repeat(np.arange(ncodes), nelem)
        within = np.arange(owner.size) - np.repeat(np.cumsum(nelem) - nelem, nelem)
        value_at = value_at[owner] + np.where(is_run[owner], 0, within * word_size)
        lengths = np.where(is_run[owner], counts[owner], 1)
    values = (np.take(word, value_at >> 3) << (value_at & 7).astype(np.uint64)) >> np.uint64(64 - word_size)
    if word_size > 8 and int(values.max()) > 255:
        raise _fail(where, f"value {int(values.max())} does not fit in a byte")
    ends = np.minimum(produced if lengths is counts else np.cumsum(lengths), num)
    # Alpha values sit at indices 4k + 3; [begin, end) holds end // 4 - begin // 4 of them.
    return np.repeat(values.astype(np.uint8), np.diff(ends >> 2, prepend=0)).reshape(height, width)
