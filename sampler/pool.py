"""The unlabelled pool: which images there are, their content ids, and reading them robustly.

A pool is given as one or more *sources*:

- a folder: every image below it (recursive; ``.jpg .jpeg .png .webp .bmp``, any case), in
  sorted path order, streamed (never listed whole into memory);
- an image file: that image;
- a list file (``.txt .lst .list .csv .tsv``): one entry per line/row — a path (relative paths
  are relative to the list file), a folder, or an ``http(s)://`` URL. In CSV/TSV files the
  column named ``path``, ``url``, ``image``, ``file``, ``filename`` or ``uri`` is used when the
  first row is such a header, otherwise the first column. Blank lines and ``#`` comments are
  skipped;
- an ``http(s)://`` URL.

API:

- ``iter_pool_entries(sources) -> Iterator[str]``: absolute local paths and URLs, in order
  (an entry listed twice is yielded twice; the scorer indexes it once). Symlink loops, folders
  that cannot be listed, entries that cannot be examined, broken symlinks and image names that
  are not regular files (FIFOs, sockets, devices) are yielded as :class:`SkippedEntry` (a path
  with a ``reason``, logged once), which the scorer reports as ``unreadable`` in
  ``pool_report.tsv`` like any unreadable file; the walk goes on;
- ``check_sources(sources)``: MadsegError for a missing/unknown top-level source;
- ``count_pool_entries(sources) -> int``;
- ``read_source(entry, timeout=30.0) -> bytes`` (local regular file — opened non-blocking, so a
  FIFO cannot hang the scan — or URL via ``requests``; raises
  :class:`~ml_backend.errors.ImageReadError` naming the entry);
- ``stat_source(entry) -> (size, mtime_ns) | None`` (``None`` for URLs);
- ``content_id(data) -> str``: the image id, the 32-hex-digit BLAKE2b-128 of the file bytes;
- ``decode_image(data, name) -> (rgb (H, W, 3) uint8, source_mode)`` via
  :func:`ml_backend.imageio.decode_rgb`, which converts CMYK, 16-bit, palette, alpha and
  grayscale images to RGB and raises ``ImageReadError`` for corrupt, truncated, zero-byte,
  non-image and decompression-bomb files. ``source_mode`` is the PIL mode before conversion
  (e.g. ``"CMYK"``), reported for converted images.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from ml_backend.errors import ImageReadError, MadsegError
from ml_backend.imageio import IMAGE_SUFFIXES, decode_rgb

LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv", ".tsv")
HEADER_NAMES = ("path", "url", "image", "file", "filename", "uri")
#: Largest download accepted from a URL (bytes).
MAX_URL_BYTES = 256 * 1024 * 1024

log = logging.getLogger(__name__)


def is_url(entry: str) -> bool:
    """Whether ``entry`` is an http(s) URL."""
    low = entry[:8].lower()
    return low.startswith("http://") or low.startswith("https://")


class SkippedEntry(str):
    """A path met while walking a pool folder that cannot be used: a symlink loop, a folder that
    cannot be listed, an entry that cannot be examined, a broken symlink, or an image name that is
    not a regular file (a FIFO would block the reader). It is still yielded (a ``str``: the path)
    so that the scorer records it like a bad image — :func:`stat_source` and :func:`read_source`
    raise :class:`ImageReadError` with ``reason`` — and it appears in ``pool_report.tsv`` as
    ``unreadable``. The walk logs one warning line per skipped path and carries on."""

    reason: str

    def __new__(cls, path: str, reason: str) -> SkippedEntry:
        obj = super().__new__(cls, path)
        obj.reason = reason
        return obj


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _skip(path: str, reason: str) -> SkippedEntry:
    path = os.path.abspath(path)
    log.warning("pool: skipped %s: %s", path, reason)
    return SkippedEntry(path, reason)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _loop_reason(entry: os.DirEntry[str], ancestor: str) -> str:
    if entry.is_symlink():
        try:
            target = os.readlink(entry.path)
        except OSError:
            target = "?"
        return f"symlink loop ({entry.name} -> {target} leads back to {ancestor}); not followed"
    return f"folder loop (the same folder as {ancestor}, e.g. a bind mount); not followed"


def _walk_images(folder: Path) -> Iterator[str]:
    """Image files below ``folder``, recursive, in sorted order, one directory at a time.

    Symlinked folders are followed unless they lead back to a folder on the current path (a
    loop); loops, folders that cannot be listed, entries that cannot be examined, broken
    symlinks and image names that are not regular files are yielded as :class:`SkippedEntry`
    (reported, then skipped like bad images) and the walk continues.
    """
    try:
        st = os.stat(folder)
    except OSError as exc:
        yield _skip(str(folder), f"cannot read folder ({_why(exc)})")
        return
    # each pending folder carries its ancestors' (device, inode) -> path, to recognise loops
    stack: list[tuple[str, dict[tuple[int, int], str]]] = [
        (str(folder), {(st.st_dev, st.st_ino): os.path.abspath(folder)})
    ]
    while stack:
        cur, ancestors = stack.pop()
        try:
            with os.scandir(cur) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield _skip(cur, f"cannot list folder ({_why(exc)})")
            continue
        dirs: list[tuple[str, dict[tuple[int, int], str]]] = []
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=True)
                if is_dir:
                    est = e.stat(follow_symlinks=True)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    yield _skip(e.path, "symlink loop (too many levels of symbolic links); not followed")
                else:
                    yield _skip(e.path, f"cannot examine entry ({_why(exc)})")
                continue
            if is_dir:
                key = (est.st_dev, est.st_ino)
                if key in ancestors:
                    yield _skip(e.path, _loop_reason(e, ancestors[key]))
                else:
                    dirs.append((e.path, {**ancestors, key: os.path.abspath(e.path)}))
                continue
            is_image = e.name.lower().endswith(IMAGE_SUFFIXES)
            if e.is_symlink() and not os.path.exists(e.path):
                try:
                    target = os.readlink(e.path)
                except OSError:
                    target = "?"
                yield _skip(e.path, f"broken symlink (-> {target})")
            elif is_image and not e.is_file(follow_symlinks=True):
                try:
                    kind = _file_kind(e.stat(follow_symlinks=True).st_mode)
                except OSError as exc:
                    kind = f"cannot examine entry ({_why(exc)})"
                yield _skip(e.path, f"{kind}, not an image file")
            elif is_image:
                yield os.path.abspath(e.path)
        stack.extend(reversed(dirs))


def _list_entries(list_file: Path) -> Iterator[str]:
    """Raw entries of a list file (paths relative to the list file resolved)."""
    base = list_file.parent
    suffix = list_file.suffix.lower()
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MadsegError(f"{list_file}: cannot read pool list ({exc})") from None
    with io.StringIO(text, newline="") as fh:
        if suffix in (".csv", ".tsv"):
            reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            col = 0
            first = True
            for row in reader:
                if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                    continue
                if first:
                    first = False
                    low = [c.strip().lower() for c in row]
                    hits = [i for i, c in enumerate(low) if c in HEADER_NAMES]
                    if hits:
                        col = hits[0]
                        continue
                if col < len(row) and row[col].strip():
                    yield _resolve(row[col].strip(), base)
        else:
            for line in fh:
                s = line.strip()
                if s and not s.startswith("#"):
                    yield _resolve(s, base)


def _resolve(entry: str, base: Path) -> str:
    if is_url(entry):
        return entry
    p = Path(os.path.expanduser(entry))
    return os.path.abspath(p if p.is_absolute() else base / p)


def _expand(entry: str, *, top_level: bool) -> Iterator[str]:
    if is_url(entry):
        yield entry
        return
    p = Path(entry)
    if p.is_dir():
        yield from _walk_images(p)
    elif p.suffix.lower() in LIST_SUFFIXES and (top_level or p.is_file()):
        if not p.is_file():
            raise MadsegError(f"pool list {p} does not exist; check the path")
        for sub in _list_entries(p):
            # entries of a list are images, folders or URLs (no nested lists)
            if not is_url(sub) and Path(sub).is_dir():
                yield from _walk_images(Path(sub))
            else:
                yield sub
    elif top_level and not p.exists():
        raise MadsegError(f"pool source {p} does not exist; give a folder, an image, a list file or a URL")
    elif top_level and p.suffix.lower() not in IMAGE_SUFFIXES:
        raise MadsegError(
            f"pool source {p} is neither a folder, an image ({' '.join(IMAGE_SUFFIXES)}) nor a list "
            f"file ({' '.join(LIST_SUFFIXES)})"
        )
    else:
        yield os.path.abspath(p)


def iter_pool_entries(sources: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    """Every pool entry (absolute path or URL) of ``sources``, in a deterministic order."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    for src in sources:
        yield from _expand(str(src), top_level=True)


