"""Reading a project back from Label Studio: its config, its tasks, and finished masks as a labelled folder.

:func:`export_masks` writes every finished brush annotation of a segmentation project as
``images/`` + ``masks/`` (mode-P PNGs, 255 = unpainted); the ML backend's fine-tune jobs and the
rounds both use it. Every function takes a :class:`.client.LabelStudioClient`.

Where a task's image may come from (:class:`ExportImagePolicy`, the same rules as the backend's
``/predict``, :mod:`ml_backend.labelstudio.task_images`): the image is the one the task's data URL
names (what the annotator painted on; ``meta.path`` is not trusted, since anyone who can import
tasks can set it):

- ``/data/local-files/?d=<path>``: read from disk only when the
  :class:`ml_backend.localfiles.LocalFilesPolicy` allows the path (inside the servable folders under
  the document root after ``..`` and symlinks, an image file, never a ground-truth folder, a byte
  cap). A refused path is refused (no download either). An allowed path missing on this machine, or
  any local-files URL when there is no local policy, is downloaded from Label Studio, which applies
  its own local-files rules;
- any other path on Label Studio (``/data/upload/...``) or URL on its origin: downloaded with the
  client's credentials (sent to that origin only);
- an ``http(s)`` URL on another host: downloaded without credentials, only when listed in
  ``image_hosts`` and public after DNS resolution (:mod:`ml_backend.netguard`).

Every image is held to a byte cap and a pixel cap read from its header (never decoded beyond it).
A refused or unreadable image skips its task with a log line naming the project and task; the rest
of the export goes on. When finished tasks exist but none of their images could be used, the export
raises one :class:`MadsegError` saying why.
"""

from __future__ import annotations

import io
import logging
import os
import re
import urllib.parse
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ..classes import IGNORE_INDEX, VOC_CLASSES
from ..errors import ImageReadError, MadsegError
from ..limits import Deadline
from ..localfiles import LocalFileRefused, LocalFilesPolicy, local_files_param
from ..netguard import FetchError, HostRule, Origin, UrlPolicy, UrlRefused, fetch_retrying, origin_of
from . import configs
from .brush import AnnotationError, annotation_mask
from .client import LabelStudioClient
from .local_files import DOC_ROOT_ENV

log = logging.getLogger(__name__)

_STEM_RE = re.compile(r"[^A-Za-z0-9._-]+")
#: File suffix written for each image format the export accepts (PIL format name -> suffix).
_FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
_CREDENTIAL_HEADERS = ("authorization", "x-api-key")


def project_label_config(client: LabelStudioClient, project_id: int) -> tuple[str, str]:
    """(title, label config) of a project."""
    proj = client.request("GET", f"api/projects/{project_id}", f"reading project {project_id}")
    return str(proj.get("title", project_id)), str(proj.get("label_config", ""))




def task_image_id(task: Mapping[str, Any]) -> str | None:
    """The madseg image id of a task (``meta.image_id`` or ``data.image_id``)."""
    for part in ("meta", "data"):
        d = task.get(part)
        if isinstance(d, Mapping) and d.get("image_id") not in (None, ""):
            return str(d["image_id"])
    return None




def export_tasks(client: LabelStudioClient, project_id: int) -> list[dict[str, Any]]:
    """Every task of the project with its annotations (JSON export, one request)."""
    body = client.request("GET", f"api/projects/{project_id}/export", f"exporting project {project_id}",
                          params={"exportType": "JSON", "download_all_tasks": "true"}, timeout_s=600)
    if not isinstance(body, list):
        raise MadsegError(f"Label Studio at {client.url}: project {project_id} export is not a task list")
    return body




def is_finished(annotation: Mapping[str, Any]) -> bool:
    """True for a submitted annotation (not cancelled / skipped)."""
    return not annotation.get("was_cancelled")




def _oriented_wh(im: Any) -> tuple[int, int]:
    orientation = im.getexif().get(0x0112, 1)
    w, h = im.size
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return int(w), int(h)


