"""Decode a task image for ``/predict`` within pixel caps, checked from the header first.

PIL's ``Image.open`` reads only the header, so the size is known before any pixel is decoded:

- more than ``max_pixels`` (``MADSEG_MAX_IMAGE_PIXELS``) -> refused at once
  (:class:`~ml_backend.errors.ImageReadError`), without decoding (a 13000x13000 PNG of 164 KB is
  refused in milliseconds instead of taking minutes and gigabytes);
- more than ``predict_pixels`` (``MADSEG_PREDICT_PIXELS``) -> decoded reduced (JPEG: at 1/2, 1/4
  or 1/8 scale straight from the DCT via ``draft``) and resized to at most ``predict_pixels``,
  keeping the aspect ratio; the prediction is then made at that size, never upsampled beyond it;
- otherwise decoded in full by :func:`ml_backend.imageio.decode_rgb`.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageReadError
from .imageio import _to_rgb, decode_rgb


def header_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the image header only; :class:`ImageReadError` for non-images."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return int(im.width), int(im.height)
    except Image.DecompressionBombError:
        raise ImageReadError(f"{name}: image header announces too many pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable image ({type(exc).__name__})") from None


def fit_within(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest (w, h) with the same aspect ratio and ``w * h <= max_pixels`` (unchanged if it fits)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def decode_capped(data: bytes, name: str, *, max_pixels: int, predict_pixels: int) -> np.ndarray:
    """The image as an (H, W, 3) uint8 RGB array with ``H * W <= predict_pixels`` (module docstring)."""
    width, height = header_size(data, name)
    if width * height > max_pixels:
        raise ImageReadError(f"{name}: {width}x{height} pixels is over MADSEG_MAX_IMAGE_PIXELS={max_pixels}; "
                             "the backend does not decode it")
    if width * height <= predict_pixels:
        return decode_rgb(data, name=name)
    tw, th = fit_within(width, height, predict_pixels)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (tw, th))  # JPEG decodes directly at a reduced scale; others ignore it
            im.load()
            im = ImageOps.exif_transpose(im) if im.getexif() else im
            rgb = _to_rgb(im)
            tw, th = fit_within(rgb.width, rgb.height, predict_pixels)
            if (rgb.width, rgb.height) != (tw, th):
                rgb = rgb.resize((tw, th), Image.BILINEAR, reducing_gap=2.0)
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable image ({type(exc).__name__})") from None