def check_sources(sources: Sequence[str | os.PathLike[str]]) -> None:
    """Raise :class:`MadsegError` for a top-level source that is missing or of an unknown kind,
    or a list file that cannot be read (without walking folders)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise MadsegError("no pool given; pass a folder, an image, a list file or a URL")
    for src in sources:
        s = str(src)
        if is_url(s):
            continue
        p = Path(s)
        if p.is_dir():
            continue
        if not p.exists():
            raise MadsegError(
                f"pool source {p} does not exist; give a folder, an image, a list file or a URL"
            )
        if p.suffix.lower() in LIST_SUFFIXES:
            if not os.access(p, os.R_OK):
                raise MadsegError(f"pool list {p} is not readable; check its permissions")
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            raise MadsegError(
                f"pool source {p} is neither a folder, an image ({' '.join(IMAGE_SUFFIXES)}) nor a list "
                f"file ({' '.join(LIST_SUFFIXES)})"
            )


def count_pool_entries(sources: Sequence[str | os.PathLike[str]]) -> int:
    """Number of entries :func:`iter_pool_entries` yields."""
    return sum(1 for _ in iter_pool_entries(sources))


def stat_source(entry: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a local file; ``None`` for URLs; raises ImageReadError if missing."""
    if isinstance(entry, SkippedEntry):
        raise ImageReadError(f"{entry}: {entry.reason}")
    if is_url(entry):
        return None
    try:
        st = os.stat(entry)
    except OSError as exc:
        raise ImageReadError(f"{entry}: cannot read file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{entry}: {_file_kind(st.st_mode)}, not an image file")
    return st.st_size, st.st_mtime_ns


