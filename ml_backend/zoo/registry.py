"""``load_model`` / ``load_model_spec`` / ``list_models``: the zoo's entry points.

Names: ``espnetv2``, ``dicenet``, ``tflite``, ``torchvision:<builder>``, ``onnx`` (or
``onnx:<file>``), ``hf`` (or ``hf:<folder>``), or a path to a TorchScript / ``torch.export`` file
(a ``.tflite`` path is taken as ``tflite``, an ``.onnx`` path as ``onnx``). Every entry accepts
``class_map`` (see :mod:`ml_backend.zoo.classmap`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..tomlfile import read_toml
from .base import ModelSpec, SegmentationModel, resolve_device
from .classmap import apply_class_map, resolve_class_map_ref, shipped_class_maps
from .hf_entry import load_hf
from .onnx_entry import load_onnx
from .options import check_options, option_problem
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
    return [*FAMILIES, "tflite", "onnx", "hf", *(f"torchvision:{b}" for b in TORCHVISION_BUILDERS)]


#: Entries named ``<prefix>:<path>``: the path is the model file/folder (``checkpoint`` must be unset).
PATH_PREFIXES = ("onnx:", "hf:")


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or Path(name).suffix.lower() in (*SCRIPTED_SUFFIXES, ".tflite")


def split_path_name(name: str, checkpoint: str | None) -> tuple[str, str | None]:
    """``"onnx:m.onnx"`` -> (``"onnx"``, ``"m.onnx"``); ``"x.onnx"`` -> (``"onnx"``, ``"x.onnx"``);
    other names unchanged. A checkpoint next to a path in the name is refused."""
    for prefix in PATH_PREFIXES:
        if name.startswith(prefix):
            if checkpoint is not None:
                raise ModelError(
                    f"model {name}: the name already gives the {prefix[:-1]} path; drop checkpoint="
                )
            return prefix[:-1], name[len(prefix):]
    if name.lower().endswith(".onnx") and checkpoint is None:
        return "onnx", name
    return name, checkpoint


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
    opts = check_options(options, f"model {name}")
    dev = resolve_device(device)
    class_map = opts.pop("class_map", None)
    runtime = {k: opts.pop(k) for k in RUNTIME_OPTIONS if k in opts}
    ckpt = str(checkpoint) if checkpoint is not None else None
    name, ckpt = split_path_name(name, ckpt)
    if name in FAMILIES:
        model: SegmentationModel = load_family(FAMILIES[name], ckpt, dev, opts, runtime)
    elif name == "tflite" or (name.lower().endswith(".tflite") and ckpt is None):
        model = load_tflite(ckpt if name == "tflite" else name, dev, opts, runtime)
    elif name.startswith("torchvision:"):
        model = load_torchvision(name.split(":", 1)[1], ckpt, dev, opts, runtime)
    elif name == "onnx":
        model = load_onnx(ckpt, dev, opts, runtime)
    elif name == "hf":
        model = load_hf(ckpt, dev, opts, runtime)
    elif _looks_like_path(name) or Path(name).is_file():
        if ckpt is not None:
            raise ModelError(f"model file {name}: checkpoint= does not apply to a TorchScript/export file")
        model = load_scripted(name, dev, opts, runtime)
    else:
        raise ModelError(
            f"unknown model name {name!r}; use one of {', '.join(known_names())}, "
            "or a path to a TorchScript / torch.export / .tflite / .onnx file"
        )
    if opts:
        raise ModelError(f"model {name}: unknown option(s) {', '.join(sorted(opts))}")
    if class_map is not None:
        model = apply_class_map(model, resolve_class_map_ref(class_map))
    return model


def load_model_spec(
    spec: ModelSpec | Mapping[str, Any], device: str | torch.device | None = None
) -> SegmentationModel:
    """Load the model a :class:`ModelSpec` (or a dict ``{name, checkpoint, options}``) describes."""
    spec = ModelSpec.of(spec)
    return load_model(spec.name, spec.checkpoint, device=device, **dict(spec.options))


def read_model_specs(path: str | os.PathLike[str]) -> list[ModelSpec]:
    """Model specs from a TOML file: ``[[models]]`` tables with ``name``, ``checkpoint``, options
    (inline or under ``options``). Relative checkpoint paths are relative to the TOML file."""
    path = Path(path)
    data = read_toml(path, f"model config {path}", ModelError)
    tables = data.get("models")
    if not isinstance(tables, list) or not tables:
        raise ModelError(f"model config {path}: needs one or more [[models]] tables with a name")
    return [model_spec_from_table(table, path, f"models[{i}]") for i, table in enumerate(tables)]


def model_spec_from_table(
    table: Any,
    path: Path,
    where: str,
    *,
    resolve: Callable[[str, str, str], str] | None = None,
    error: Callable[[str], Exception] | None = None,
    option_prefix: str = "",
) -> ModelSpec:
    """The one reader of a model TOML table (``name``, ``checkpoint``, ``options``; options may also
    stand inline) of the file ``path`` (``where`` names the table): ``[[models]]`` files,
    ``madseg score --config`` and the experiment's ``[target]`` / ``[[competitors]]``.

    Wrongly typed values (``checkpoint = 5``, ``options = "x"``, ``seed = "x"``) raise one error naming
    the file and the key. Paths — the checkpoint, ``onnx:``/``hf:`` names, model-file names, the
    options ``class_map`` (a file; shipped names stay) and ``pretrained`` — go through
    ``resolve(value, key, must)`` (``must``: "exists", "file" or "dir"); by default they are made
    absolute against the file's folder without checks. ``error(message)`` builds the exception
    (default :class:`ModelError` ``"model config <path>, <where>: <message>"``); ``option_prefix``
    is put before option names in messages (e.g. ``"options."``).
    """
    base = path.parent

    def fail(msg: str) -> Exception:
        return error(msg) if error is not None else ModelError(f"model config {path}, {where}: {msg}")

    def rel(p: str, key: str, must: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    resolve = resolve or rel
    if not isinstance(table, Mapping):
        raise fail(f"must be a table with a name, got {table!r}")
    try:
        spec = ModelSpec.from_dict(table)
    except ModelError as exc:
        raise fail(str(exc)) from None
    opts = dict(spec.options)
    for key, value in opts.items():
        problem = option_problem(str(key), value)
        if problem:
            raise fail(f"{option_prefix}{key} {problem}")
    name, ckpt = spec.name, spec.checkpoint
    prefix = next((p for p in PATH_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        name = prefix + resolve(name[len(prefix):], "name", "exists")
    elif _looks_like_path(name) or name.lower().endswith((".onnx", ".pte")):  # a model file
        name = resolve(name, "name", "file")
    if ckpt:
        ckpt = resolve(ckpt, "checkpoint", "exists")
    if "class_map" in opts:
        try:
            ref = resolve_class_map_ref(opts["class_map"], base)
        except ModelError as exc:
            raise fail(f"{option_prefix}class_map: {exc}") from None
        shipped = ref in shipped_class_maps()
        opts["class_map"] = ref if shipped else resolve(ref, f"{option_prefix}class_map", "file")
    if "pretrained" in opts:
        opts["pretrained"] = resolve(opts["pretrained"], f"{option_prefix}pretrained", "dir")
    return ModelSpec(name, ckpt, opts)


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
        "name": "onnx",
        "kind": "onnx",
        "trainable": False,
        "options": "checkpoint=<file.onnx>, input_name, output_name, layout (NCHW|NHWC), input_size (if "
                   "dynamic), mean, std, output (logits|probabilities|labels), class_names, num_classes, "
                   "provider (auto|cpu|cuda), num_threads",
        "description": "any ONNX segmentation model through onnxruntime; layout, size and output kind "
                       "read from the model where possible",
        "example": '{ name = "onnx", checkpoint = "models/deeplab.onnx", options = { input_size = 512 } }',
        "checkpoints": [],
    })
    out.append({
        "name": "hf",
        "kind": "transformers",
        "trainable": True,
        "options": "checkpoint=<local folder> (or pretrained=<folder> with a fine-tuned .pth), input_size, "
                   "mean, std (default: the folder's image processor), class_names",
        "description": "a local Hugging Face transformers semantic-segmentation folder (SegFormer, UperNet, "
                       "DPT, MobileViT, ...); no network",
        "example": '{ name = "hf", checkpoint = "models/segformer-b0-ade-512", '
                   'options = { class_map = "ade20k-voc" } }',
        "checkpoints": [],
    })
    out.append({
        "name": "<path>.pt / .pt2",
        "kind": "torchscript/export",
        "trainable": False,
        "options": "input_size (512 or the exported size), mean, std, class_names",
        "description": "any TorchScript or torch.export program: normalised [B,3,h,w] -> logits [B,C,h,w]",
        "checkpoints": [],
    })
    out.append({
        "name": "class_map=<map>",
        "kind": "option of every entry",
        "trainable": True,
        "options": f"shipped maps: {', '.join(shipped_class_maps())}; or a .toml/.json map file",
        "description": "predict in another class list (e.g. an ADE20K model in a VOC experiment); trainable "
                       "when its model is; see ml_backend/zoo/classmaps/README.md",
        "example": '{ name = "onnx", checkpoint = "ade.onnx", options = { class_map = "ade20k-voc" } }',
        "checkpoints": [],
    })
    examples = {
        "tflite": '{ name = "tflite", checkpoint = "{shared}/models/tflite/deeplabv3_mnv2_dm05_voc.tflite" }',
        "<path>.pt / .pt2": '{ name = "models/mynet.pt2", options = { input_size = 512 } }',
        **{fam: f'{{ name = "{fam}", options = {{ scale = {f.default_scale}, input_size = 384 }} }}'
           for fam, f in FAMILIES.items()},
    }
    for e in out:
        tv = f'{{ name = "{e["name"]}", options = {{ input_size = 520 }} }}'
        fallback = tv if e["name"].startswith("torchvision:") else ""
        e.setdefault("example", examples.get(e["name"]) or fallback)
    return out
