"""Label Studio local-files URLs: the document root, task URLs of files under it, and back.

Label Studio serves a file under ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` as
``/data/local-files/?d=<path under the root>`` (when a local-files storage covers its folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

from ..errors import MadsegError

LOCAL_FILES_PREFIX = "/data/local-files/?d="
DOC_ROOT_ENV = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"


def resolve_document_root(document_root: str | os.PathLike[str] | None) -> Path:
    """The local-files document root: the argument, else ``$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``."""
    root = document_root if document_root is not None else os.environ.get(DOC_ROOT_ENV)
    if not root:
        raise MadsegError(
            f"no Label Studio document root given; pass --document-root or set {DOC_ROOT_ENV} to the "
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT Label Studio runs with"
        )
    path = Path(os.path.abspath(root))
    if not path.is_dir():
        raise MadsegError(f"Label Studio document root {path} is not a folder")
    return path


def relative_to_root(path: str | os.PathLike[str], document_root: Path, what: str = "file") -> str:
    """``path`` relative to ``document_root`` (POSIX), or a clear error when it is outside."""
    p = Path(os.path.abspath(path))
    try:
        rel = p.relative_to(document_root)
    except ValueError:
        raise MadsegError(
            f"{what} {p} is outside the Label Studio document root {document_root}; Label Studio can "
            "only serve files under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: move the file or restart "
            "Label Studio with a document root that contains it"
        ) from None
    if not rel.parts:
        raise MadsegError(f"{what} {p} is the document root itself; use a file or folder inside it")
    return rel.as_posix()


def local_files_url(path: str | os.PathLike[str], document_root: Path, what: str = "image") -> str:
    """Task URL ``/data/local-files/?d=<path under the document root>`` of a local file."""
    return LOCAL_FILES_PREFIX + quote(relative_to_root(path, document_root, what), safe="/")


def path_from_url(url: str, document_root: Path | None) -> Path | None:
    """The local file behind a ``/data/local-files/?d=...`` URL, or None for other URLs."""
    parsed = urlparse(url)
    if not parsed.path.endswith("/data/local-files/"):
        return None
    d = parse_qs(parsed.query).get("d")
    if not d or document_root is None:
        return None
    return document_root / d[0]
