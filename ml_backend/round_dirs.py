"""How an experiment dir names its rounds: ``<root>/round-<i>/state.json``, written once.

The bottom of the experiment layout (``projects.layout`` names every other path): the ML backend
reads the rounds' state files to learn the experiment's Label Studio projects
(``ml_backend.known_projects``), the rounds write them (``projects.state``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MadsegError

ROUND_PREFIX = "round-"
STATE_FILE = "state.json"


def round_dir(root: str | os.PathLike[str], i: int) -> Path:
    """The folder of round ``i`` (``<root>/round-<i>``); ``i`` an integer >= 0."""
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
        raise MadsegError(f"round number must be an integer >= 0, got {i!r}")
    return Path(root) / f"{ROUND_PREFIX}{i}"


def round_state_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every ``<root>/round-*/state.json``, sorted by path."""
    return sorted(Path(root).glob(f"{ROUND_PREFIX}*/{STATE_FILE}"))


def round_number(state_file: str | os.PathLike[str]) -> int | None:
    """The round number of a ``round-<i>/state.json`` path, None when the folder is not ``round-<digits>``."""
    name = Path(state_file).parent.name
    suffix = name[len(ROUND_PREFIX):] if name.startswith(ROUND_PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None