def read_source(entry: str, timeout: float = 30.0) -> bytes:
    """The bytes of a local file or URL; :class:`ImageReadError` naming ``entry`` on failure."""
    if isinstance(entry, SkippedEntry):
        raise ImageReadError(f"{entry}: {entry.reason}")
    if not is_url(entry):
        try:
            # O_NONBLOCK: opening a FIFO must not hang; anything but a regular file is refused
            fd = os.open(entry, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise ImageReadError(f"{entry}: cannot read file ({exc.strerror or exc})") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise ImageReadError(f"{entry}: {_file_kind(mode)}, not an image file")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return fh.read()
        except OSError as exc:
            raise ImageReadError(f"{entry}: cannot read file ({exc.strerror or exc})") from None
        finally:
            os.close(fd)
    import requests

    try:
        with requests.get(entry, timeout=timeout, stream=True) as resp:
            if resp.status_code != 200:
                raise ImageReadError(f"{entry}: download failed (HTTP {resp.status_code})")
            buf = io.BytesIO()
            for chunk in resp.iter_content(1 << 16):
                buf.write(chunk)
                if buf.tell() > MAX_URL_BYTES:
                    raise ImageReadError(f"{entry}: download larger than {MAX_URL_BYTES} bytes; refused")
            return buf.getvalue()
    except requests.RequestException as exc:
        raise ImageReadError(f"{entry}: download failed ({type(exc).__name__}: {exc})") from None


def content_id(data: bytes) -> str:
    """Stable image id: BLAKE2b-128 of the file bytes as 32 hex digits."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_image(data: bytes, name: str) -> tuple[object, str]:
    """Decode to RGB: ``(rgb (H, W, 3) uint8 ndarray, PIL mode of the file before conversion)``.

    Raises :class:`ImageReadError` (naming ``name``) for anything that is not a readable image.
    """
    rgb = decode_rgb(data, name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
    except Exception:  # decode_rgb succeeded, so this cannot normally fail
        mode = "?"
    return rgb, mode
