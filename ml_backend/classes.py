"""Class lists and colour palettes (PASCAL VOC by default)."""

from __future__ import annotations

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map: uint8 array of shape (n, 3); index 255 is (224, 224, 192)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def palette_hex(num_classes: int) -> list[str]:
    """``#rrggbb`` colours of the first ``num_classes`` palette entries."""
    return ["#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb)) for rgb in voc_palette(256)[:num_classes]]


def colorize(label_map: np.ndarray) -> np.ndarray:
    """Label map (H, W) of class indices -> RGB image (H, W, 3) uint8 in VOC colours."""
    return voc_palette(256)[label_map.astype(np.uint8)]
