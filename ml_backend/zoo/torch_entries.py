"""Torch zoo entries: ESPNetv2 / DiCENet (madseg's own networks), torchvision builders, and
TorchScript / ``torch.export`` files brought by the user.

Each ``load_*`` function takes the entry's options as a dict, pops what it knows and leaves
unknown keys for the caller to report.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ModelError
from ..shared import shared_dir
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    TorchSegmentationModel,
    default_class_names,
    parse_size,
)
from .checkpoints import load_into, read_sidecar, read_state_dict, require_file, state_mismatches
from .hashing import file_sha256, make_version, state_dict_sha256

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = ("random", "none")


def is_random(weights: Any) -> bool:
    """True for ``weights=None`` / ``"random"`` / ``"none"`` (random initialisation)."""
    return weights is None or str(weights).strip().lower() in RANDOM_WEIGHTS


def _class_names(options: dict[str, Any], num_classes: int | None) -> tuple[int, tuple[str, ...] | None]:
    names = options.pop("class_names", None)
    if names is not None:
        names = tuple(str(n) for n in names)
        if num_classes is not None and int(num_classes) != len(names):
            raise ModelError(f"class_names has {len(names)} names but num_classes={num_classes}")
        return len(names), names
    return (int(num_classes) if num_classes is not None else 21), None


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def hw_slug(size: tuple[int, int]) -> str:
    """``"512"`` for a square (h, w) size, else ``"384x512"`` (the size part of version slugs)."""
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


# --------------------------------------------------------------------------------------------
# ESPNetv2 and DiCENet
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetFamily:
    """One of madseg's own networks: where its class lives and where its shared checkpoints are."""

    name: str
    module: str
    cls: str
    scales_attr: str
    default_scale: float
    default_size: int = 384

    def net_module(self) -> Any:
        return importlib.import_module(self.module)

    def scales(self) -> tuple[float, ...]:
        return tuple(getattr(self.net_module(), self.scales_attr))

    def build(self, scale: float, num_classes: int) -> nn.Module:
        return getattr(self.net_module(), self.cls)(scale, num_classes=num_classes)

    def parse_name(self, path: str | os.PathLike[str]) -> tuple[float, tuple[int, int]] | None:
        return self.net_module().parse_checkpoint_name(path)

    def size_multiple(self) -> int:
        return int(getattr(self.net_module(), "SIZE_MULTIPLE", 16))

    def shared_folder(self) -> Path:
        return shared_dir(required=False) / "models" / self.name

    def shared_checkpoints(self) -> list[tuple[float, tuple[int, int], Path]]:
        """(scale, native size, path) of every shared checkpoint of this family, sorted."""
        folder = self.shared_folder()
        found = []
        if folder.is_dir():
            for p in sorted(folder.glob(f"{self.name}_s_*.pth")):
                parsed = self.parse_name(p)
                if parsed:
                    found.append((parsed[0], parsed[1], p))
        return sorted(found, key=lambda t: (t[0], t[1]))


FAMILIES: dict[str, NetFamily] = {
    "espnetv2": NetFamily("espnetv2", "ml_backend.nets.espnetv2", "ESPNetv2Seg", "ESPNETV2_SCALES", 2.0),
    "dicenet": NetFamily("dicenet", "ml_backend.nets.dicenet", "DiCENetSeg", "DICENET_SCALES", 1.75),
}


def _shared_for(fam: NetFamily, scale: float, size: tuple[int, int] | None) -> Path:
    cands = [(s, hw, p) for s, hw, p in fam.shared_checkpoints() if s == scale]
    if not cands:
        raise ModelError(
            f"{fam.name}: no shared checkpoint for scale {scale} in {fam.shared_folder()}; "
            f"pass checkpoint=<file>, another scale, or weights='random'"
        )
    exact = [c for c in cands if size is not None and c[1] == tuple(size)]
    return (exact or sorted(cands, key=lambda c: c[1][0] * c[1][1]))[-1][2]


def _infer_scale(fam: NetFamily, state: Mapping[str, torch.Tensor], num_classes: int) -> float | None:
    """The scale whose architecture fits ``state`` exactly (built on the meta device: no memory)."""
    for scale in fam.scales():
        with torch.device("meta"):
            net = fam.build(scale, num_classes)
        if not state_mismatches(net, state):
            return scale
    return None


