"""Label maps (H, W) of class indices: the one nearest-neighbour resize.

Every place that brings a label map to another size — the score store's working resolution, the
simulated raters' comparison with the ground truth, Label Studio pre-annotations, the overlay
pictures of the raters and of the report — uses :func:`resize_labels`, so they agree pixel for
pixel.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import MadsegError


def resize_labels(label_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w) label map (values 0..255) to ``shape`` = (H, W).

    Samples at pixel centres (PIL's ``NEAREST``), so an integer up-scaling repeats each label
    exactly. Returns (H, W) uint8; the input itself (as uint8) when it already has that size.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise MadsegError(f"label map: expected an (H, W) array, got shape {label_map.shape}")
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise MadsegError(f"label map: cannot resize to {height}x{width}; both sides must be >= 1")
    if label_map.shape == (height, width):
        return label_map.astype(np.uint8, copy=False)
    im = Image.fromarray(label_map.astype(np.uint8, copy=False), mode="L")
    return np.asarray(im.resize((width, height), Image.NEAREST), dtype=np.uint8)
