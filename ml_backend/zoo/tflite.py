"""TFLite segmentation models through ``ai-edge-litert`` (inference only).

A supported model has one image input [1, h, w, 3] (float32, or uint8/int8 with quantisation
parameters) and one output of class scores [1, h', w', C] (float32 or quantised); the scores
are treated as logits. The shared DeepLabV3-MobileNetV2 takes float32 [1, 513, 513, 3] scaled
``x / 127.5 - 1`` (mean = std = 0.5 in 0..1 units, the default here) and gives [1, 513, 513, 21].
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelError
from ..shared import shared_dir
from .base import ModelSpec, SegmentationModel, default_class_names
from .checkpoints import require_file
from .hashing import file_sha256, make_version

log = logging.getLogger(__name__)

TFLITE_MEAN = (0.5, 0.5, 0.5)
TFLITE_STD = (0.5, 0.5, 0.5)
_SUPPORTED_DTYPES = (np.float32, np.uint8, np.int8)


def shared_tflite_files() -> list[Path]:
    """The ``.tflite`` files under ``<shared>/models/tflite``."""
    folder = shared_dir(required=False) / "models" / "tflite"
    return sorted(folder.glob("*.tflite")) if folder.is_dir() else []


@dataclass(frozen=True)
class TFLiteIO:
    """What madseg needs to know about a TFLite model's tensors."""

    input_index: int
    output_index: int
    input_size: tuple[int, int]
    num_classes: int
    input_dtype: Any
    input_quant: tuple[float, int]
    output_quant: tuple[float, int]


def _shape(details: Mapping[str, Any]) -> list[int]:
    return [int(v) for v in details["shape"]]


def check_tflite_io(
    inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]
) -> TFLiteIO:
    """Check a TFLite model's input/output details (as ``Interpreter.get_*_details()`` gives them).

    Raises :class:`ModelError` naming the file and the shapes when the model is not an image
    segmentation model with input [1, h, w, 3] and output [1, h', w', C] (C >= 2).
    """
    def desc(ds: Sequence[Mapping[str, Any]]) -> str:
        parts = [f"{d.get('name', '?')} {_shape(d)} {np.dtype(d['dtype']).name}" for d in ds]
        return ", ".join(parts) or "none"

    found = f"inputs: {desc(inputs)}; outputs: {desc(outputs)}"
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"TFLite model {path}: expected 1 input and 1 output tensor, found {found}; "
            "madseg runs single-image segmentation models"
        )
    inp, out = inputs[0], outputs[0]
    ishape, oshape = _shape(inp), _shape(out)
    if len(ishape) != 4 or ishape[0] != 1 or ishape[3] != 3 or min(ishape) < 1:
        raise ModelError(
            f"TFLite model {path}: unexpected input shape {ishape} ({found}); "
            "expected an RGB image batch [1, height, width, 3]"
        )
    if len(oshape) != 4 or oshape[0] != 1 or oshape[3] < 2 or min(oshape) < 1:
        hint = " (a label map; madseg needs per-class scores)" if len(oshape) == 3 else ""
        raise ModelError(
            f"TFLite model {path}: unexpected output shape {oshape}{hint} ({found}); "
            "expected class scores [1, height, width, num_classes]"
        )
    for d, what in ((inp, "input"), (out, "output")):
        if np.dtype(d["dtype"]) not in [np.dtype(t) for t in _SUPPORTED_DTYPES]:
            raise ModelError(
                f"TFLite model {path}: {what} dtype {np.dtype(d['dtype']).name} is not supported "
                f"({found}); expected float32, uint8 or int8"
            )
    return TFLiteIO(
        input_index=int(inp["index"]),
        output_index=int(out["index"]),
        input_size=(ishape[1], ishape[2]),
        num_classes=oshape[3],
        input_dtype=np.dtype(inp["dtype"]),
        input_quant=(float(inp.get("quantization", (0.0, 0))[0]), int(inp.get("quantization", (0.0, 0))[1])),
        output_quant=(float(out.get("quantization", (0.0, 0))[0]), int(out.get("quantization", (0.0, 0))[1])),
    )


