"""Reading TOML files with one-line errors (``tomllib`` on Python >= 3.11, ``tomli`` before)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import MadsegError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def read_toml(
    path: str | os.PathLike[str], label: str, error: type[MadsegError] = MadsegError
) -> dict[str, Any]:
    """Parse the TOML file ``path``; unreadable or invalid files raise ``error`` naming ``label``."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{label}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{label}: not valid TOML ({exc})") from None
