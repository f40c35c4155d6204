"""Test support: experiment files (TOML) for tests that load or run an experiment on the shared data."""

from __future__ import annotations

from pathlib import Path

#: the cheapest real target and competitor checkpoints (``{shared}`` is expanded by the experiment loader)
ESP = "{shared}/models/espnetv2/espnetv2_s_0.5_pascal_256x256.pth"
DICE = "{shared}/models/dicenet/dicenet_s_0.5_pascal_256x256.pth"


def write_experiment_toml(tmp: Path, name: str, tables: str) -> Path:
    """Write ``tmp/exp.toml``: the ``[experiment]`` table (``name``, directory ``tmp/exp``) followed by
    ``tables`` (TOML text: ``[pool]``, ``[target]``, ``[[competitors]]``, ``[s0]``, ``[t0]``, ...).
    Returns the file's path."""
    cfg = tmp / "exp.toml"
    cfg.write_text(f'\n[experiment]\nname = "{name}"\ndir = "{tmp / "exp"}"\n{tables}')
    return cfg
