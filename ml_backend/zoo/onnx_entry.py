"""ONNX segmentation models through ``onnxruntime`` (inference only; CPU or CUDA provider).

What madseg needs to know about an ONNX file, and where it comes from (first that applies):

- **input / output**: the options ``input_name`` / ``output_name``; else the model's only image
  input (a rank-4 tensor) and its first output.
- **layout**: option ``layout`` (``"NCHW"`` / ``"NHWC"``); else the model's metadata key
  ``layout``; else the input shape: channels 3 at position 1 -> NCHW, at position 3 -> NHWC.
  The output is taken in the same layout unless ``output_layout`` says otherwise.
- **size**: fixed spatial dimensions of the input are used as they are; dynamic ones take option
  ``input_size`` (default 512). An ``input_size`` that contradicts a fixed size is refused.
- **normalisation**: options ``mean`` / ``std`` (0..1 units, default ImageNet), else metadata keys
  ``mean`` / ``std`` (JSON lists). A ``uint8`` input gets the raw 0..255 pixels.
- **output kind**: option ``output`` (``"logits"``, ``"probabilities"`` or ``"labels"``); else the
  metadata key ``output``; else an integer output or one of rank 3 means labels, and a float
  output is logits unless a probe run on a grey image gives non-negative values that sum to 1
  over the classes (probabilities).
- **version**: the content of the ``.onnx`` file and of its external-data files (large exports
  keep their weights in ``<model>.onnx.data``), plus the options above; not the path.
- **classes**: option ``class_names``, else the metadata key ``class_names`` (JSON list), else
  the output's channel count (``class_0``.. or VOC names for 21). A ``labels`` output needs
  ``num_classes`` or ``class_names``.

Logits are softmaxed, probabilities renormalised, labels turned into one-hot probabilities
(255 and out-of-range labels become a uniform distribution). A model whose batch dimension is fixed
to 1 runs image by image. ``provider``: ``"auto"`` (CUDA when the device is CUDA and onnxruntime
has the CUDA provider, else CPU), ``"cpu"`` or ``"cuda"``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError
from .base import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, SegmentationModel, default_class_names, parse_size
from .checkpoints import require_file
from .hashing import file_sha256, make_version

log = logging.getLogger(__name__)

ONNX_DEFAULT_SIZE = 512
LAYOUTS = ("NCHW", "NHWC")
OUTPUT_KINDS = ("logits", "probabilities", "labels")
PROVIDERS = ("auto", "cpu", "cuda")
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_INT_TYPES = ("tensor(int64)", "tensor(int32)", "tensor(uint8)", "tensor(int8)", "tensor(int16)",
              "tensor(uint16)")


def import_onnxruntime() -> Any:
    """``onnxruntime``, or :class:`ModelError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(
            "onnx models need the onnxruntime package; install it with `pip install onnxruntime` "
            "(or onnxruntime-gpu for CUDA)"
        ) from None
    return onnxruntime


@dataclass(frozen=True)
class OnnxIO:
    """The resolved tensors and conventions of an ONNX segmentation model."""

    input_name: str
    output_name: str
    layout: str
    output_layout: str
    input_size: tuple[int, int]
    input_dtype: Any
    fixed_batch: bool
    output_rank: int
    output_is_int: bool


def _dim(d: Any) -> int | None:
    return int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else None


def _meta_json(meta: dict[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except ValueError:
        raise ModelError(f"ONNX model {path}: metadata {key!r} is not JSON ({meta[key][:80]!r})") from None


def resolve_io(
    inputs: list[tuple[str, list[Any], str]],
    outputs: list[tuple[str, list[Any], str]],
    options: dict[str, Any],
    metadata: dict[str, str],
    path: str | os.PathLike[str],
) -> OnnxIO:
    """Pick the input/output tensors, layout and size from the session's ``(name, shape, type)`` lists,
    the options (``input_name``, ``output_name``, ``layout``, ``output_layout``, ``input_size``,
    popped) and the model metadata. Pure logic; raises :class:`ModelError` naming the file."""
    path = Path(path)

    def desc(ts: list[tuple[str, list[Any], str]]) -> str:
        return ", ".join(f"{n} {list(s)} {t}" for n, s, t in ts) or "none"

    found = f"inputs: {desc(inputs)}; outputs: {desc(outputs)}"
    in_name = options.pop("input_name", None)
    out_name = options.pop("output_name", None)
    def named(ts: list[tuple[str, list[Any], str]], name: str, kind: str) -> tuple[str, list[Any], str]:
        for t in ts:
            if t[0] == name:
                return t
        raise ModelError(f"ONNX model {path}: no {kind} named {name!r} ({found})")

    if in_name is not None:
        inp = named(inputs, in_name, "input")
    else:
        images = [t for t in inputs if len(t[1]) == 4]
        if len(images) != 1 or len(inputs) != 1:
            raise ModelError(
                f"ONNX model {path}: expected one image input of rank 4 ({found}); "
                "name it with input_name= (other inputs are not supported)"
            )
        inp = images[0]
    if len(inputs) != 1:
        raise ModelError(
            f"ONNX model {path}: madseg feeds one input only, the model has {len(inputs)} ({found})"
        )
    if out_name is not None:
        out = named(outputs, out_name, "output")
    else:
        if not outputs:
            raise ModelError(f"ONNX model {path}: the model has no outputs")
        out = outputs[0]
    ishape = list(inp[1])
    if len(ishape) != 4:
        raise ModelError(
            f"ONNX model {path}: input {inp[0]} has shape {ishape}; expected an image batch of rank 4"
        )
    layout = options.pop("layout", None) or metadata.get("layout")
    if layout is None:
        if _dim(ishape[1]) == 3:
            layout = "NCHW"
        elif _dim(ishape[3]) == 3:
            layout = "NHWC"
        else:
            raise ModelError(
                f"ONNX model {path}: cannot tell the layout of input {inp[0]} {ishape}; "
                "pass layout=\"NCHW\" or layout=\"NHWC\""
            )
    layout = str(layout).upper()
    if layout not in LAYOUTS:
        raise ModelError(f"ONNX model {path}: layout={layout!r}; use NCHW or NHWC")
    out_layout = str(options.pop("output_layout", None) or metadata.get("output_layout") or layout).upper()
    if out_layout not in LAYOUTS:
        raise ModelError(f"ONNX model {path}: output_layout={out_layout!r}; use NCHW or NHWC")
    ch = ishape[1] if layout == "NCHW" else ishape[3]
    if _dim(ch) not in (None, 3):
        raise ModelError(
            f"ONNX model {path}: input {inp[0]} {ishape} has {ch} channels in {layout}; madseg feeds RGB"
        )
    hw = (ishape[2], ishape[3]) if layout == "NCHW" else (ishape[1], ishape[2])
    fixed = (_dim(hw[0]), _dim(hw[1]))
    size_opt = options.pop("input_size", None)
    if fixed[0] is not None and fixed[1] is not None:
        size = (fixed[0], fixed[1])
        if size_opt is not None and parse_size(size_opt) != size:
            raise ModelError(
                f"ONNX model {path}: input_size={size_opt!r} but the model's input is fixed at "
                f"{size[0]}x{size[1]}; drop input_size"
            )
    else:
        size = parse_size(size_opt if size_opt is not None else ONNX_DEFAULT_SIZE)
    itype = inp[2]
    if itype in _FLOAT_TYPES:
        dtype: Any = _FLOAT_TYPES[itype]
    elif itype == "tensor(uint8)":
        dtype = np.uint8
    else:
        raise ModelError(f"ONNX model {path}: input type {itype} is not supported; expected float or uint8")
    orank = len(out[1])
    if orank not in (3, 4):
        raise ModelError(
            f"ONNX model {path}: output {out[0]} has shape {list(out[1])}; expected scores [N, C, h, w] / "
            "[N, h, w, C] or labels [N, h, w]"
        )
    return OnnxIO(
        input_name=inp[0], output_name=out[0], layout=layout, output_layout=out_layout, input_size=size,
        input_dtype=dtype, fixed_batch=_dim(ishape[0]) == 1, output_rank=orank,
        output_is_int=out[2] in _INT_TYPES,
    )


def scores_to_probs(y: np.ndarray, kind: str, layout: str, num_classes: int) -> torch.Tensor:
    """Raw model output -> probabilities [B, C, h, w] float32.

    ``kind`` logits: softmax over classes; probabilities: clipped at 0 and renormalised; labels
    ([B, h, w] or [B, 1, h, w] / [B, h, w, 1] integers): one-hot, with out-of-range values (e.g. 255)
    spread uniformly over the classes.
    """
    if kind == "labels":
        lab = torch.from_numpy(np.asarray(y).astype(np.int64))
        if lab.dim() == 4:
            lab = lab[:, 0] if layout == "NCHW" else lab[..., 0]
        valid = (lab >= 0) & (lab < num_classes)
        onehot = F.one_hot(lab.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
        uniform = torch.full_like(onehot, 1.0 / num_classes)
        return torch.where(valid[:, None], onehot, uniform)
    t = torch.from_numpy(np.ascontiguousarray(y)).float()
    if layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
    if kind == "logits":
        return torch.softmax(t, dim=1)
    t = t.clamp_min(0)
    return t / t.sum(1, keepdim=True).clamp_min(1e-12)


def looks_like_probabilities(y: np.ndarray, layout: str) -> bool:
    """True when a float output is non-negative and sums to 1 over the class axis everywhere."""
    axis = 1 if layout == "NCHW" else 3
    y = np.asarray(y, dtype=np.float64)
    return bool(y.min() >= 0 and np.allclose(y.sum(axis), 1.0, atol=1e-3))


class OnnxSegmentationModel(SegmentationModel):
    """An ONNX model run by an ``onnxruntime.InferenceSession`` (``module`` is None, inference only).

    Calls are serialised with a lock: one session, many threads in the ML backend.
    """

    def __init__(self, *, session: Any, io: OnnxIO, output_kind: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session = session
        self._io = io
        self.output_kind = output_kind
        self._lock = threading.Lock()

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers in use."""
        return list(self._session.get_providers())

    def run_raw(self, batch: torch.Tensor) -> np.ndarray:
        """Normalised batch [B, 3, h, w] -> the model's raw output (numpy), run in one call or, for
        a batch-1 model, image by image."""
        io = self._io
        x = batch.detach().float().cpu()
        if io.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        arr = x.contiguous().numpy()
        if io.input_dtype == np.uint8:
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        elif io.input_dtype != np.float32:
            arr = arr.astype(io.input_dtype)
        with self._lock:
            if io.fixed_batch and arr.shape[0] > 1:
                parts = [self._session.run([io.output_name], {io.input_name: arr[i : i + 1]})[0]
                         for i in range(arr.shape[0])]
                return np.concatenate(parts)
            return self._session.run([io.output_name], {io.input_name: arr})[0]

    def _probs(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ModelError(f"{self.name}: expected a batch [B, 3, h, w], got shape {tuple(batch.shape)}")
        if tuple(batch.shape[2:]) != self.input_size:
            raise ModelError(
                f"{self.name}: input batch is {tuple(batch.shape[2:])}, the model takes {self.input_size}"
            )
        y = self.run_raw(batch)
        probs = scores_to_probs(y, self.output_kind, self._io.output_layout, self.num_classes)
        if probs.shape[:2] != (batch.shape[0], self.num_classes):
            raise ModelError(
                f"{self.name}: output {list(y.shape)} gives {tuple(probs.shape[:2])} (batch, classes); "
                f"expected ({batch.shape[0]}, {self.num_classes})"
            )
        if tuple(probs.shape[2:]) != tuple(batch.shape[2:]):
            mode = "nearest" if self.output_kind == "labels" else "bilinear"
            kwargs = {} if mode == "nearest" else {"align_corners": False}
            probs = F.interpolate(probs, size=batch.shape[2:], mode=mode, **kwargs)
        return probs.to(self.device)


def external_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX model's weights live in (``torch.onnx`` writes large models as
    ``model.onnx`` + ``model.onnx.data``), sorted. With the ``onnx`` package the model's own list of
    locations is read; without it, files next to the model named ``<model file name>.*`` /
    ``<stem>.data`` / ``<stem>.bin`` are taken."""
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:  # unreadable here too: onnxruntime has already said why
            return []
        found = set()
        for init in proto.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                loc = next((e.value for e in init.external_data if e.key == "location"), None)
                if loc:
                    found.add((path.parent / loc).resolve())
        return sorted(p for p in found if p.is_file())
    cands = [*path.parent.glob(path.name + ".*"), path.with_suffix(".data"), path.with_suffix(".bin")]
    return sorted({p.resolve() for p in cands if p.is_file() and p.resolve() != path.resolve()})


def content_hash(path: Path) -> str:
    """SHA-256 over the model file and its external-data files (content only, not their paths)."""
    import hashlib

    h = hashlib.sha256(file_sha256(path).encode())
    for extra in external_data_files(path):
        h.update(f"|{extra.name}:{file_sha256(extra)}".encode())
    return h.hexdigest()


def _providers(ort: Any, provider: str, device: torch.device, path: Path) -> list[str]:
    available = list(ort.get_available_providers())
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ModelError(
                f"ONNX model {path}: provider='cuda' but this onnxruntime has only {', '.join(available)}; "
                "install onnxruntime-gpu or use provider='cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto" and device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _floats3(value: Any, what: str, path: Path) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ModelError(f"ONNX model {path}: {what}={value!r} must be a list of 3 numbers") from None
    if len(vals) != 3:
        raise ModelError(f"ONNX model {path}: {what}={value!r} must be a list of 3 numbers")
    return vals  # type: ignore[return-value]


def load_onnx(
    checkpoint: str | None, device: torch.device, options: dict[str, Any], runtime: dict[str, Any]
) -> OnnxSegmentationModel:
    """Load an ``.onnx`` file (see the module docstring for the options, all popped from ``options``)."""
    ort = import_onnxruntime()
    if checkpoint is None:
        raise ModelError("onnx: no model file given; use name = \"onnx\" with checkpoint = \"model.onnx\"")
    path = require_file(checkpoint, "ONNX model")
    provider = str(options.pop("provider", "auto")).lower()
    if provider not in PROVIDERS:
        raise ModelError(f"ONNX model {path}: provider={provider!r}; use auto, cpu or cuda")
    threads = int(options.pop("num_threads", 0) or 0)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=so,
                                       providers=_providers(ort, provider, device, path))
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"ONNX model {path}: cannot be loaded by onnxruntime ({first[:200]}); is it an .onnx file?"
        ) from None
    meta = dict(session.get_modelmeta().custom_metadata_map or {})
    inputs = [(i.name, list(i.shape), i.type) for i in session.get_inputs()]
    outputs = [(o.name, list(o.shape), o.type) for o in session.get_outputs()]
    io = resolve_io(inputs, outputs, options, meta, path)

    if io.input_dtype == np.uint8:
        mean_default: Any = (0.0, 0.0, 0.0)
        std_default: Any = (1 / 255, 1 / 255, 1 / 255)
    else:
        mean_default = _meta_json(meta, "mean", path) or IMAGENET_MEAN
        std_default = _meta_json(meta, "std", path) or IMAGENET_STD
    mean = _floats3(options.pop("mean", mean_default), "mean", path)
    std = _floats3(options.pop("std", std_default), "std", path)
    if min(std) <= 0:
        raise ModelError(f"ONNX model {path}: std={list(std)} must be positive")
    names_opt = options.pop("class_names", None)
    names_meta = _meta_json(meta, "class_names", path)
    num_opt = options.pop("num_classes", None)
    kind = options.pop("output", None) or meta.get("output")
    if kind is None and (io.output_is_int or io.output_rank == 3):
        kind = "labels"
    kind_given = kind is not None
    if kind is not None and kind not in OUTPUT_KINDS:
        raise ModelError(f"ONNX model {path}: output={kind!r}; use one of {', '.join(OUTPUT_KINDS)}")

    names: tuple[str, ...] | None = None
    if names_opt is not None:
        names = tuple(str(n) for n in names_opt)
    elif isinstance(names_meta, list) and names_meta:
        names = tuple(str(n) for n in names_meta)
    h, w = io.input_size
    probe: np.ndarray | None = None
    grey = np.full((1, 3, h, w) if io.layout == "NCHW" else (1, h, w, 3), 0.0, np.float32)
    if io.input_dtype == np.uint8:
        grey = np.full(grey.shape, 128, np.uint8)
    else:
        grey = grey.astype(io.input_dtype)
    try:
        probe = session.run([io.output_name], {io.input_name: grey})[0]
    except Exception as exc:  # the user's model failed on a plain input: say so, with the shapes
        raise ModelError(
            f"ONNX model {path} failed on an input {list(grey.shape)} ({type(exc).__name__}: "
            f"{str(exc).strip()[:200]}); pass input_size= (or layout=) the model expects"
        ) from None
    if kind is None:
        kind = "probabilities" if looks_like_probabilities(probe, io.output_layout) else "logits"
    if kind == "labels":
        n = len(names) if names is not None else (int(num_opt) if num_opt is not None else None)
        if n is None:
            raise ModelError(
                f"ONNX model {path} outputs labels; pass num_classes= or class_names= (the label values "
                "0..C-1)"
            )
        num_classes = n
    else:
        if probe.ndim != 4:
            raise ModelError(
                f"ONNX model {path}: output={kind} needs a rank-4 output, got {list(probe.shape)}"
            )
        num_classes = int(probe.shape[1] if io.output_layout == "NCHW" else probe.shape[3])
        if num_opt is not None and int(num_opt) != num_classes:
            raise ModelError(
                f"ONNX model {path}: num_classes={num_opt} but the output has {num_classes} classes"
            )
    if names is None:
        names = default_class_names(num_classes)
    if len(names) != num_classes:
        raise ModelError(f"ONNX model {path}: {num_classes} output classes but {len(names)} class_names")
    if runtime.get("bf16"):
        log.info("onnx: bf16 does not apply to ONNX models; ignored")

    spec_opts: dict[str, Any] = {
        "input_name": io.input_name, "output_name": io.output_name, "layout": io.layout,
        "output_layout": io.output_layout, "input_size": [h, w], "mean": list(mean), "std": list(std),
        "output": kind,
    }
    if names_opt is not None:
        spec_opts["class_names"] = list(names)
    if kind == "labels" and names_opt is None:
        spec_opts["num_classes"] = num_classes
    version_opts = {k: v for k, v in spec_opts.items()} | {"class_names": list(names)}
    slug = f"onnx-{path.stem}-{h if h == w else f'{h}x{w}'}"
    model = OnnxSegmentationModel(
        session=session,
        io=io,
        output_kind=kind,
        name="onnx",
        version=make_version(slug, content_hash(path), version_opts),
        spec=ModelSpec("onnx", str(path), spec_opts | ({"provider": provider} if provider != "auto" else {})),
        class_names=names,
        input_size=(h, w),
        mean=mean,
        std=std,
        device=device,
        checkpoint=path,
    )
    log.debug("onnx %s: %s, output %s (%s), providers %s", path.name, io, kind,
              "given" if kind_given else "detected", model.providers)
    return model
