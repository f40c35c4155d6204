"""Dataset-level mIoU of a zoo model on a labelled set (predictions at the original image size)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .datasets import LabelledFolder, read_pair
from .metrics import confusion_matrix, iou_per_class, miou_from_confusion
from .zoo.base import Preprocessor, SegmentationModel


class _EvalSet(Dataset):
    """Item i -> (preprocessed image [3, h, w], mask (H, W) uint8)."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], prep: Preprocessor, num_classes: int) -> None:
        self.pairs, self.prep, self.num_classes = list(pairs), prep, num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, np.ndarray]:
        image, mask = read_pair(*self.pairs[i], self.num_classes)
        return self.prep(image), mask


def _collate(items: list[tuple[torch.Tensor, np.ndarray]]) -> tuple[torch.Tensor, list[np.ndarray]]:
    return torch.stack([x for x, _ in items]), [m for _, m in items]


def evaluate_confusion(
    model: SegmentationModel,
    labelled: LabelledFolder | Sequence[tuple[Path, Path]],
    batch_size: int = 8,
    *,
    num_workers: int = 0,
    progress: bool = True,
    desc: str | None = None,
) -> np.ndarray:
    """Confusion matrix (C, C) int64 (rows = ground truth) of ``model`` over a labelled set.

    Images are streamed in batches (preprocessing in ``num_workers`` DataLoader workers);
    predictions are resized to each image's original size before counting.
    """
    return per_image_confusions(model, labelled, batch_size, num_workers=num_workers, progress=progress,
                                desc=desc).sum(axis=0)


def per_image_confusions(
    model: SegmentationModel,
    labelled: LabelledFolder | Sequence[tuple[Path, Path]],
    batch_size: int = 8,
    *,
    num_workers: int = 0,
    progress: bool = True,
    desc: str | None = None,
) -> np.ndarray:
    """Per-image confusion matrices (N, C, C) int64 (rows = ground truth) of ``model`` over a
    labelled set, in the set's order (what the promotion gate's paired bootstrap needs)."""
    pairs = labelled.pairs if isinstance(labelled, LabelledFolder) else list(labelled)
    c = model.num_classes
    loader = DataLoader(
        _EvalSet(pairs, model.preprocessor(), c),
        batch_size=max(1, int(batch_size)),
        num_workers=num_workers,
        collate_fn=_collate,
    )
    cms = np.zeros((len(pairs), c, c), dtype=np.int64)
    n = 0
    with tqdm(total=len(pairs), desc=desc or f"eval {model.name}", unit="img", disable=not progress,
              leave=False) as bar:
        for batch, masks in loader:
            preds = model.predict_from_input(batch, [m.shape for m in masks])
            for pred, mask in zip(preds, masks, strict=True):
                cms[n] = confusion_matrix(pred, mask, c)
                n += 1
            bar.update(len(masks))
    return cms


def evaluate(
    model: SegmentationModel,
    labelled: LabelledFolder | Sequence[tuple[Path, Path]],
    batch_size: int = 8,
    **kwargs: Any,
) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU (C,) with NaN for absent classes) of ``model`` on a labelled set, using
    the dataset-level definition of :mod:`ml_backend.metrics`."""
    cm = evaluate_confusion(model, labelled, batch_size, **kwargs)
    return miou_from_confusion(cm), iou_per_class(cm)
