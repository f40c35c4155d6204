"""``ModelSpec``: the one vocabulary for a model (name, checkpoint, options), torch-free.

A spec says how to load a model: ``ml_backend.zoo.load_model(name, checkpoint, **options)``. It is
read from a command-line string by :meth:`ModelSpec.parse` (``"name[,checkpoint=PATH][,key=value...]"``),
from a TOML table by ``ml_backend.zoo.model_spec_from_table`` and from its JSON dict by
:meth:`ModelSpec.from_dict`; :meth:`ModelSpec.to_dict` is that JSON dict (the wire format of files
on disk, the score store and the backend's settings).

This module imports neither torch nor the zoo, so the experiment schema, the round plans, the
backend's settings and the sampler's CLI carry specs without loading a model library;
``ml_backend.zoo`` (and ``ml_backend.zoo.base``) re-export the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError
from .jsonsafe import jsonable

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model: ``load_model(name, checkpoint, **options)`` (what a TOML config names)."""

    name: str
    checkpoint: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """From ``{"name", "checkpoint"?, "options"?, ...}``; other keys are taken as options too."""
        if not isinstance(data, Mapping) or not data.get("name"):
            raise ModelError(f"model spec {data!r} needs a 'name' (e.g. espnetv2, tflite, torchvision:...)")
        if not isinstance(data["name"], str):
            raise ModelError(f"name must be a model name string, got {data['name']!r}")
        ckpt = data.get("checkpoint")
        if ckpt is not None and not isinstance(ckpt, (str, Path)):
            raise ModelError(f"checkpoint must be a file path string, got {ckpt!r}")
        raw_opts = data.get("options")
        if raw_opts is not None and not isinstance(raw_opts, Mapping):
            raise ModelError(f"options must be a table (e.g. {{ scale = 2.0 }}), got {raw_opts!r}")
        extra = {k: v for k, v in data.items() if k not in ("name", "checkpoint", "options")}
        opts = dict(raw_opts or {})
        opts.update(extra)
        return cls(name=str(data["name"]), checkpoint=str(ckpt) if ckpt else None, options=opts)

    @classmethod
    def of(cls, value: ModelSpec | Mapping[str, Any]) -> ModelSpec:
        """``value`` as a spec: a :class:`ModelSpec` as it is, a dict through :meth:`from_dict` (for
        public entry points that also take the JSON dict)."""
        return value if isinstance(value, ModelSpec) else cls.from_dict(value)

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """The one command-line spelling: ``"name[,checkpoint=PATH][,key=value...]"``.

        Values are taken as int, float or bool (``true``/``false``) when they parse as such, else
        as strings (e.g. ``espnetv2,scale=0.5,input_size=256``). A TOML table is read by
        :func:`ml_backend.zoo.model_spec_from_table`, a dict by :meth:`from_dict`.
        """
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts or "=" in parts[0]:
            raise ModelError(f"model spec {text!r} must start with a model name, e.g. espnetv2,scale=0.5")
        checkpoint: str | None = None
        options: dict[str, Any] = {}
        for p in parts[1:]:
            if "=" not in p:
                raise ModelError(f"model spec {text!r}: {p!r} is not key=value")
            key, val = (s.strip() for s in p.split("=", 1))
            if key == "checkpoint":
                checkpoint = val
            else:
                options[key] = _parse_value(val)
        return cls(name=parts[0], checkpoint=checkpoint, options=options)

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-friendly dict (inverse of :meth:`from_dict`)."""
        return {"name": self.name, "checkpoint": self.checkpoint, "options": jsonable(dict(self.options))}


def _parse_value(val: str) -> Any:
    """A command-line option value: bool (``true``/``false``), int, float, else the string."""
    low = val.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(val)
        except ValueError:
            pass
    return val
