"""Which files on disk a Label Studio local-files task URL may make the ML backend read.

A local-files task URL is ``/data/local-files/?d=<path>``, where ``<path>`` is relative to Label
Studio's document root (``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``). :class:`LocalFilesPolicy`
reads such a file only when all of these hold:

- a document root is configured, and it is not ``/``;
- the real path (after ``..`` and every symlink) lies inside one of the servable folders: the
  document root itself, or — narrower — the folders an operator names in ``MADSEG_LOCAL_FILES_DIRS``
  or the experiment's own pool folders;
- it lies inside none of the denied folders (ground-truth mask folders, the backend's model dir);
- it is a regular file with an image suffix and at most ``max_bytes`` bytes.

An absolute ``d`` is accepted only when that absolute path passes the same checks. Every refusal
raises :class:`LocalFileRefused` naming the task's path (not the resolved server path).
"""

from __future__ import annotations

import os
import posixpath
import stat
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import MadsegError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
LOCAL_FILES_PATH = "/data/local-files"


class LocalFileRefused(MadsegError):
    """A local-files path the policy does not allow."""


def local_files_param(url: str) -> str | None:
    """The ``d`` parameter of a ``/data/local-files/?d=...`` URL (relative or on any host), else None."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.path.rstrip("/") != LOCAL_FILES_PATH:
        return None
    values = urllib.parse.parse_qs(parsed.query, keep_blank_values=True).get("d")
    if not values:
        raise LocalFileRefused("local-files URL without a 'd' parameter")
    return values[0]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class LocalFilesPolicy:
    """See the module docstring. Paths are resolved (real) when the policy is built."""

    root: Path
    servable: tuple[Path, ...]
    denied: tuple[Path, ...] = ()
    max_bytes: int = 64 * 1024 * 1024

    @classmethod
    def build(cls, root: str | os.PathLike[str], servable: Iterable[str | os.PathLike[str]] = (),
              denied: Iterable[str | os.PathLike[str]] = (), max_bytes: int = 64 * 1024 * 1024,
              ) -> LocalFilesPolicy:
        """Resolve and check the folders; :class:`MadsegError` for a root of ``/`` with nothing narrower,
        or a servable folder outside the root."""
        real_root = Path(os.path.realpath(root))
        folders = tuple(Path(os.path.realpath(p)) for p in servable)
        if not folders:
            if real_root == Path(real_root.anchor):
                raise MadsegError(
                    f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root}: the backend will not read local files "
                    "from a document root of /; set the root to the folder holding your images, or list the "
                    "image folders in MADSEG_LOCAL_FILES_DIRS (or set MADSEG_EXPERIMENT: its pool folders)"
                )
            folders = (real_root,)
        for f in folders:
            if not _inside(f, real_root):
                raise MadsegError(f"MADSEG_LOCAL_FILES_DIRS: {f} is outside the document root {real_root}")
            if f == Path(f.anchor):
                raise MadsegError("MADSEG_LOCAL_FILES_DIRS: / is not a folder the backend will read from")
        return cls(real_root, folders, tuple(Path(os.path.realpath(p)) for p in denied), max_bytes)

    def resolve(self, d: str) -> Path:
        """The file a local-files ``d`` parameter names, checked; :class:`LocalFileRefused` otherwise.

        Returns the real path of an existing regular image file; raises :class:`FileNotFoundError`
        when the path is allowed but no such file exists (the caller may download it instead).
        """
        if not isinstance(d, str) or not d or "\x00" in d:
            raise LocalFileRefused("local-files path is empty or contains a NUL byte")
        what = f"local file {d!r}"
        if d.startswith("/"):
            candidate = Path(posixpath.normpath(d))
            if not _inside(Path(os.path.realpath(candidate)), self.root):
                raise LocalFileRefused(f"{what}: absolute path outside the document root")
        else:
            candidate = self.root / d
        real = Path(os.path.realpath(candidate))
        self._check_place(real, what)
        if real.suffix.lower() not in IMAGE_SUFFIXES:
            raise LocalFileRefused(f"{what}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        try:
            st = real.stat()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise LocalFileRefused(f"{what}: cannot be read ({type(exc).__name__})") from None
        if not stat.S_ISREG(st.st_mode):
            raise LocalFileRefused(f"{what}: not a regular file")
        if st.st_size > self.max_bytes:
            raise LocalFileRefused(f"{what}: {st.st_size} bytes is over the limit of {self.max_bytes}")
        return real

    def _check_place(self, real: Path, what: str) -> None:
        if not any(_inside(real, f) for f in self.servable):
            raise LocalFileRefused(f"{what}: outside the folders the backend serves")
        if any(_inside(real, f) for f in self.denied):
            raise LocalFileRefused(f"{what}: in a folder the backend never serves (ground truth, models)")

    def read(self, d: str) -> bytes:
        """The bytes of the checked file (read at most ``max_bytes + 1``: a file that grew is refused).

        The file that was actually opened is checked again (on Linux via ``/proc/self/fd``), so a
        symlink swapped in between the check and the open cannot lead outside.
        """
        path = self.resolve(d)
        with open(path, "rb") as fh:
            fd_link = f"/proc/self/fd/{fh.fileno()}"
            if os.path.exists(fd_link):
                self._check_place(Path(os.path.realpath(fd_link)), f"local file {d!r}")
            data = fh.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise LocalFileRefused(f"local file {d!r}: over the limit of {self.max_bytes} bytes")
        return data
