"""Content hashes of checkpoints and the model version strings built from them.

Hashing a large checkpoint takes time, so :func:`file_sha256` remembers results keyed by
(absolute path, size, modification time) in memory and in ``<cache dir>/file_hashes.json``.
The cache dir is ``$MADSEG_CACHE``, else ``$XDG_CACHE_HOME/madseg``, else ``~/.cache/madseg``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json

_CHUNK = 1 << 20
_LOCK = threading.Lock()
_MEMORY: dict[str, str] = {}
_MAX_DISK_ENTRIES = 2000


def cache_dir() -> Path:
    """The madseg cache folder (not created here)."""
    env = os.environ.get("MADSEG_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "madseg"


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _disk_cache_file() -> Path:
    return cache_dir() / "file_hashes.json"


def _read_disk_cache() -> dict[str, str]:
    try:
        data = json.loads(_disk_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_disk_cache(key: str, digest: str) -> None:
    entries = _read_disk_cache()
    entries[key] = digest
    if len(entries) > _MAX_DISK_ENTRIES:  # keep the newest entries (insertion order)
        entries = dict(list(entries.items())[-_MAX_DISK_ENTRIES:])
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        atomic_write_json(_disk_cache_file(), entries, indent=None)


def file_sha256(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    """SHA-256 hex digest of a file's content (cached by path + size + mtime)."""
    path = Path(path)
    key = _cache_key(path)
    if use_cache:
        with _LOCK:
            if key in _MEMORY:
                return _MEMORY[key]
        disk = _read_disk_cache().get(key)
        if disk:
            with _LOCK:
                _MEMORY[key] = disk
            return disk
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _LOCK:
        _MEMORY[key] = digest
    if use_cache:
        _write_disk_cache(key, digest)
    return digest


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values (for weights without a file)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_version(slug: str, content_hash: str, options: Mapping[str, Any]) -> str:
    """``<slug>@<12 hex>`` from the weights' content hash and the output-affecting options.

    Characters other than letters, digits and ``._+-`` in ``slug`` (from user file names) become ``-``.
    """
    slug = re.sub(r"[^A-Za-z0-9._+-]", "-", slug)
    blob = json.dumps({"content": content_hash, "options": dict(options)}, sort_keys=True, default=str)
    return f"{slug}@{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
