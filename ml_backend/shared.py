"""Where the shared data and models live.

The location is configurable with ``MADSEG_SHARED``; by default it is ``../shared`` relative to
the current directory, falling back to ``../shared`` beside the source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MadsegError

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir(required: bool = True) -> Path:
    """Return the shared data folder (``$MADSEG_SHARED`` or ``../shared``).

    Raises :class:`MadsegError` when ``required`` and the folder does not exist.
    """
    env = os.environ.get("MADSEG_SHARED")
    candidates = [Path(env)] if env else [Path.cwd().parent / "shared", REPO_ROOT.parent / "shared"]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    if required:
        raise MadsegError(
            f"shared data folder not found (looked at {', '.join(str(c) for c in candidates)}); "
            "set MADSEG_SHARED to the folder that holds data/ and models/"
        )
    return candidates[0]