def load_family(
    fam: NetFamily,
    checkpoint: str | None,
    device: torch.device,
    options: dict[str, Any],
    runtime: dict[str, Any],
) -> TorchSegmentationModel:
    """Build an ESPNetv2/DiCENet model.

    Options: ``scale``, ``input_size`` (default: the checkpoint's training size), ``num_classes``
    (21), ``class_names``, ``weights`` (``"pretrained"`` = the shared checkpoint; ``None``/
    ``"random"`` = random init with ``seed``). The scale and size may be implied by the checkpoint
    (its madseg sidecar, its file name, or its parameter shapes).
    """
    scale = options.pop("scale", None)
    size_opt = options.pop("input_size", None)
    num_classes = options.pop("num_classes", None)
    weights = options.pop("weights", "pretrained")
    seed = int(options.pop("seed", 0))
    if not is_random(weights) and str(weights).lower() not in ("pretrained", "default", "shared"):
        raise ModelError(
            f"{fam.name}: weights={weights!r} unknown; use 'pretrained', 'random' or checkpoint=<file>"
        )
    # a checkpoint wins over weights=: the options that built a model also reload its fine-tunes
    random_init = is_random(weights) and checkpoint is None
    names_opt = options.get("class_names")
    native: tuple[int, int] | None = None
    ckpt: Path | None = None
    if checkpoint is not None:
        ckpt = require_file(checkpoint, f"{fam.name} checkpoint")
        side = read_sidecar(ckpt)
        model_info = (side or {}).get("model") or {}
        if model_info.get("name") == fam.name:
            sopts = model_info.get("options") or {}
            scale = scale if scale is not None else sopts.get("scale")
            native = parse_size(sopts["input_size"]) if sopts.get("input_size") else None
            if num_classes is None and names_opt is None:
                num_classes = sopts.get("num_classes")
                if sopts.get("class_names") is not None:
                    options["class_names"] = sopts["class_names"]
        parsed = fam.parse_name(ckpt)
        if parsed is not None:
            scale = scale if scale is not None else parsed[0]
            native = native or parsed[1]
    num_classes, class_names = _class_names(options, num_classes)
    if scale is not None:
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise ModelError(f"{fam.name}: scale={scale!r} is not a number") from None
    if ckpt is None and not random_init:
        ckpt = _shared_for(fam, scale if scale is not None else fam.default_scale,
                           parse_size(size_opt) if size_opt is not None else None)
        scale, native = fam.parse_name(ckpt)  # type: ignore[misc]
    state = read_state_dict(ckpt, f"{fam.name} checkpoint") if ckpt is not None else None
    if scale is None and state is not None:
        scale = _infer_scale(fam, state, num_classes)
        if scale is None:
            raise ModelError(
                f"checkpoint {ckpt} does not fit {fam.name} at any scale {fam.scales()} with "
                f"{num_classes} classes; check the model name and num_classes"
            )
    scale = float(scale if scale is not None else fam.default_scale)
    if scale not in fam.scales():
        raise ModelError(
            f"{fam.name}: unsupported scale {scale}; choose one of {', '.join(map(str, fam.scales()))}"
        )
    size = parse_size(size_opt) if size_opt is not None else (native or (fam.default_size, fam.default_size))
    mult = fam.size_multiple()
    if size[0] % mult or size[1] % mult:
        raise ModelError(f"{fam.name}: input_size {size[0]}x{size[1]} must be multiples of {mult}")

    if state is not None:
        net = fam.build(scale, num_classes)
        load_into(net, state, ckpt, f"{fam.name} scale {scale} with {num_classes} classes")
        content = file_sha256(ckpt)  # type: ignore[arg-type]
    else:
        net = _seeded(seed, lambda: fam.build(scale, num_classes))
        content = state_dict_sha256(net.state_dict())

    spec_opts: dict[str, Any] = {"scale": scale, "input_size": [size[0], size[1]], "num_classes": num_classes}
    if class_names is not None:
        spec_opts["class_names"] = list(class_names)
    if random_init:
        spec_opts.update(weights="random", seed=seed)
    return torch_model(
        name=fam.name,
        slug=f"{fam.name}-s{scale}-{hw_slug(size)}",
        content=content,
        spec=ModelSpec(fam.name, str(ckpt) if ckpt else None, spec_opts),
        module=net,
        class_names=class_names or default_class_names(num_classes),
        input_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        device=device,
        checkpoint=ckpt,
        trainable=True,
        runtime=runtime,
    )


