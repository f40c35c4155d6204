"""Reading weight files and checking that they fit an architecture, with errors that name the file.

A checkpoint written by madseg's fine-tuning has a JSON sidecar ``<checkpoint>.json`` that
records the model entry and options it belongs to (see :func:`sidecar_path`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net")
_MAX_LISTED = 5


def sidecar_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a checkpoint: ``model.pth`` -> ``model.pth.json``."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".json")


def read_sidecar(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar's content, or None when there is none (or it is unreadable)."""
    path = sidecar_path(checkpoint)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path if it is a readable file, else :class:`ModelError`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"{what} {p}: file not found; check the path")
    if p.stat().st_size == 0:
        raise ModelError(f"{what} {p}: empty file (0 bytes); the file is truncated or was never written")
    return p


def read_state_dict(path: str | os.PathLike[str], what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a state dict (CPU tensors) from a ``.pth`` file.

    Accepts a plain state dict or one wrapped under ``state_dict``/``model``/...; strips the
    ``module.`` prefix that DataParallel adds. Raises :class:`ModelError` naming the file otherwise.
    """
    p = require_file(path, what)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage bytes make the unpickler raise anything (KeyError, IndexError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{what} {p}: not a readable PyTorch weights file ({first[:200]}); "
            "pass a state dict saved with torch.save"
        ) from None
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if _is_state(inner):
                obj = inner
                break
    if not _is_state(obj):
        raise ModelError(
            f"{what} {p}: does not hold a state dict of tensors (found {type(obj).__name__}); "
            "pass the file saved with torch.save(model.state_dict())"
        )
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_state(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def state_mismatches(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between ``module``'s parameters/buffers and ``state``.

    Empty when ``state`` loads with ``strict=True``. Order: shape mismatches, missing, unexpected.
    """
    own = module.state_dict()
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    out: list[str] = []
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:_MAX_LISTED])}")
    if missing:
        out.append(f"{len(missing)} parameter(s) missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected parameter(s) in the checkpoint: {_listing(unexpected)}")
    return out


def load_into(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], arch: str
) -> None:
    """Load ``state`` into ``module`` with ``strict=True``, or raise :class:`ModelError` naming the
    first mismatching parameters and the file."""
    problems = state_mismatches(module, state)
    if problems:
        raise ModelError(
            f"checkpoint {path} does not fit {arch}: {'; '.join(problems)}. "
            "Pick the model options (e.g. scale, num_classes) that match the checkpoint, or another one"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # dtype or other oddities
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"checkpoint {path} does not load into {arch}: {first[:300]}") from None
