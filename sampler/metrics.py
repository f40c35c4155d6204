"""Distances between two predicted label maps (pure logic: numpy and torch only).

``map_distance`` compares two (H, W) label maps; ``map_distances_torch`` does the same for a
batch of map pairs in one vectorised pass (used while scoring). Both build the C x C confusion
matrix with a single ``bincount`` over ``a * C + b``.

Definitions (pixels where either map is ``ignore_index`` are left out, as are values outside
``0..C-1``):

- ``"miou"``: ``1 - mean IoU`` over the classes present in either map (non-zero union), where
  ``IoU_k = |a==k & b==k| / |a==k | b==k|``;
- ``"pixel_accuracy"``: ``1 - fraction of valid pixels where the maps agree``.

No valid pixel gives 0.0 for both. The distance is symmetric in ``a`` and ``b``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ml_backend.classes import IGNORE_INDEX

Metric = Literal["miou", "pixel_accuracy"]
METRICS: tuple[str, ...] = ("miou", "pixel_accuracy")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown distance metric {metric!r}; choose one of {', '.join(METRICS)}")


def _distance_from_confusion(cm: np.ndarray, metric: str) -> float:
    """Distance from one (C, C) confusion matrix (rows: map a, columns: map b)."""
    total = cm.sum()
    if total == 0:
        return 0.0
    tp = np.diag(cm).astype(np.float64)
    if metric == "pixel_accuracy":
        return float(1.0 - tp.sum() / total)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    return float(1.0 - (tp[present] / union[present]).mean())


def map_distance(
    a: np.ndarray,
    b: np.ndarray,
    num_classes: int,
    metric: Metric = "miou",
    ignore_index: int = IGNORE_INDEX,
) -> float:
    """Distance in [0, 1] between two label maps ``a`` and ``b`` of the same shape (H, W).

    See the module docstring for the definitions of ``"miou"`` and ``"pixel_accuracy"``.
    """
    _check_metric(metric)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    x = np.asarray(a).reshape(-1).astype(np.int64)
    y = np.asarray(b).reshape(-1).astype(np.int64)
    valid = (x != ignore_index) & (y != ignore_index) & (x >= 0) & (x < num_classes)
    valid &= (y >= 0) & (y < num_classes)
    idx = x[valid] * num_classes + y[valid]
    cm = np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return _distance_from_confusion(cm, metric)


def batch_confusion_torch(
    a: torch.Tensor, b: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Confusion matrices of a batch of map pairs: ``a``, ``b`` (B, H, W) -> (B, C, C) int64.

    Rows index ``a``'s class, columns ``b``'s; invalid pixels (ignore index, out of range) are
    not counted.
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"expected two (B, H, W) label-map batches of one shape, got {a.shape}, {b.shape}")
    bsz = a.shape[0]
    x = a.reshape(bsz, -1).long()
    y = b.reshape(bsz, -1).long()
    valid = (x != ignore_index) & (y != ignore_index) & (x >= 0) & (x < num_classes)
    valid &= (y >= 0) & (y < num_classes)
    cc = num_classes * num_classes
    offs = torch.arange(bsz, dtype=torch.long, device=x.device).unsqueeze(1) * cc
    idx = (offs + x * num_classes + y)[valid]
    return torch.bincount(idx, minlength=bsz * cc).reshape(bsz, num_classes, num_classes)


def prediction_confusion_torch(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Faster :func:`batch_confusion_torch` for predicted maps: ``a``, ``b`` (B, H, W) with every
    value in ``0..C-1`` (no ignore index; not checked) -> (B, C, C) int64."""
    bsz = a.shape[0]
    cc = num_classes * num_classes
    if bsz * cc >= 2**31:
        return batch_confusion_torch(a, b, num_classes)
    offs = (torch.arange(bsz, dtype=torch.int32, device=a.device) * cc).unsqueeze(1)
    idx = a.reshape(bsz, -1).to(torch.int32) * num_classes + b.reshape(bsz, -1).to(torch.int32) + offs
    return torch.bincount(idx.reshape(-1), minlength=bsz * cc).reshape(bsz, num_classes, num_classes)


def distances_from_confusion_torch(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both distances from confusion matrices (B, C, C): ``{"miou": (B,), "pixel_accuracy": (B,)}``
    as float64 tensors (0.0 where a pair has no valid pixel)."""
    cm = cm.double()
    total = cm.sum((1, 2))
    tp = torch.diagonal(cm, dim1=1, dim2=2)
    union = cm.sum(1) + cm.sum(2) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
    n_present = present.sum(1)
    miou = iou.sum(1) / n_present.clamp_min(1)
    has = total > 0
    zeros = torch.zeros_like(total)
    return {
        "miou": torch.where(has, 1.0 - miou, zeros),
        "pixel_accuracy": torch.where(has, 1.0 - tp.sum(1) / total.clamp_min(1), zeros),
    }


def map_distances_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    num_classes: int,
    metric: Metric = "miou",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Batched :func:`map_distance`: ``a``, ``b`` (B, H, W) integer tensors -> (B,) float64."""
    _check_metric(metric)
    cm = batch_confusion_torch(a, b, num_classes, ignore_index)
    return distances_from_confusion_torch(cm)[metric]


def area_fractions_torch(label_maps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Fraction of pixels per class: label maps (B, H, W) with values in 0..C-1 -> (B, C) float32.

    Each row sums to 1 (values outside 0..C-1 are not counted in the numerator).
    """
    bsz = label_maps.shape[0]
    x = label_maps.reshape(bsz, -1).long()
    npix = x.shape[1]
    valid = (x >= 0) & (x < num_classes)
    offs = torch.arange(bsz, dtype=torch.long, device=x.device).unsqueeze(1) * num_classes
    counts = torch.bincount((offs + x)[valid], minlength=bsz * num_classes).reshape(bsz, num_classes)
    return (counts.double() / max(npix, 1)).float()


def labels_from_probs_torch(probs: torch.Tensor) -> torch.Tensor:
    """Arg-max label maps: probabilities (B, C, H, W) -> (B, H, W) uint8 (C <= 256).

    ``max(1).indices`` is several times faster than ``argmax(1)`` on CPU for this layout.
    """
    return probs.max(1).indices.to(torch.uint8)


def mean_entropy_torch(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel softmax entropy (nats): probabilities (B, C, H, W) -> (B,) float32."""
    return torch.special.entr(probs.float()).sum(1).mean((1, 2))