def torch_model(
    *,
    name: str,
    slug: str,
    content: str,
    spec: ModelSpec,
    runtime: dict[str, Any],
    version_opts: Mapping[str, Any] | None = None,
    model_cls: type[TorchSegmentationModel] = TorchSegmentationModel,
    **kwargs: Any,
) -> TorchSegmentationModel:
    """A ``model_cls`` built with the runtime's ``bf16`` / ``channels_last`` and its content version
    ``<slug>[-bf16]@<hash>``: the hash covers ``content`` and ``version_opts`` (default: the spec's
    options less ``weights`` and ``seed``) plus ``precision="bf16"`` when bf16 is in effect.
    ``kwargs`` go to the model (module, class_names, input_size, mean, std, device, ...)."""
    bf16 = bool(runtime.get("bf16", False))
    model = model_cls(
        name=name,
        version="",
        spec=spec,
        bf16=bf16,
        channels_last=runtime.get("channels_last"),
        **kwargs,
    )
    if version_opts is None:
        version_opts = {k: v for k, v in spec.options.items() if k not in ("weights", "seed")}
    version_opts = dict(version_opts)
    if model.bf16:
        version_opts["precision"] = "bf16"
    model.version = make_version(slug + ("-bf16" if model.bf16 else ""), content, version_opts)
    return model


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------

TORCHVISION_BUILDERS: tuple[str, ...] = (
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
)
TORCHVISION_INPUT_SIZE = 520


class MainOutput(nn.Module):
    """Wraps a torchvision segmentation model (dict output) so forward returns ``out`` logits.

    The wrapped network is ``self.net`` (state-dict keys ``net.*``); subclasses override ``forward``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, Mapping):
            return out["out"]
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def torchvision_weights_file(weights: Any) -> Path:
    """Where torchvision keeps a weights enum's file: ``$TORCH_HOME/hub/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _torchvision_weights(builder: str, weights: Any) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(builder)
    if str(weights).upper() == "DEFAULT":
        return enum.DEFAULT
    key = str(weights).split(".")[-1]
    try:
        return enum[key]
    except KeyError:
        raise ModelError(
            f"torchvision:{builder}: unknown weights {weights!r}; use DEFAULT, "
            f"{', '.join(w.name for w in enum)}, 'random' or checkpoint=<file>"
        ) from None


def _fetch_torchvision_weights(builder: str, weights: Any) -> Path:
    """The local weights file, downloaded by torch.hub when missing (clear error without network)."""
    dest = torchvision_weights_file(weights)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, map_location="cpu")
    except Exception as exc:  # any download failure (no network, HTTP, hash) -> one clear message
        raise ModelError(
            f"torchvision:{builder}: weights {weights} are not in {dest} and could not be downloaded "
            f"({type(exc).__name__}: {str(exc)[:200]}); pass checkpoint=<local .pth file>, or pre-seed "
            f"TORCH_HOME (copy {dest.name} from {weights.url} into {dest.parent})"
        ) from None
    if not dest.is_file():
        raise ModelError(f"torchvision:{builder}: download of {weights.url} did not produce {dest}")
    return dest


def _classifier_classes(builder: str, state: Mapping[str, torch.Tensor]) -> int | None:
    key = "classifier.high_classifier.weight" if builder.startswith("lraspp") else "classifier.4.weight"
    t = state.get(key)
    return int(t.shape[0]) if t is not None else None


