"""Reading images and masks robustly.

``read_rgb`` turns any readable image (JPEG, PNG, WebP, BMP; CMYK, 16-bit, palette, alpha,
grayscale) into an (H, W, 3) uint8 RGB array, and raises :class:`ImageReadError` naming the file
and the reason for anything else (zero bytes, truncated, not an image, decompression bomb).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .atomic import atomic_write
from .classes import IGNORE_INDEX, voc_palette
from .errors import ImageReadError, MaskError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Images with more pixels than this are refused (decompression-bomb guard, ~ 16k x 11k).
MAX_PIXELS = 178_956_970

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (alpha composited on white, 16-bit rescaled to 8-bit)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / hi if hi > 255 else 1.0
        arr8 = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = ((arr - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros(arr.shape, np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an (H, W, 3) uint8 RGB array (EXIF orientation applied).

    Raises :class:`ImageReadError` naming ``name`` when the bytes are not a readable image.
    """
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes); remove it or replace it with a valid image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageReadError(
                        f"{name}: {im.width}x{im.height} pixels is over the limit of {MAX_PIXELS} "
                        "(decompression-bomb guard); downscale the image"
                    )
                im.load()
                im = ImageOps.exif_transpose(im) if im.getexif() else im
                rgb = _to_rgb(im)
                return np.asarray(rgb, dtype=np.uint8).copy()
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"{name}: image too large ({exc}); downscale the image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from None


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array, or raise :class:`ImageReadError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return decode_rgb(data, str(path))


def read_mask(path: str | os.PathLike[str], num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Read a label mask (mode P or L PNG) as an (H, W) uint8 array of class indices.

    Values must be in ``0..num_classes-1`` or ``ignore_index``; otherwise :class:`MaskError`.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise MaskError(
                    f"{path}: mask has mode {im.mode}; expected a single-channel (mode P or L) PNG "
                    "of class indices"
                )
            arr = np.asarray(im)
    except MaskError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise MaskError(f"{path}: not a readable mask ({type(exc).__name__}: {exc})") from None
    bad = (arr >= num_classes) & (arr != ignore_index)
    if bad.any():
        vals = sorted(set(np.unique(arr[bad]).tolist()))[:10]
        raise MaskError(
            f"{path}: mask has values {vals} outside 0..{num_classes - 1} and {ignore_index}; "
            "fix the mask or the class list"
        )
    return arr.astype(np.uint8)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """(H, W) uint8 class-index map -> bytes of a mode-P PNG with the VOC palette."""
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette(256).reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> Path:
    """Atomically write an (H, W) class-index map as a mode-P PNG with the VOC palette."""
    data = encode_mask_png(mask)
    return atomic_write(path, lambda fh: fh.write(data))


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``folder`` (recursive), sorted by path."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