def image_wh(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of an image file after EXIF orientation (Label Studio's order; header only).

    ``ml_backend.datasets.image_hw`` is the (height, width) twin (it needs torch; this does not).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _oriented_wh(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def image_header(data: bytes, name: str, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, suffix) of encoded image bytes, from the header only (EXIF orientation applied,
    Label Studio's order); ``suffix`` is the file suffix of its format (``.jpg``, ``.png``, ``.webp``,
    ``.bmp``). :class:`ImageReadError` naming ``name`` for non-images, other formats, or more than
    ``max_pixels`` pixels (refused before any pixel is decoded)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = str(im.format or "")
                if im.width * im.height > max_pixels:
                    raise ImageReadError(f"{name}: {im.width}x{im.height} pixels is over the limit of "
                                         f"{max_pixels} pixels (MADSEG_MAX_IMAGE_PIXELS)")
                w, h = _oriented_wh(im)
    except Image.DecompressionBombError:
        raise ImageReadError(f"{name}: image header announces too many pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable image ({type(exc).__name__})") from None
    if fmt not in _FORMAT_SUFFIX:
        raise ImageReadError(f"{name}: {fmt or 'unknown'} images are not supported "
                             f"(JPEG, PNG, WebP, BMP)")
    return w, h, _FORMAT_SUFFIX[fmt]




def safe_stem(image_id: str) -> str:
    """A file stem for an image id (characters outside ``A-Za-z0-9._-`` -> ``_``, at most 150)."""
    stem = _STEM_RE.sub("_", image_id).strip("._") or "image"
    return stem[:150]




def latest_finished(annotations: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The most recently updated submitted annotation, or None."""
    done = [a for a in annotations if is_finished(a)]
    if not done:
        return None
    return max(done, key=lambda a: (str(a.get("updated_at") or ""), int(a.get("id") or 0)))


# ----------------------------------------------------------------------------------------------
# where task images may come from
# ----------------------------------------------------------------------------------------------


class ImageRefused(MadsegError):
    """A task image the export will not use (refused by the policy, or not fetchable / readable)."""


@dataclass(frozen=True)
class ExportImagePolicy:
    """Where :func:`export_masks` may read task images from (module docstring).

    ``local``: the local-files policy (None: local-files images are downloaded from Label Studio);
    ``image_hosts``: hosts other than Label Studio that image URLs may point to; ``max_bytes`` /
    ``max_pixels``: caps per image; ``connect_s`` / ``read_s`` / ``deadline_s``: per download.
    """

    local: LocalFilesPolicy | None = None
    image_hosts: tuple[HostRule, ...] = ()
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    connect_s: float = 5.0
    read_s: float = 20.0
    deadline_s: float = 120.0

    @classmethod
    def for_folders(
        cls, document_root: str | os.PathLike[str], servable: Iterable[str | os.PathLike[str]] = (),
        denied: Iterable[str | os.PathLike[str]] = (), **caps: Any,
    ) -> ExportImagePolicy:
        """Local files from ``servable`` folders under ``document_root`` (the root itself when none are
        given), never from ``denied`` ones; :class:`MadsegError` for a root of ``/`` with nothing
        narrower or a folder outside the root. E.g. a round: the experiment's pool folders, its
        ground-truth mask folders denied."""
        max_bytes = int(caps.get("max_bytes", cls.max_bytes))
        local = LocalFilesPolicy.build(document_root, servable, denied, max_bytes)
        return cls(local=local, **caps)

    @classmethod
    def for_document_root(cls, document_root: str | os.PathLike[str] | None = None) -> ExportImagePolicy:
        """An operator's export (``madseg ls export-masks``): local files from anywhere under
        ``document_root`` (default ``$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``). Without a root, or with
        a root of ``/``, nothing is read from disk: local-files images are downloaded from Label Studio."""
        root = document_root if document_root is not None else os.environ.get(DOC_ROOT_ENV) or None
        if root is None:
            return cls()
        if not Path(root).is_dir():
            raise MadsegError(f"Label Studio document root {root} is not a folder")
        try:
            return cls.for_folders(root)
        except MadsegError:
            log.warning("document root %s is too broad to read task images from disk; downloading them "
                        "from Label Studio instead", root)
            return cls()

    @classmethod
    def from_backend_config(cls, config: Any) -> ExportImagePolicy:
        """The policy of a :class:`ml_backend.backend_config.BackendConfig`: the same local-files
        policy, image hosts and caps as its ``/predict``. A config whose local-files policy cannot be
        built (a root of ``/`` with nothing narrower; ``madseg backend`` refuses to start then) reads
        nothing from disk."""
        try:
            local = config.local_files_policy()
        except MadsegError as exc:
            log.warning("fine-tune exports read no task image from disk: %s", exc)
            local = None
        return cls(local=local, image_hosts=tuple(config.image_hosts), max_bytes=int(config.max_image_bytes),
                   max_pixels=int(config.max_image_pixels), connect_s=float(config.fetch_connect_s),
                   read_s=float(config.fetch_read_s))

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (what a queued fine-tune job carries)."""
        local = None
        if self.local is not None:
            local = {"root": str(self.local.root), "servable": [str(p) for p in self.local.servable],
                     "denied": [str(p) for p in self.local.denied], "max_bytes": self.local.max_bytes}
        return {"local": local, "image_hosts": [[r.host, r.port] for r in self.image_hosts],
                "max_bytes": self.max_bytes, "max_pixels": self.max_pixels, "connect_s": self.connect_s,
                "read_s": self.read_s, "deadline_s": self.deadline_s}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> ExportImagePolicy:
        """Inverse of :meth:`to_json`; ``None`` or ``{}`` -> the default (nothing read from disk, no
        hosts but Label Studio). :class:`MadsegError` for a malformed object."""
        if not obj:
            return cls()
        if not isinstance(obj, Mapping):
            raise MadsegError(f"export image policy: must be an object, got {type(obj).__name__}")
        try:
            loc = obj.get("local")
            local = None
            if loc:
                cap = int(loc.get("max_bytes", cls.max_bytes))
                servable, denied = loc.get("servable") or (), loc.get("denied") or ()
                local = LocalFilesPolicy.build(loc["root"], servable, denied, cap)
            hosts = tuple(HostRule(str(h), None if p is None else int(p))
                          for h, p in obj.get("image_hosts") or ())
            return cls(local=local, image_hosts=hosts, max_bytes=int(obj.get("max_bytes", cls.max_bytes)),
                       max_pixels=int(obj.get("max_pixels", cls.max_pixels)),
                       connect_s=float(obj.get("connect_s", cls.connect_s)),
                       read_s=float(obj.get("read_s", cls.read_s)),
                       deadline_s=float(obj.get("deadline_s", cls.deadline_s)))
        except (KeyError, TypeError, ValueError) as exc:
            raise MadsegError(f"export image policy: malformed ({type(exc).__name__}: {exc})") from None


def _credentials(client: LabelStudioClient) -> dict[str, str]:
    """The client's Label Studio credential headers (``Authorization`` / ``X-API-Key``) only."""
    try:
        headers = client.sdk._client_wrapper.get_headers()
    except AttributeError:
        return {}
    return {k: v for k, v in headers.items() if k.lower() in _CREDENTIAL_HEADERS}


class TaskImageReader:
    """Reads task images for one export under an :class:`ExportImagePolicy` (module docstring)."""

    def __init__(self, client: LabelStudioClient, images: ExportImagePolicy) -> None:
        self.images = images
        self.base_url = client.url.rstrip("/")
        self.origin: Origin = origin_of(self.base_url)
        self.policy = UrlPolicy.build(self.base_url, images.image_hosts)
        self._client = client

    def _on_label_studio(self, url: str) -> bool:
        try:
            return origin_of(url) == self.origin
        except UrlRefused:
            return False

    def read(self, url: object) -> tuple[bytes, int, int, str]:
        """(bytes, width, height, suffix) of the image at a task's data URL; :class:`ImageRefused` with
        the reason (never a token or query string) otherwise."""
        data = self._bytes(url)
        try:
            w, h, suffix = image_header(data, "the image", self.images.max_pixels)
        except ImageReadError as exc:
            raise ImageRefused(str(exc)) from None
        return data, w, h, suffix

    def _bytes(self, url: object) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise ImageRefused("no image URL in the task data")
        if any(ord(c) < 0x20 or c == "\x7f" for c in url):
            raise ImageRefused("the image URL contains control characters (e.g. a NUL byte)")
        try:
            parsed = urllib.parse.urlsplit(url)
        except ValueError:
            raise ImageRefused("the image URL is not a valid URL") from None
        if parsed.scheme and parsed.scheme.lower() not in ("http", "https"):
            raise ImageRefused(f"{parsed.scheme}:// image URLs are not supported")
        relative = not parsed.scheme and not parsed.netloc
        if relative or self._on_label_studio(url):
            try:
                d = local_files_param(url)
            except LocalFileRefused as exc:
                raise ImageRefused(str(exc)) from None
            if d is not None and self.images.local is not None:
                try:
                    return self.images.local.read(d)
                except LocalFileRefused as exc:
                    raise ImageRefused(str(exc)) from None
                except FileNotFoundError:
                    pass  # allowed, but not on this machine: Label Studio serves it
                except OSError as exc:
                    raise ImageRefused(f"local file {d!r}: cannot be read ({type(exc).__name__})") from None
        if relative:
            url = urllib.parse.urljoin(self.base_url + "/", url.lstrip("/"))
        return self._download(url)

    def _download(self, url: str) -> bytes:
        deadline = Deadline(self.images.deadline_s)

        def creds(origin: Origin) -> Mapping[str, str]:
            return _credentials(self._client) if origin == self.origin else {}

        try:
            return fetch_retrying(url, self.policy, deadline=deadline, max_bytes=self.images.max_bytes,
                                  credentials=creds, connect_timeout=self.images.connect_s,
                                  read_timeout=self.images.read_s)
        except UrlRefused as exc:
            raise ImageRefused(f"image URL refused: {exc}") from None
        except FetchError as exc:
            raise ImageRefused(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# the export
# ----------------------------------------------------------------------------------------------


def _write_atomic(data: bytes, dst: Path) -> None:
    if dst.is_file() and dst.stat().st_size == len(data) and dst.read_bytes() == data:
        return
    atomic_write(dst, lambda out: out.write(data))


def export_masks(
    client: LabelStudioClient,
    project_id: int,
    out_dir: str | os.PathLike[str],
    *,
    classes: Sequence[str] = VOC_CLASSES,
    images: ExportImagePolicy | None = None,
    document_root: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """Export every finished mask of a segmentation project into a labelled folder.

    Writes ``out_dir/images/<stem><ext>`` (a copy of the photo) and ``out_dir/masks/<stem>.png``
    (mode-P PNG, class indices, 255 = unpainted) for each task with a submitted annotation (the
    latest one). Returns image id -> stem. Task images come only from where ``images`` allows
    (default: :meth:`ExportImagePolicy.for_document_root` of ``document_root``); a refused or
    unreadable image skips its task with a warning naming it, and :class:`MadsegError` is raised
    when finished tasks exist but every one was skipped. Unknown labels, bad sizes or malformed RLE
    raise :class:`ml_backend.labelstudio.brush.AnnotationError` /
    :class:`ml_backend.labelstudio.rle.RLEError` naming the task; files are written atomically, so
    a re-run redoes the export safely.
    """
    from ml_backend.imageio import write_mask

    title, config = project_label_config(client, project_id)
    classes = list(classes)
    ctl = configs.validate_segmentation_config(config, classes,
                                               f"segmentation project {project_id} ({title!r})")
    if images is None:
        images = ExportImagePolicy.for_document_root(document_root)
    reader = TaskImageReader(client, images)
    out = Path(out_dir)
    images_dir, masks_dir = out / "images", out / "masks"
    written: dict[str, str] = {}
    used: set[str] = set()
    skipped: list[str] = []
    for task in export_tasks(client, project_id):
        ann = latest_finished(task.get("annotations") or [])
        if ann is None:
            continue
        tid = task.get("id")
        where = f"segmentation project {project_id}, task {tid}, annotation {ann.get('id')}"
        iid = task_image_id(task) or f"task{tid}"
        data_ = task.get("data")
        url = data_.get(ctl.image_key) if isinstance(data_, Mapping) else None
        try:
            data, w, h, suffix = reader.read(url)
        except ImageRefused as exc:
            log.warning("segmentation project %s, task %s: image skipped: %s", project_id, tid, exc)
            skipped.append(f"task {tid}: {exc}")
            continue
        mask = annotation_mask(ann.get("result") or [], classes, ctl, where)
        if mask is None:
            log.warning("%s has no brush regions; exported as all-ignore", where)
            mask = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
        if mask.shape != (h, w):
            raise AnnotationError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                                  f"{w}x{h}")
        stem = safe_stem(iid)
        if stem in used:
            stem = f"{stem}-t{tid}"
        used.add(stem)
        written[iid] = stem
        _write_atomic(data, images_dir / f"{stem}{suffix}")
        write_mask(masks_dir / f"{stem}.png", mask)
    if skipped and not written:
        raise MadsegError(
            f"segmentation project {project_id}: none of its {len(skipped)} finished task(s) has an image "
            f"the export may read (e.g. {skipped[0]}); task images must be local files under the allowed "
            "folders (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, MADSEG_LOCAL_FILES_DIRS), Label Studio "
            "uploads, or URLs on hosts listed in MADSEG_IMAGE_HOSTS"
        )
    if skipped:
        log.warning("segmentation project %s: %d task(s) skipped, %d exported", project_id, len(skipped),
                    len(written))
    return written
