"""Pseudo-labels from the agreement of several models (for fine-tuning on rated-but-unlabelled images).

A pixel gets a label only where every model predicts the same class (the "best aspects of the
competing models" where they agree); every other pixel is 255 (ignored by the loss). An image
where less than ``min_coverage`` of the pixels are agreed on gets no pseudo-label at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .classes import IGNORE_INDEX
from .errors import MadsegError
from .imageio import read_rgb, write_mask


def agreement_label(preds: Sequence[np.ndarray]) -> np.ndarray:
    """Label map (H, W) uint8: the class where all ``preds`` (each (H, W) integer) agree, else 255."""
    if len(preds) < 2:
        raise MadsegError(f"pseudo-labels need at least 2 models' predictions, got {len(preds)}")
    first = np.asarray(preds[0])
    agree = np.ones(first.shape, dtype=bool)
    for p in preds[1:]:
        p = np.asarray(p)
        if p.shape != first.shape:
            raise MadsegError(f"pseudo-labels: prediction shapes differ ({p.shape} vs {first.shape})")
        agree &= p == first
    out = np.full(first.shape, IGNORE_INDEX, dtype=np.uint8)
    out[agree] = first[agree].astype(np.uint8)
    return out


def write_agreement_labels(
    images: Sequence[str | os.PathLike[str]],
    predictions: Sequence[Sequence[np.ndarray]],
    out_dir: str | os.PathLike[str],
    *,
    min_coverage: float = 0.5,
) -> list[str]:
    """Write a labelled folder ``out_dir/images`` (symlinks) + ``out_dir/masks`` of agreement labels.

    ``predictions[i]`` holds each model's label map (H, W) for ``images[i]`` at the image's size.
    Returns the stems written (images with agreed coverage >= ``min_coverage``).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    stems = []
    for path, preds in zip(images, predictions, strict=True):
        path = Path(path)
        label = agreement_label(preds)
        h, w = read_rgb(path).shape[:2]
        if label.shape != (h, w):
            raise MadsegError(
                f"pseudo-labels: predictions for {path} are {label.shape}, the image is {(h, w)}"
            )
        if float((label != IGNORE_INDEX).mean()) < min_coverage:
            continue
        link = out / "images" / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
        write_mask(out / "masks" / (path.stem + ".png"), label)
        stems.append(path.stem)
    return stems
