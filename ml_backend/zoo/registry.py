"""``load_model`` / ``load_model_spec`` / ``list_models``: the zoo's entry points.

Names: ``espnetv2``, ``dicenet``, ``tflite``, ``torchvision:<builder>``, or a path to a
TorchScript / ``torch.export`` file (a ``.tflite`` path is taken as ``tflite``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..tomlfile import read_toml
from .base import ModelSpec, SegmentationModel, resolve_device
from .tflite import load_tflite, shared_tflite_files
from .torch_entries import (
    FAMILIES,
    SCRIPTED_SUFFIXES,
    TORCHVISION_BUILDERS,
    load_family,
    load_scripted,
    load_torchvision,
    torchvision_weights_file,
)

#: Options every entry accepts: they change how, not what, the model computes.
RUNTIME_OPTIONS = ("bf16", "channels_last")


def known_names() -> list[str]:
    """Every model name the zoo accepts (paths to TorchScript/export files aside)."""
    return [*FAMILIES, "tflite", *(f"torchvision:{b}" for b in TORCHVISION_BUILDERS)]


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or Path(name).suffix.lower() in (*SCRIPTED_SUFFIXES, ".tflite")


def load_model(
    name: str, checkpoint: str | os.PathLike[str] | None = None, *, device: str | torch.device | None = None,
    **options: Any,
) -> SegmentationModel:
    """Load a zoo model. See docs/architecture.md for names and options.

    ``device``: None/"auto" = CUDA when available, else CPU. Runtime options ``bf16`` (bfloat16
    autocast) and ``channels_last`` apply on CUDA. Unknown names or options, missing files and
    checkpoints that do not fit raise :class:`ModelError`.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(
            f"model name {name!r} is empty; use one of {', '.join(known_names())} or a model file"
        )
    name = name.strip()
    dev = resolve_device(device)
    opts = dict(options)
    runtime = {k: opts.pop(k) for k in RUNTIME_OPTIONS if k in opts}
    ckpt = str(checkpoint) if checkpoint is not None else None
    if name in FAMILIES:
        model: SegmentationModel = load_family(FAMILIES[name], ckpt, dev, opts, runtime)
    elif name == "tflite" or (name.lower().endswith(".tflite") and ckpt is None):
        model = load_tflite(ckpt if name == "tflite" else name, dev, opts, runtime)
    elif name.startswith("torchvision:"):
        model = load_torchvision(name.split(":", 1)[1], ckpt, dev, opts, runtime)
    elif _looks_like_path(name) or Path(name).is_file():
        if ckpt is not None:
            raise ModelError(f"model file {name}: checkpoint= does not apply to a TorchScript/export file")
        model = load_scripted(name, dev, opts, runtime)
    else:
        raise ModelError(
            f"unknown model name {name!r}; use one of {', '.join(known_names())}, "
            "or a path to a TorchScript / torch.export / .tflite file"
        )
    if opts:
        raise ModelError(f"model {name}: unknown option(s) {', '.join(sorted(opts))}")
    return model


def load_model_spec(
    spec: ModelSpec | Mapping[str, Any], device: str | torch.device | None = None
) -> SegmentationModel:
    """Load the model a :class:`ModelSpec` (or a dict ``{name, checkpoint, options}``) describes."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    return load_model(spec.name, spec.checkpoint, device=device, **dict(spec.options))


def read_model_specs(path: str | os.PathLike[str]) -> list[ModelSpec]:
    """Model specs from a TOML file: ``[[models]]`` tables with ``name``, ``checkpoint``, options
    (inline or under ``options``). Relative checkpoint paths are relative to the TOML file."""
    path = Path(path)
    data = read_toml(path, f"model config {path}", ModelError)
    tables = data.get("models")
    if not isinstance(tables, list) or not tables:
        raise ModelError(f"model config {path}: needs one or more [[models]] tables with a name")
    specs = []
    for i, table in enumerate(tables):
        try:
            spec = ModelSpec.from_dict(table)
        except ModelError as exc:
            raise ModelError(f"model config {path}, models[{i}]: {exc}") from None
        if spec.checkpoint and not Path(spec.checkpoint).expanduser().is_absolute():
            spec = ModelSpec(spec.name, str((path.parent / spec.checkpoint).resolve()), spec.options)
        specs.append(spec)
    return specs


def shared_model_specs() -> list[ModelSpec]:
    """A spec for every shared model: each ESPNetv2 and DiCENet checkpoint and each .tflite file."""
    specs = [
        ModelSpec(fam.name, str(path))
        for fam in FAMILIES.values()
        for _scale, _size, path in fam.shared_checkpoints()
    ]
    specs += [ModelSpec("tflite", str(p)) for p in shared_tflite_files()]
    return specs


def list_models() -> list[dict[str, Any]]:
    """What the zoo knows: one dict per entry with ``name``, ``kind``, ``trainable``, ``options``,
    ``description`` and ``checkpoints`` (files found locally: shared models, torchvision cache)."""
    out: list[dict[str, Any]] = []
    for fam in FAMILIES.values():
        found = fam.shared_checkpoints()
        out.append({
            "name": fam.name,
            "kind": "torch",
            "trainable": True,
            "options": f"scale ({', '.join(map(str, fam.scales()))}), input_size, num_classes, weights",
            "description": f"madseg's {fam.cls} (PASCAL VOC checkpoints from the shared folder)",
            "checkpoints": [str(p) for _s, _hw, p in found],
        })
    out.append({
        "name": "tflite",
        "kind": "tflite",
        "trainable": False,
        "options": "checkpoint=<file.tflite>, mean, std, class_names, num_threads",
        "description": "any TFLite segmentation model, input [1,h,w,3], output [1,h,w,C] (ai-edge-litert)",
        "checkpoints": [str(p) for p in shared_tflite_files()],
    })
    from torchvision.models import get_model_weights

    for builder in TORCHVISION_BUILDERS:
        cached = torchvision_weights_file(get_model_weights(builder).DEFAULT)
        out.append({
            "name": f"torchvision:{builder}",
            "kind": "torch",
            "trainable": True,
            "options": "weights (DEFAULT | random), input_size (520), num_classes",
            "description": "torchvision builder; weights from TORCH_HOME (fetched if missing) or checkpoint=",
            "checkpoints": [str(cached)] if cached.is_file() else [],
        })
    out.append({
        "name": "<path>.pt / .pt2",
        "kind": "torchscript/export",
        "trainable": False,
        "options": "input_size (512 or the exported size), mean, std, class_names",
        "description": "any TorchScript or torch.export program: normalised [B,3,h,w] -> logits [B,C,h,w]",
        "checkpoints": [],
    })
    return out