def load_torchvision(
    builder: str,
    checkpoint: str | None,
    device: torch.device,
    options: dict[str, Any],
    runtime: dict[str, Any],
) -> TorchSegmentationModel:
    """A torchvision segmentation builder with its weights enum, a local checkpoint or random weights.

    Options: ``weights`` (``"DEFAULT"``, an enum member name, or ``None``/``"random"``),
    ``input_size`` (default 520), ``num_classes``, ``class_names``, ``seed`` (random weights).
    """
    import torchvision.models.segmentation as seg

    if builder not in TORCHVISION_BUILDERS:
        raise ModelError(
            f"unknown torchvision builder {builder!r}; choose one of "
            f"{', '.join('torchvision:' + b for b in TORCHVISION_BUILDERS)}"
        )
    weights_opt = options.pop("weights", "DEFAULT")
    size_opt = options.pop("input_size", None)
    num_classes = options.pop("num_classes", None)
    if checkpoint is not None:  # a madseg fine-tune's sidecar supplies the options it was trained with
        info = (read_sidecar(checkpoint) or {}).get("model") or {}
        if info.get("name") == f"torchvision:{builder}":
            sopts = info.get("options") or {}
            size_opt = size_opt if size_opt is not None else sopts.get("input_size")
            if options.get("class_names") is None and sopts.get("class_names") is not None:
                options["class_names"] = sopts["class_names"]
    size = parse_size(size_opt if size_opt is not None else TORCHVISION_INPUT_SIZE)
    seed = int(options.pop("seed", 0))
    build = getattr(seg, builder)
    name = f"torchvision:{builder}"
    tv_names: tuple[str, ...] | None = None
    state = None
    ckpt: Path | None = None
    if checkpoint is not None:
        ckpt = require_file(checkpoint, f"{name} checkpoint")
        state = read_state_dict(ckpt, f"{name} checkpoint")
        if num_classes is None and options.get("class_names") is None:
            num_classes = _classifier_classes(builder, state)
    elif not is_random(weights_opt):
        weights = _torchvision_weights(builder, weights_opt)
        ckpt = _fetch_torchvision_weights(builder, weights)
        state = read_state_dict(ckpt, f"{name} weights")
        tv_names = tuple(weights.meta["categories"])
        if num_classes is None and options.get("class_names") is None:
            num_classes = len(tv_names)
    num_classes, class_names = _class_names(options, num_classes)
    if class_names is None and tv_names is not None and len(tv_names) == num_classes:
        class_names = ("background",) + tv_names[1:] if tv_names[0] == "__background__" else tv_names
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if not builder.startswith("lraspp"):
        kwargs["aux_loss"] = bool(state is not None and any(k.startswith("aux_classifier.") for k in state))
    if state is not None:
        net = build(**kwargs)
        load_into(net, state, ckpt, f"{name} with {num_classes} classes")
        content = file_sha256(ckpt)  # type: ignore[arg-type]
    else:
        net = _seeded(seed, lambda: build(**kwargs))
        content = state_dict_sha256(net.state_dict())
    spec_opts: dict[str, Any] = {"input_size": [size[0], size[1]], "num_classes": num_classes}
    if class_names is not None and class_names != default_class_names(num_classes):
        spec_opts["class_names"] = list(class_names)
    if state is None:
        spec_opts.update(weights="random", seed=seed)
    elif checkpoint is None:
        spec_opts["weights"] = str(weights_opt)
    return torch_model(
        name=name,
        slug=f"tv-{builder}-{hw_slug(size)}",
        content=content,
        spec=ModelSpec(name, str(ckpt) if checkpoint is not None and ckpt else None, spec_opts),
        module=MainOutput(net),
        class_names=class_names or default_class_names(num_classes),
        input_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        device=device,
        checkpoint=ckpt,
        trainable=True,
        ckpt_prefix="net.",
        runtime=runtime,
    )


# --------------------------------------------------------------------------------------------
# TorchScript / torch.export files
# --------------------------------------------------------------------------------------------

SCRIPTED_SUFFIXES = (".pt", ".pt2", ".ts", ".jit", ".torchscript", ".pth")
SCRIPTED_INPUT_SIZE = 512


