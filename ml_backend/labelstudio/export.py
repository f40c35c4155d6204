"""Reading a project back from Label Studio: its config, its tasks, and finished masks as a labelled folder.

:func:`export_masks` writes every finished brush annotation of a segmentation project as
``images/`` + ``masks/`` (mode-P PNGs, 255 = unpainted); the ML backend's fine-tune jobs and the
rounds both use it. Every function takes a :class:`.client.LabelStudioClient`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ..classes import IGNORE_INDEX, VOC_CLASSES
from ..errors import MadsegError
from . import configs
from .brush import AnnotationError, annotation_mask
from .client import LabelStudioClient
from .local_files import DOC_ROOT_ENV, path_from_url, resolve_document_root

log = logging.getLogger(__name__)

_STEM_RE = re.compile(r"[^A-Za-z0-9._-]+")


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




def image_wh(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of an image file after EXIF orientation (Label Studio's order; header only).

    ``ml_backend.datasets.image_hw`` is the (height, width) twin (it needs torch; this does not).
    """
    from PIL import Image

    from ml_backend.errors import ImageReadError

    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
            w, h = im.size
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            return int(w), int(h)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None




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


def _copy_atomic(src: Path, dst: Path) -> None:
    if dst.exists():
        a, b = src.stat(), dst.stat()
        if a.st_size == b.st_size and b.st_mtime >= a.st_mtime:
            return
    with open(src, "rb") as fh:
        atomic_write(dst, lambda out: shutil.copyfileobj(fh, out, 1 << 20))


def export_masks(
    client: LabelStudioClient,
    project_id: int,
    out_dir: str | os.PathLike[str],
    *,
    classes: Sequence[str] = VOC_CLASSES,
    document_root: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """Export every finished mask of a segmentation project into a labelled folder.

    Writes ``out_dir/images/<stem><ext>`` (a copy of the photo) and ``out_dir/masks/<stem>.png``
    (mode-P PNG, class indices, 255 = unpainted) for each task with a submitted annotation (the
    latest one). Returns image id -> stem. Unknown labels, bad sizes or malformed RLE raise
    :class:`ml_backend.labelstudio.brush.AnnotationError` / :class:`ml_backend.labelstudio.rle.RLEError`
    naming the task; files are written atomically, so a re-run redoes the export safely.
    """
    from ml_backend.imageio import write_mask

    title, config = project_label_config(client, project_id)
    classes = list(classes)
    ctl = configs.validate_segmentation_config(config, classes,
                                               f"segmentation project {project_id} ({title!r})")
    root: Path | None = None
    if document_root is not None or os.environ.get(DOC_ROOT_ENV):
        root = resolve_document_root(document_root)
    out = Path(out_dir)
    images_dir, masks_dir = out / "images", out / "masks"
    written: dict[str, str] = {}
    used: set[str] = set()
    for task in export_tasks(client, project_id):
        ann = latest_finished(task.get("annotations") or [])
        if ann is None:
            continue
        tid = task.get("id")
        where = f"segmentation project {project_id}, task {tid}, annotation {ann.get('id')}"
        iid = task_image_id(task) or f"task{tid}"
        src = (task.get("meta") or {}).get("path")
        url = str((task.get("data") or {}).get(ctl.image_key, ""))
        image_path = Path(src) if src else path_from_url(url, root)
        if image_path is None or not image_path.is_file():
            raise AnnotationError(f"{where}: its image {image_path or '(no local path)'} is not readable "
                                  "here; pass --document-root (the one Label Studio serves local files from)")
        w, h = image_wh(image_path)
        mask = annotation_mask(ann.get("result") or [], classes, ctl, where)
        if mask is None:
            log.warning("%s has no brush regions; exported as all-ignore", where)
            mask = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
        if mask.shape != (h, w):
            raise AnnotationError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but image {image_path} "
                                  f"is {w}x{h}")
        stem = safe_stem(iid)
        if stem in used:
            stem = f"{stem}-t{tid}"
        used.add(stem)
        written[iid] = stem
        _copy_atomic(image_path, images_dir / f"{stem}{image_path.suffix.lower()}")
        write_mask(masks_dir / f"{stem}.png", mask)
    return written
