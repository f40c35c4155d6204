"""The one overlay look: a photo with a label map drawn over it in the class colours.

Shown to raters beside the photo (the paper's rating GUI) and in the report's galleries
(``projects.evaluation.report``), so the report shows the pictures the raters saw. Background
(class 0) and ignore (255) pixels stay unblended, so the photo shows through; each object class
is blended with its VOC colour at ``alpha`` and gets a thin outline, so neighbouring regions stay
distinguishable.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ml_backend.atomic import atomic_write_bytes
from ml_backend.classes import IGNORE_INDEX, voc_palette
from ml_backend.errors import MadsegError
from ml_backend.labelmaps import resize_labels

DEFAULT_ALPHA = 0.55


def blend(image: np.ndarray, label_map: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Photo (H, W, 3) uint8 + label map (h, w) of class indices -> (H, W, 3) uint8 overlay.

    A label map of another size is resized to the photo (``ml_backend.labelmaps.resize_labels``).
    Classes 1.. are blended with their VOC colour at ``alpha`` (0..1) and outlined.
    """
    if not 0.0 <= alpha <= 1.0:
        raise MadsegError(f"overlay alpha {alpha} is outside 0..1")
    if image.ndim != 3 or image.shape[2] != 3:
        raise MadsegError(f"overlay: expected an (H, W, 3) photo, got shape {image.shape}")
    if label_map.ndim != 2:
        raise MadsegError(f"overlay: expected an (H, W) label map, got shape {label_map.shape}")
    h, w = image.shape[:2]
    labels = resize_labels(label_map, (h, w))
    colours = voc_palette(256).astype(np.float32)[labels]
    fg = (labels != 0) & (labels != IGNORE_INDEX)
    out = image.astype(np.float32)
    out[fg] = (1.0 - alpha) * out[fg] + alpha * colours[fg]
    # Outline: pixels whose right or lower neighbour has another label, drawn in full colour.
    edge = np.zeros((h, w), dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge &= fg
    out[edge] = colours[edge]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (fast compression)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_overlay(
    path: str | os.PathLike[str], image: np.ndarray, label_map: np.ndarray, alpha: float = DEFAULT_ALPHA
) -> Path:
    """Blend (see :func:`blend`) and write the overlay atomically as a PNG at ``path``."""
    return atomic_write_bytes(path, encode_png(blend(image, label_map, alpha)))