class ScriptedSegmentationModel(TorchSegmentationModel):
    """A TorchScript or ``torch.export`` program; batches that its shapes reject run image by image."""

    per_sample: bool = False

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.module is not None
        x = self.prepare_input(batch)
        with self.autocast():
            if not self.per_sample:
                try:
                    return self.module(x)
                except Exception:  # static batch size in the program: fall back to one by one
                    if x.shape[0] == 1:
                        raise
                    self.per_sample = True
                    log.info("%s: the program rejects batches; running images one by one", self.name)
            return torch.cat([self.module(x[i : i + 1]) for i in range(x.shape[0])])


def _export_input_size(ep: Any) -> tuple[int, int] | None:
    try:
        user_inputs = set(ep.graph_signature.user_inputs)
        for node in ep.graph.nodes:
            if node.op == "placeholder" and node.name in user_inputs:
                shape = node.meta["val"].shape
                if len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
                    return int(shape[2]), int(shape[3])
                return None
    except (AttributeError, KeyError):
        return None
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:150] if text else repr(exc)


def _load_program(path: Path) -> tuple[nn.Module, str, tuple[int, int] | None]:
    errors = []
    if path.suffix != ".pt2":
        try:
            return torch.jit.load(str(path), map_location="cpu"), "TorchScript", None
        except Exception as exc:  # not TorchScript: try torch.export below
            errors.append(f"TorchScript: {_first_line(exc)}")
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:  # neither format
        errors.append(f"torch.export: {_first_line(exc)}")
        raise ModelError(
            f"model file {path}: neither a TorchScript nor a torch.export program ({'; '.join(errors)}); "
            "save the model with torch.jit.save or torch.export.save"
        ) from None
    return ep.module(), "torch.export", _export_input_size(ep)


def load_scripted(
    path_str: str, device: torch.device, options: dict[str, Any], runtime: dict[str, Any]
) -> ScriptedSegmentationModel:
    """A user's TorchScript / torch.export file: forward(normalised [B, 3, h, w]) -> logits [B, C, h', w']
    (or a dict with ``out``).

    Options: ``input_size`` (default: the exported example's size, else 512), ``mean``/``std``
    (default ImageNet, in 0..1 units), ``class_names``.
    """
    path = require_file(path_str, "model file")
    module, kind, ex_size = _load_program(path)
    size = parse_size(options.pop("input_size", None) or ex_size or SCRIPTED_INPUT_SIZE)
    mean = tuple(float(v) for v in options.pop("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in options.pop("std", IMAGENET_STD))
    names_opt = options.pop("class_names", None)
    wrapped = MainOutput(module)
    with contextlib.suppress(NotImplementedError):  # torch.export modules refuse .eval()
        wrapped.eval()
    try:
        with torch.inference_mode():
            out = wrapped(torch.zeros(1, 3, *size))
    except Exception as exc:  # the user's program failed on a plain input: say so, with the shapes
        raise ModelError(
            f"model file {path} ({kind}) failed on an input [1, 3, {size[0]}, {size[1]}] "
            f"({type(exc).__name__}: {str(exc).strip()[:200]}); pass input_size= the program expects"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model file {path} ({kind}) returned {shape} for an input [1, 3, {size[0]}, {size[1]}]; "
            "madseg needs logits [B, C, h, w] (or a dict with 'out')"
        )
    num_classes = int(out.shape[1])
    class_names = default_class_names(num_classes) if names_opt is None else tuple(map(str, names_opt))
    if len(class_names) != num_classes:
        raise ModelError(
            f"model file {path}: {num_classes} output classes but {len(class_names)} class_names"
        )
    spec_opts: dict[str, Any] = {"input_size": [size[0], size[1]], "mean": list(mean), "std": list(std)}
    if names_opt is not None:
        spec_opts["class_names"] = list(class_names)
    model = torch_model(
        name=str(path),
        slug=f"{path.stem}-{hw_slug(size)}",
        content=file_sha256(path),
        spec=ModelSpec(str(path), None, spec_opts),
        runtime=runtime,
        version_opts=spec_opts,
        model_cls=ScriptedSegmentationModel,
        module=wrapped,
        class_names=class_names,
        input_size=size,
        mean=mean,
        std=std,
        device=device,
        checkpoint=path,
        trainable=False,
    )
    return cast(ScriptedSegmentationModel, model)
