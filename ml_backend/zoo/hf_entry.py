"""Hugging Face ``transformers`` semantic-segmentation models from a LOCAL folder (no network).

``name = "hf"`` with ``checkpoint = "<folder>"`` (or ``name = "hf:<folder>"``) loads the folder
with ``AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True)`` (SegFormer,
UperNet, DPT, MobileViT, BEiT, ...) and reads its image processor
(``AutoImageProcessor.from_pretrained``, i.e. ``preprocessor_config.json``) for the input size and
normalisation. ``trust_remote_code`` is never used.

Pre-processing: the processor's ``size`` (``height``/``width``; else ``crop_size``; else
``shortest_edge`` as a square), ``image_mean``/``image_std`` and ``do_rescale``/``rescale_factor``/
``do_normalize`` are turned into madseg's picklable :class:`~ml_backend.zoo.base.Preprocessor`
(bilinear resize to that size, then the same affine map of the pixel values), so DataLoader
workers and fine-tuning use exactly the model's normalisation. Options ``input_size``, ``mean``
and ``std`` override the processor; without a processor they are required.

The module given to madseg wraps the model so that ``forward(normalised [B, 3, H, W])`` returns
logits [B, C, H, W] (the model's ``logits`` upsampled bilinearly to the input size): the ML
backend and the fine-tuning core use it like any torch entry, and fine-tuned weights are saved as
a state dict of the ``transformers`` model (keys as in ``model.state_dict()``), reloaded with
``checkpoint = "<file>.pth"`` plus ``pretrained = "<folder>"`` (what the fine-tune's sidecar
records). Classes: ``config.id2label`` (option ``class_names`` overrides).

Version: ``hf-<folder name>-<size>@<hash>`` where the hash covers the content of
``config.json``, ``preprocessor_config.json`` and every weights file (or the fine-tuned
``.pth``) plus the output-affecting options; the folder's path is not part of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .base import ModelSpec, TorchSegmentationModel, parse_size
from .checkpoints import load_into, read_sidecar, read_state_dict, require_file
from .hashing import file_sha256
from .torch_entries import MainOutput, hw_slug, torch_model

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
HF_INSTALL_HINT = "install it with `pip install transformers` (madseg's [hf] extra: pip install -e '.[hf]')"


def import_transformers() -> Any:
    """The ``transformers`` module, or :class:`ModelError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ModelError(f"hf: models need the transformers package; {HF_INSTALL_HINT}") from None
    with contextlib.suppress(Exception):  # quieter loading: no per-weight progress bars
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    return transformers


class HFSemanticModule(MainOutput):
    """``forward(pixel_values [B, 3, H, W]) -> logits [B, C, H, W]`` for a ``transformers`` model whose
    output has ``logits`` [B, C, h, w] (upsampled bilinearly to (H, W) when smaller)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(pixel_values=x)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def processor_settings(proc: Any) -> tuple[tuple[int, int] | None, tuple[float, ...], tuple[float, ...]]:
    """(input size (h, w) or None, mean, std in 0..1 units) that reproduce an image processor's
    rescale + normalise: HF computes ``(p * r - m) / s`` of a 0..255 pixel ``p``; madseg computes
    ``(p / 255 - M) / S``, so ``S = s / (255 r)`` and ``M = m / (255 r)``."""
    size = _get(proc, "size")
    hw: tuple[int, int] | None = None
    if _get(size, "height") and _get(size, "width"):
        hw = (int(_get(size, "height")), int(_get(size, "width")))
    else:
        crop = _get(proc, "crop_size")
        if _get(crop, "height") and _get(crop, "width"):
            hw = (int(_get(crop, "height")), int(_get(crop, "width")))
        elif _get(size, "shortest_edge"):
            hw = (int(_get(size, "shortest_edge")),) * 2  # type: ignore[assignment]
    rescale = float(_get(proc, "rescale_factor") or 1 / 255) if _get(proc, "do_rescale") is not False else 1.0
    if _get(proc, "do_normalize") is False:
        m, s = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        m = tuple(float(v) for v in (_get(proc, "image_mean") or (0.5, 0.5, 0.5)))
        s = tuple(float(v) for v in (_get(proc, "image_std") or (0.5, 0.5, 0.5)))
    k = 255.0 * rescale
    return hw, tuple(v / k for v in m), tuple(v / k for v in s)


def folder_hash(folder: Path, weights_override: Path | None = None) -> str:
    """SHA-256 over the content hashes of ``config.json``, ``preprocessor_config.json`` and the
    weights files of ``folder`` (or ``weights_override`` instead of the folder's weights)."""
    files = [p for p in (folder / "config.json", folder / "preprocessor_config.json") if p.is_file()]
    if weights_override is not None:
        files.append(weights_override)
    else:
        files += sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _pretrained_folder(value: Any) -> Path:
    folder = Path(os.path.expanduser(str(value)))
    if not folder.is_dir():
        raise ModelError(
            f"hf: model folder {folder} not found; hf entries load a local folder only (a download, e.g. "
            "`huggingface-cli download nvidia/segformer-b0-finetuned-ade-512-512 --local-dir DIR`, or a "
            "save_pretrained folder)"
        )
    if not (folder / "config.json").is_file():
        raise ModelError(f"hf: model folder {folder} has no config.json; is it a transformers model folder?")
    return folder


def load_hf(
    checkpoint: str | None, device: torch.device, options: dict[str, Any], runtime: dict[str, Any]
) -> TorchSegmentationModel:
    """Load a local ``transformers`` folder (see the module docstring). ``checkpoint`` is the folder,
    or a fine-tuned ``.pth`` with option ``pretrained`` naming the folder it was trained from."""
    pretrained = options.pop("pretrained", None)
    ckpt_file: Path | None = None
    if checkpoint is not None and not Path(os.path.expanduser(checkpoint)).exists():
        raise ModelError(
            f"hf: {checkpoint} not found; give a local model folder (hf entries load local folders only, "
            "e.g. a `huggingface-cli download ... --local-dir DIR` or save_pretrained folder) or a .pth"
        )
    if checkpoint is not None and Path(os.path.expanduser(checkpoint)).is_dir():
        if pretrained is not None and Path(str(pretrained)).resolve() != Path(checkpoint).resolve():
            raise ModelError(
                f"hf: checkpoint {checkpoint} is a folder and pretrained={pretrained!r} another one"
            )
        pretrained = checkpoint
    elif checkpoint is not None:
        ckpt_file = require_file(checkpoint, "hf checkpoint")
        if pretrained is None:
            info = (read_sidecar(ckpt_file) or {}).get("model") or {}
            pretrained = (info.get("options") or {}).get("pretrained")
    if pretrained is None:
        raise ModelError(
            "hf: no model folder given; use name = \"hf\" with checkpoint = \"<folder>\" (or pretrained = "
            "\"<folder>\" with a fine-tuned .pth checkpoint)"
        )
    folder = _pretrained_folder(pretrained)
    if options.pop("trust_remote_code", False):
        raise ModelError("hf: trust_remote_code is not supported (it runs code from the model folder)")
    transformers = import_transformers()
    try:
        auto = transformers.AutoModelForSemanticSegmentation
        net = auto.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a broken folder fails inside transformers/safetensors in many ways
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"hf: {folder} does not load as a semantic-segmentation model ({first[:250]}); madseg takes "
            "AutoModelForSemanticSegmentation models (SegFormer, UperNet, DPT, MobileViT, BEiT, ...)"
        ) from None
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        proc = None
    p_size, p_mean, p_std = processor_settings(proc) if proc is not None else (None, None, None)
    size_opt = options.pop("input_size", None)
    mean_opt = options.pop("mean", None)
    std_opt = options.pop("std", None)
    if proc is None and (size_opt is None or mean_opt is None or std_opt is None):
        raise ModelError(
            f"hf: {folder} has no image processor (preprocessor_config.json); add one, or pass input_size, "
            "mean and std (0..1 units)"
        )
    size = parse_size(size_opt) if size_opt is not None else p_size
    if size is None:
        raise ModelError(f"hf: the image processor of {folder} has no fixed size; pass input_size")
    try:
        mean = tuple(float(v) for v in (mean_opt if mean_opt is not None else p_mean))  # type: ignore[union-attr]
        std = tuple(float(v) for v in (std_opt if std_opt is not None else p_std))  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ModelError(f"hf: mean={mean_opt!r} / std={std_opt!r} must be lists of 3 numbers") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelError(f"hf: mean={list(mean)} and std={list(std)} must be 3 numbers each (std > 0)")

    id2label = getattr(net.config, "id2label", None) or {}
    num_classes = int(getattr(net.config, "num_labels", len(id2label)) or len(id2label))
    names_opt = options.pop("class_names", None)
    if names_opt is not None:
        names = tuple(str(n) for n in names_opt)
        if len(names) != num_classes:
            raise ModelError(f"hf: {folder} has {num_classes} labels but class_names has {len(names)}")
    else:
        names = tuple(str(id2label.get(i, id2label.get(str(i), f"class_{i}"))) for i in range(num_classes))
    module = HFSemanticModule(net)
    if ckpt_file is not None:
        state = read_state_dict(ckpt_file, "hf checkpoint")
        load_into(net, state, ckpt_file, f"the transformers model of {folder}")
    content = folder_hash(folder, ckpt_file)
    spec_opts: dict[str, Any] = {"pretrained": str(folder.resolve()), "input_size": [size[0], size[1]],
                                 "mean": list(mean), "std": list(std)}
    if names_opt is not None:
        spec_opts["class_names"] = list(names)
    version_opts = {k: v for k, v in spec_opts.items() if k != "pretrained"} | {"class_names": list(names)}
    return torch_model(
        name="hf",
        slug=f"hf-{folder.name}-{hw_slug(size)}",
        content=content,
        spec=ModelSpec("hf", str(ckpt_file) if ckpt_file else None, spec_opts),
        runtime=runtime,
        version_opts=version_opts,
        module=module,
        class_names=names,
        input_size=size,
        mean=mean,
        std=std,
        device=device,
        checkpoint=ckpt_file or folder,
        trainable=True,
        ckpt_prefix="net.",
    )
