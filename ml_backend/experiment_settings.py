"""The experiment's settings as the ML backend receives them: data, written by ``projects``.

The backend does not read the experiment TOML (that schema belongs to ``projects``, a higher
layer). ``projects.backend_settings`` turns an experiment into an :class:`ExperimentSettings` and
writes it as JSON; the backend reads that file from ``MADSEG_BACKEND_SETTINGS``
(``madseg backend`` / ``madseg worker`` do both steps when ``MADSEG_EXPERIMENT`` is set). The target
is read once, at this edge, into a :class:`ml_backend.modelspec.ModelSpec`; the file::

    {"target": {"name": ..., "checkpoint": ..., "options": {...}},   # the zoo spec of f(0)
     "finetune": {...},                  # ml_backend.finetune.FinetuneConfig field names (+ "preset")
     "replay": {"root": ..., "subset": ...} | null,   # S(0), when the fine-tune replays it
     "val": {"root": ..., "subset": ...} | null,      # T(0)
     "document_root": str | null, "dir": str | null,   # Label Studio's local-files root, experiment dir
     "pool_dirs": [str, ...], "ground_truth": [str, ...]}  # image folders; mask folders never served
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .atomic import atomic_write_json
from .errors import MadsegError, ModelError
from .modelspec import ModelSpec

#: Environment variable naming the settings file.
SETTINGS_ENV = "MADSEG_BACKEND_SETTINGS"


def _labelled(obj: Any, key: str, source: str) -> dict[str, Any] | None:
    if obj is None:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("root"), str):
        raise MadsegError(f"{source}: {key!r} must be null or an object with a 'root' folder")
    return {"root": obj["root"], "subset": obj.get("subset")}


def _strings(obj: Any, key: str, source: str) -> tuple[str, ...]:
    if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj):
        raise MadsegError(f"{source}: {key!r} must be a list of folder paths")
    return tuple(obj)


@dataclass(frozen=True)
class ExperimentSettings:
    """What the backend and its fine-tune jobs take from an experiment (see the module docstring).
    ``target``: f(0)'s spec; None only in :attr:`NONE` (no experiment: the backend's variables say it
    all). A ``{name, checkpoint, options}`` dict given as ``target`` is read by
    :meth:`ModelSpec.from_dict` (an empty one is None)."""

    #: No experiment (set below).
    NONE: ClassVar[ExperimentSettings]

    target: ModelSpec | None
    finetune: dict[str, Any] = field(default_factory=dict)
    replay: dict[str, Any] | None = None
    val: dict[str, Any] | None = None
    document_root: str | None = None
    dir: str | None = None
    pool_dirs: tuple[str, ...] = ()
    ground_truth: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.target, Mapping):
            object.__setattr__(self, "target", ModelSpec.of(self.target) if self.target else None)
        elif self.target is not None and not isinstance(self.target, ModelSpec):
            raise MadsegError(f"backend settings: 'target' must be a model spec, got {self.target!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target.to_dict() if self.target is not None else {},
            "finetune": self.finetune, "replay": self.replay, "val": self.val,
            "document_root": self.document_root, "dir": self.dir, "pool_dirs": list(self.pool_dirs),
            "ground_truth": list(self.ground_truth),
        }

    @classmethod
    def from_json(cls, obj: Any, source: str = "backend settings") -> ExperimentSettings:
        """Check and read the JSON object; :class:`MadsegError` naming ``source`` and the bad key."""
        if not isinstance(obj, dict):
            raise MadsegError(f"{source}: must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
        if unknown:
            raise MadsegError(f"{source}: unknown key(s) {unknown}; regenerate it with `madseg backend` "
                              "and MADSEG_EXPERIMENT")
        target = obj.get("target")
        if not isinstance(target, dict) or not isinstance(target.get("name"), str):
            raise MadsegError(f"{source}: 'target' must be a model spec object with a 'name'")
        try:
            spec = ModelSpec.from_dict(target)
        except ModelError as exc:
            raise MadsegError(f"{source}: 'target': {exc}; regenerate it with `madseg backend` "
                              "and MADSEG_EXPERIMENT") from None
        finetune = obj.get("finetune") or {}
        if not isinstance(finetune, dict):
            raise MadsegError(f"{source}: 'finetune' must be an object")
        for key in ("document_root", "dir"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise MadsegError(f"{source}: {key!r} must be a folder path or null")
        return cls(
            target=spec, finetune=dict(finetune),
            replay=_labelled(obj.get("replay"), "replay", source),
            val=_labelled(obj.get("val"), "val", source),
            document_root=obj.get("document_root"), dir=obj.get("dir"),
            pool_dirs=_strings(obj.get("pool_dirs", []), "pool_dirs", source),
            ground_truth=_strings(obj.get("ground_truth", []), "ground_truth", source),
        )

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ExperimentSettings:
        """Read a settings file; a missing or malformed file is a :class:`MadsegError`."""
        source = f"{SETTINGS_ENV}={path}"
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MadsegError(f"{source}: file not found; start the backend with `madseg backend` and "
                              "MADSEG_EXPERIMENT=<experiment TOML>, which writes it") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise MadsegError(f"{source}: cannot read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise MadsegError(f"{source}: not valid JSON ({exc.msg})") from None
        return cls.from_json(obj, source)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the settings file atomically; returns its path."""
        path = Path(path)
        atomic_write_json(path, self.to_json())
        return path


ExperimentSettings.NONE = ExperimentSettings(target=None)
