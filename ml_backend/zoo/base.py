"""The common model interface: preprocessing, batched inference, predictions at the original size.

Every zoo entry is a :class:`SegmentationModel`. Subclasses only implement ``_logits`` (a
normalised batch on the model's device -> logits); resizing, softmax, batching and the return to
the original image size live here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..classes import VOC_CLASSES
from ..errors import MadsegError, ModelError
from ..modelspec import ModelSpec  # the spec lives torch-free in ml_backend.modelspec; re-exported here

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise the named device (checked)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(
            f"device {device!r} is not a valid torch device ({exc}); use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def parse_size(value: Any, what: str = "input_size") -> tuple[int, int]:
    """``384`` / ``"384"`` / ``"384x512"`` / ``(384, 512)`` -> ``(H, W)``."""
    try:
        if isinstance(value, str):
            parts = value.lower().replace(",", "x").split("x")
            vals = [int(p) for p in parts if p.strip()]
        elif isinstance(value, (int, np.integer)):
            vals = [int(value)]
        else:
            vals = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ModelError(f"{what}={value!r} is not a size; use e.g. 384 or 384x512") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise ModelError(f"{what}={value!r} is not a size; use e.g. 384 or 384x512")
    return vals[0], vals[1]


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """VOC names for 21 classes, else ``class_0..class_{C-1}``."""
    if num_classes == len(VOC_CLASSES):
        return VOC_CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))


def check_image(image: Any, index: int | str = 0) -> np.ndarray:
    """Return ``image`` if it is an (H, W, 3) uint8 array, else raise :class:`MadsegError`."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}".strip()
        raise MadsegError(
            f"image {index}: expected an (H, W, 3) uint8 RGB array, got {desc}; read files with "
            "ml_backend.imageio.read_rgb"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise MadsegError(f"image {index}: empty image of shape {image.shape}")
    return image


@dataclass(frozen=True)
class Preprocessor:
    """Maps an (H, W, 3) uint8 RGB image to the model input [3, h, w] float32 at ``size``.

    Bilinear resize (antialiased) to ``size`` = (h, w), scale to [0, 1], then ``(x - mean) / std``.
    Picklable, so it can run in DataLoader workers.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.to_tensor(image, torch.device("cpu"))

    def to_tensor(self, image: np.ndarray, device: torch.device) -> torch.Tensor:
        """As ``__call__`` but on ``device`` (resizing happens there)."""
        check_image(image)
        x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
        if tuple(x.shape[2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return self.normalize(x[0].clamp_(0, 255))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 3, h, w] float in 0..255 -> normalised, same shape (no resize)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1) * 255.0
        return (x.float() - mean) / std


#: Label maps larger than this many pixels are upsampled in row chunks to bound memory.
LARGE_IMAGE_PIXELS = 4_000_000
_ROW_CHUNK = 256


def upsample_labels(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Argmax of ``probs`` [C, h, w] bilinearly resized to ``size`` = (H, W) -> (H, W) uint8.

    Large outputs are computed in row chunks (separable bilinear: width pass, then rows), so a
    12-megapixel photo never needs a full (C, H, W) float tensor.
    """
    height, width = int(size[0]), int(size[1])
    p = probs[None].float()
    if height * width <= LARGE_IMAGE_PIXELS:
        if tuple(p.shape[2:]) != (height, width):
            p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
        return p[0].argmax(0).to(torch.uint8)
    h = p.shape[2]
    wide = F.interpolate(p, size=(h, width), mode="bilinear", align_corners=False)[0]  # [C, h, W]
    out = torch.empty((height, width), dtype=torch.uint8, device=p.device)
    for start in range(0, height, _ROW_CHUNK):
        ys = torch.arange(start, min(height, start + _ROW_CHUNK), device=p.device, dtype=torch.float32)
        src = ((ys + 0.5) * h / height - 0.5).clamp(min=0)
        y0 = src.floor().long().clamp(max=h - 1)
        y1 = (y0 + 1).clamp(max=h - 1)
        wy = (src - y0).view(1, -1, 1)
        rows = wide[:, y0] * (1 - wy) + wide[:, y1] * wy
        out[start : start + len(ys)] = rows.argmax(0).to(torch.uint8)
    return out


def _batches(n: int, batch_size: int) -> Iterator[range]:
    if batch_size < 1:
        raise MadsegError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield range(start, min(n, start + batch_size))


class SegmentationModel:
    """A segmentation model of the zoo (see docs/architecture.md).

    Attributes: ``name``, ``version`` (stable: weights hash + output-affecting options),
    ``num_classes``, ``class_names``, ``input_size`` (h, w), ``device``, ``module`` (torch models:
    forward(normalised [B, 3, h, w]) -> logits [B, C, h, w]; else None), ``spec`` (the
    :class:`ModelSpec` that reloads it), ``checkpoint`` (weights file or None),
    ``trainable`` (fine-tuning supported).
    """

    trainable: bool = False

    def __init__(
        self,
        *,
        name: str,
        version: str,
        class_names: Sequence[str],
        input_size: tuple[int, int],
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        spec: ModelSpec,
        checkpoint: Path | None = None,
        module: nn.Module | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.device = device
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.spec = spec
        self.checkpoint = checkpoint
        self.module = module

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, "
            f"input_size={self.input_size}, num_classes={self.num_classes}, device={self.device})"
        )

    # -- to be implemented by entries -------------------------------------------------------
    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised batch [B, 3, h, w] on ``self.device`` -> float logits [B, C, h', w'] on the device."""
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------
    def preprocessor(self) -> Preprocessor:
        """Picklable callable: (H, W, 3) uint8 -> normalised [3, h, w] float32 at ``input_size``."""
        return Preprocessor(self.input_size, self.mean, self.std)  # type: ignore[arg-type]

    def _probs(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [B, C, h, w] float32 on the device, at ``input_size``."""
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise MadsegError(f"{self.name}: expected a batch [B, 3, h, w], got shape {tuple(batch.shape)}")
        with torch.inference_mode():
            logits = self._logits(batch.to(self.device, non_blocking=True)).float()
            if logits.dim() != 4 or logits.shape[:2] != (batch.shape[0], self.num_classes):
                raise ModelError(
                    f"{self.name}: model returned shape {tuple(logits.shape)}; expected "
                    f"[{batch.shape[0]}, {self.num_classes}, h, w]"
                )
            if tuple(logits.shape[2:]) != tuple(batch.shape[2:]):
                logits = F.interpolate(logits, size=batch.shape[2:], mode="bilinear", align_corners=False)
            return torch.softmax(logits, dim=1)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised batch [B, 3, h, w] -> class probabilities [B, C, h, w] float32 on the CPU."""
        return self._probs(batch).cpu()

    __call__ = forward

    def predict_from_input(
        self, batch: torch.Tensor, sizes: Sequence[tuple[int, int]], *, proba: bool = False
    ) -> list[np.ndarray]:
        """Predict a preprocessed batch [B, 3, h, w] and resize each result to ``sizes[i]`` = (H, W).

        Returns (C, H, W) float32 probabilities when ``proba`` else (H, W) uint8 label maps.
        For DataLoader pipelines that run :meth:`preprocessor` in workers.
        """
        if len(sizes) != batch.shape[0]:
            raise MadsegError(f"{self.name}: {batch.shape[0]} images but {len(sizes)} sizes")
        probs = self._probs(batch)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for i, (h, w) in enumerate(sizes):
                if not proba:
                    out.append(upsample_labels(probs[i], (int(h), int(w))).cpu().numpy())
                    continue
                p = probs[i : i + 1]
                if tuple(p.shape[2:]) != (int(h), int(w)):
                    p = F.interpolate(p, size=(int(h), int(w)), mode="bilinear", align_corners=False)
                out.append(p[0].float().cpu().numpy())
        return out

    def _predict(self, images: Sequence[np.ndarray], batch_size: int, proba: bool) -> list[np.ndarray]:
        prep = self.preprocessor()
        out: list[np.ndarray] = []
        for idx in _batches(len(images), batch_size):
            imgs = [check_image(images[i], i) for i in idx]
            with torch.inference_mode():
                batch = torch.stack([prep.to_tensor(im, self.device) for im in imgs])
            out.extend(self.predict_from_input(batch, [im.shape[:2] for im in imgs], proba=proba))
        return out

    def predict_proba(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Images (each (H, W, 3) uint8, any size) -> per-image probabilities (C, H, W) float32."""
        return self._predict(images, batch_size, proba=True)

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Images (each (H, W, 3) uint8, any size) -> per-image label maps (H, W) uint8."""
        return self._predict(images, batch_size, proba=False)


class TorchSegmentationModel(SegmentationModel):
    """A zoo model backed by a torch ``nn.Module`` (kept in eval mode on ``device``).

    ``bf16`` runs the forward pass under bfloat16 autocast and ``channels_last`` uses that memory
    format; both only take effect on CUDA.
    """

    def __init__(
        self,
        *,
        module: nn.Module,
        bf16: bool = False,
        channels_last: bool | None = None,
        trainable: bool = False,
        ckpt_prefix: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(module=module, **kwargs)
        on_cuda = self.device.type == "cuda"
        self.bf16 = bool(bf16) and on_cuda
        self.channels_last = (on_cuda if channels_last is None else bool(channels_last)) and on_cuda
        if bf16 and not on_cuda:
            log.info("%s: bf16 autocast is only used on CUDA; running float32 on %s", self.name, self.device)
        self.trainable = trainable
        #: prefix of the module's state-dict keys that the checkpoint format does not have
        self.ckpt_prefix = ckpt_prefix
        with contextlib.suppress(NotImplementedError):  # torch.export modules refuse .eval()
            module.eval()
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast context when enabled (CUDA), else a no-op."""
        if self.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare_input(self, batch: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (channels_last when enabled)."""
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.module is not None
        with self.autocast():
            return self.module(self.prepare_input(batch))

    def checkpoint_state(self, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """State dict of ``module`` (default: ``self.module``) in this entry's checkpoint format (CPU)."""
        module = module if module is not None else self.module
        assert module is not None
        n = len(self.ckpt_prefix)
        return {
            (k[n:] if n and k.startswith(self.ckpt_prefix) else k): v.detach().cpu().clone()
            for k, v in module.state_dict().items()
        }