class TFLiteSegmentationModel(SegmentationModel):
    """A TFLite segmentation model (CPU, inference only; ``module`` is None).

    Batches are run by resizing the interpreter's input to [B, h, w, 3] when the model allows it,
    else image by image. Calls are serialised with a lock (interpreters are not thread-safe).
    """

    def __init__(self, *, interpreter: Any, io: TFLiteIO, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._interp = interpreter
        self._io = io
        self._lock = threading.Lock()
        self._batch = 1
        self._batchable = True

    def _set_batch(self, n: int) -> bool:
        if n == self._batch:
            return True
        if not self._batchable:
            return False
        h, w = self._io.input_size
        try:
            self._interp.resize_tensor_input(self._io.input_index, [n, h, w, 3], strict=False)
            self._interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            log.info("%s: batch size %d not supported (%s); running image by image", self.name, n, exc)
            self._batchable = False
            self._interp.resize_tensor_input(self._io.input_index, [1, h, w, 3], strict=False)
            self._interp.allocate_tensors()
            self._batch = 1
            return False
        self._batch = n
        return True

    def _run(self, x: np.ndarray) -> np.ndarray:
        io = self._io
        if io.input_dtype != np.float32:
            scale, zero = io.input_quant
            info = np.iinfo(io.input_dtype)
            x = np.clip(np.round(x / (scale or 1.0) + zero), info.min, info.max).astype(io.input_dtype)
        self._interp.set_tensor(io.input_index, x)
        self._interp.invoke()
        y = self._interp.get_tensor(io.output_index)
        if y.dtype != np.float32:
            scale, zero = io.output_quant
            y = (y.astype(np.float32) - zero) * (scale or 1.0)
        return y

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[2:]) != self.input_size:
            raise ModelError(
                f"{self.name}: input batch is {tuple(batch.shape[2:])}, the model takes {self.input_size}"
            )
        x = batch.detach().float().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        with self._lock:
            if self._set_batch(x.shape[0]):
                y = self._run(x)
            else:
                y = np.concatenate([self._run(x[i : i + 1]) for i in range(x.shape[0])])
        if y.shape[0] != x.shape[0] or y.shape[3] != self.num_classes:
            raise ModelError(f"{self.name}: output {list(y.shape)} for an input of {list(x.shape)}")
        return torch.from_numpy(np.ascontiguousarray(y)).permute(0, 3, 1, 2).to(self.device)


def load_tflite(
    checkpoint: str | None, device: torch.device, options: dict[str, Any], runtime: dict[str, Any]
) -> TFLiteSegmentationModel:
    """Load a ``.tflite`` file (default: the first shared one).

    Options: ``mean``/``std`` (0..1 units; default 0.5/0.5 = ``x / 127.5 - 1``), ``class_names``,
    ``num_threads`` (default: CPU count). Runs on the CPU whatever ``device`` says; results are
    moved to ``device``.
    """
    from ai_edge_litert.interpreter import Interpreter

    if checkpoint is None:
        files = shared_tflite_files()
        if not files:
            raise ModelError(
                "tflite: no checkpoint given and no shared .tflite model found; pass checkpoint=<file>"
            )
        checkpoint = str(files[0])
    path = require_file(checkpoint, "TFLite model")
    mean = tuple(float(v) for v in options.pop("mean", TFLITE_MEAN))
    std = tuple(float(v) for v in options.pop("std", TFLITE_STD))
    names_opt = options.pop("class_names", None)
    threads = int(options.pop("num_threads", 0) or os.cpu_count() or 1)
    try:
        interp = Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(
            f"TFLite model {path}: cannot be read ({str(exc).strip().splitlines()[0][:200]}); "
            "is it a .tflite flatbuffer?"
        ) from None
    io = check_tflite_io(interp.get_input_details(), interp.get_output_details(), path)
    try:
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"TFLite model {path}: cannot allocate tensors ({str(exc)[:200]})") from None
    class_names = default_class_names(io.num_classes) if names_opt is None else tuple(map(str, names_opt))
    if len(class_names) != io.num_classes:
        raise ModelError(
            f"TFLite model {path}: {io.num_classes} output classes but {len(class_names)} class_names"
        )
    if runtime.get("bf16"):
        log.info("tflite: bf16 does not apply to TFLite models; ignored")
    spec_opts: dict[str, Any] = {"mean": list(mean), "std": list(std)}
    if names_opt is not None:
        spec_opts["class_names"] = list(class_names)
    h, w = io.input_size
    slug = f"tflite-{path.stem}-{h if h == w else f'{h}x{w}'}"
    return TFLiteSegmentationModel(
        interpreter=interp,
        io=io,
        name="tflite",
        version=make_version(slug, file_sha256(path), spec_opts),
        spec=ModelSpec("tflite", str(path), spec_opts),
        class_names=class_names,
        input_size=io.input_size,
        mean=mean,
        std=std,
        device=device,
        checkpoint=path,
    )
