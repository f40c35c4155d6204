"""Class-map alignment: a model trained on other labels (ADE20K, COCO, ...) predicts in the target's classes.

A map file (TOML or JSON) says which target class each source class counts as::

    name = "ade20k-voc"            # optional (default: the file's stem); part of the model version
    target_classes = "voc"         # "voc" (the default) or a list of class names
    source_classes = ["wall", ...] # optional: the source model's classes in index order
    [map]                          # source class (name or index) -> target class name or "ignore"
    person = "person"
    "12" = "person"
    animal = "ignore"

Keys are source class names (looked up in ``source_classes`` when given, else in the model's own
class names) or decimal indices. Values are target class names, or ``"ignore"`` (also ``""``).
Source classes not in the map are ignored too. Shipped maps live in ``ml_backend/zoo/classmaps/``
and are named without a path (``class_map = "ade20k-voc"``); see its README.

How a mapped model predicts (exactly):

- probabilities: ``P_t[k] = sum of P_s[j] over the source classes j mapped to k``; the ignored
  mass ``P_ign = 1 - sum_k P_t[k]`` is dropped and the rest renormalised:
  ``P[k] = (P_t[k] + eps / C) / (1 - P_ign + eps)`` with ``eps = 1e-6``. So ``P`` sums to 1 over the
  target classes and is the source model's belief *given that the pixel is one of the target
  classes*; a pixel with (almost) no mapped mass becomes (almost) uniform.
- argmax (label maps): the target class with the most mapped mass. Ignored classes never win:
  every pixel gets a target class, so areas (fraction of pixels per class) and distances
  (mIoU / pixel accuracy between label maps) are computed over all pixels in the target's
  classes, exactly as for any other model.
- training (torch models): the module returns ``log P``, so cross-entropy trains the source model
  to put its mass on the source classes of the right target class.

The map's name and a hash of its resolved content (source index -> target index, the target
classes) are part of the model version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..classes import VOC_CLASSES
from ..errors import ModelError
from ..tomlfile import read_toml
from .base import ModelSpec, SegmentationModel, TorchSegmentationModel
from .hashing import make_version

log = logging.getLogger(__name__)

CLASSMAP_DIR = Path(__file__).resolve().parent / "classmaps"
IGNORE_WORDS = ("ignore", "")
EPS = 1e-6


def shipped_class_maps() -> dict[str, Path]:
    """Shipped map name -> file (``ml_backend/zoo/classmaps/*.toml``)."""
    return {p.stem: p for p in sorted(CLASSMAP_DIR.glob("*.toml"))}


def resolve_class_map_ref(ref: Any, base: Path | None = None) -> str:
    """A shipped map's name as it is, or a map file's absolute path (relative to ``base``, else the
    current folder). Raises :class:`ModelError` for anything that is neither."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError(f"class_map must be a shipped map name ({', '.join(shipped_class_maps())}) or a "
                         f"path to a .toml/.json map file, got {ref!r}")
    ref = ref.strip()
    if ref in shipped_class_maps():
        return ref
    p = Path(os.path.expanduser(ref))
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    return str(p.resolve())


@dataclass(frozen=True)
class ClassMap:
    """A parsed map file (not yet resolved against a model's classes)."""

    name: str
    source: str
    target_classes: tuple[str, ...]
    source_classes: tuple[str, ...] | None
    entries: tuple[tuple[str, str | None], ...]

    def resolve(self, model_classes: Sequence[str]) -> np.ndarray:
        """Source index -> target index (-1 = ignore) for a model with ``model_classes``: int64 (C_s,).

        Raises :class:`ModelError` naming the map for unknown classes, indices out of range,
        a source class mapped twice, a class count that contradicts ``source_classes``, or a map
        that maps nothing.
        """
        n = len(model_classes)
        where = f"class map {self.source}"
        if self.source_classes is not None and len(self.source_classes) != n:
            raise ModelError(
                f"{where}: lists {len(self.source_classes)} source_classes but the model has {n} classes; "
                "use the map made for this model"
            )
        if self.source_classes is not None:
            differ = [i for i, (a, b) in enumerate(zip(model_classes, self.source_classes, strict=True))
                      if not _same_name(a, b, i)]
            if differ:
                i = differ[0]
                log.warning("%s: %d of the model's class names differ from the map's source_classes "
                            "(class %d: model %r, map %r); check that the model uses the map's class order",
                            where, len(differ), i, model_classes[i], self.source_classes[i])
        lookup_lists = [self.source_classes] if self.source_classes is not None else []
        lookup_lists.append(tuple(model_classes))
        out = np.full(n, -1, np.int64)
        seen: dict[int, str] = {}
        for key, value in self.entries:
            idx = None
            for names in lookup_lists:
                if key in names:
                    idx = list(names).index(key)
                    break
            if idx is None and key.isdigit():
                idx = int(key)
                if idx >= n:
                    raise ModelError(
                        f"{where}: source index {idx} is out of range; the model has {n} classes"
                    )
            if idx is None:
                known = ", ".join(list(lookup_lists[0])[:8])
                raise ModelError(
                    f"{where}: source class {key!r} is not a class of the model (e.g. {known}, ...) "
                    "nor an index"
                )
            if idx in seen:
                raise ModelError(f"{where}: source class {idx} is mapped twice ({seen[idx]!r} and {key!r})")
            seen[idx] = key
            if value is not None:
                out[idx] = self.target_classes.index(value)
        if (out < 0).all():
            raise ModelError(f"{where}: maps no source class to a target class")
        return out

    def digest(self, table: np.ndarray) -> str:
        """SHA-256 of the resolved table and the target classes (what changes the predictions)."""
        blob = json.dumps({"table": table.tolist(), "target": list(self.target_classes)})
        return hashlib.sha256(blob.encode()).hexdigest()


def _same_name(model_name: str, map_name: str, index: int) -> bool:
    """Loose name equality (case, spaces, ``a, b`` synonyms, ``_``/``-``); generic names always match."""
    def norm(n: str) -> str:
        return n.strip().lower().split(",")[0].strip().replace("_", " ").replace("-", " ")

    generic = norm(model_name) in (f"class {index}", f"label {index}", str(index))
    return generic or norm(model_name) == norm(map_name)


def _target_classes(value: Any, where: str) -> tuple[str, ...]:
    if value is None or (isinstance(value, str) and value.lower() == "voc"):
        return VOC_CLASSES
    if (not isinstance(value, list) or len(value) < 2
            or not all(isinstance(v, str) and v.strip() for v in value) or len(set(value)) != len(value)):
        raise ModelError(
            f"{where}: target_classes must be \"voc\" or a list of distinct class names, got {value!r}"
        )
    return tuple(value)


def parse_class_map(data: Any, source: str, default_name: str) -> ClassMap:
    """A :class:`ClassMap` from the parsed TOML/JSON ``data``; errors name ``source`` and the key."""
    where = f"class map {source}"
    if not isinstance(data, Mapping):
        raise ModelError(f"{where}: must be a table/object with a [map] table")
    unknown = sorted(set(data) - {"name", "target_classes", "source_classes", "map", "description", "source"})
    if unknown:
        raise ModelError(f"{where}: unknown key {unknown[0]!r}; known keys: name, target_classes, "
                         "source_classes, map, description, source")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"{where}: name must be a non-empty string, got {name!r}")
    target = _target_classes(data.get("target_classes"), where)
    src = data.get("source_classes")
    if src is not None and (not isinstance(src, list) or not src or not all(isinstance(s, str) for s in src)):
        raise ModelError(f"{where}: source_classes must be a list of class names, got {str(src)[:80]}")
    table = data.get("map")
    if not isinstance(table, Mapping) or not table:
        raise ModelError(f"{where}: needs a non-empty [map] table of source class = \"target class\"")
    entries: list[tuple[str, str | None]] = []
    for key, value in table.items():
        if not isinstance(value, str):
            raise ModelError(f"{where}: map.{key} must be a target class name or \"ignore\", got {value!r}")
        v = value.strip()
        if v.lower() in IGNORE_WORDS:
            entries.append((str(key), None))
        elif v in target:
            entries.append((str(key), v))
        else:
            raise ModelError(
                f"{where}: map.{key} = {value!r} is not a target class ({', '.join(target[:6])}, ...) "
                "nor \"ignore\""
            )
    return ClassMap(name=name.strip(), source=source, target_classes=target,
                    source_classes=tuple(src) if src is not None else None, entries=tuple(entries))


def read_class_map(ref: str) -> ClassMap:
    """Read a shipped map (by name) or a ``.toml`` / ``.json`` map file."""
    shipped = shipped_class_maps()
    path = shipped.get(ref) or Path(ref)
    label = f"class map {path}"
    if not path.is_file():
        raise ModelError(
            f"{label}: file not found; use a shipped map ({', '.join(shipped)}) "
            "or the path of a .toml/.json map"
        )
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{label}: cannot read ({exc})") from None
        except ValueError as exc:
            raise ModelError(f"{label}: not valid JSON ({exc})") from None
    else:
        data = read_toml(path, label, ModelError)
    return parse_class_map(data, str(path), path.stem)


def mapping_matrix(table: np.ndarray, num_target: int) -> torch.Tensor:
    """(C_s,) source -> target index table (-1 = ignore) -> float32 matrix [C_s, C_t] of 0/1."""
    m = torch.zeros(len(table), num_target, dtype=torch.float32)
    for s, t in enumerate(table.tolist()):
        if t >= 0:
            m[s, t] = 1.0
    return m


def map_probs(probs: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Source probabilities [B, C_s, h, w] -> target probabilities [B, C_t, h, w] (see module docstring)."""
    pt = torch.einsum("bshw,st->bthw", probs.float(), matrix.to(probs.device))
    c = matrix.shape[1]
    return (pt + EPS / c) / (pt.sum(1, keepdim=True) + EPS)


class ClassMapModule(nn.Module):
    """``forward(x) -> log P`` in the target classes for a module that returns source logits.

    The mapping matrix is a non-persistent buffer: the state dict is the source module's
    (under ``inner.``), so checkpoints stay in the source model's format.
    """

    def __init__(self, inner: nn.Module, matrix: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        return torch.log(map_probs(torch.softmax(logits.float(), dim=1), self.matrix))


class MappedSegmentationModel(SegmentationModel):
    """A non-torch model (ONNX, TFLite, TorchScript, ...) seen through a class map (inference only)."""

    def __init__(self, *, inner: SegmentationModel, matrix: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inner = inner
        self.matrix = matrix

    def _probs(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return map_probs(self.inner._probs(batch), self.matrix).to(self.device)


def apply_class_map(model: SegmentationModel, ref: str) -> SegmentationModel:
    """``model`` predicting in the classes of the map ``ref`` (a shipped name or an absolute path).

    Torch models of the plain kind stay torch models (trainable as the source is; checkpoints in
    the source's format); the others become :class:`MappedSegmentationModel`.
    """
    cmap = read_class_map(ref)
    table = cmap.resolve(model.class_names)
    matrix = mapping_matrix(table, len(cmap.target_classes))
    slug = model.version.split("@")[0] + f"-to-{cmap.name}"
    version = make_version(slug, f"{model.version}|{cmap.digest(table)}", {"class_map": cmap.name})
    spec = ModelSpec(model.spec.name, model.spec.checkpoint, {**dict(model.spec.options), "class_map": ref})
    common: dict[str, Any] = {
        "name": model.name, "version": version, "class_names": cmap.target_classes,
        "input_size": model.input_size, "device": model.device, "mean": model.mean, "std": model.std,
        "spec": spec, "checkpoint": model.checkpoint,
    }
    if type(model) is TorchSegmentationModel and model.module is not None:
        mapped = TorchSegmentationModel(
            module=ClassMapModule(model.module, matrix), bf16=model.bf16, channels_last=model.channels_last,
            trainable=model.trainable, ckpt_prefix="inner." + model.ckpt_prefix, **common,
        )
    else:
        mapped = MappedSegmentationModel(inner=model, matrix=matrix, **common)
    mapped.class_map = cmap.name  # type: ignore[attr-defined]
    mapped.source_class_names = model.class_names  # type: ignore[attr-defined]
    return mapped
