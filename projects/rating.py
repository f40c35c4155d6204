"""The rating project of a round (I/O): push the candidates M, collect the ratings, progress.

- :func:`push_rating_tasks`: candidates M with pre-blended overlays of the target's prediction
  (bulk and idempotent, :func:`projects.round_projects.push_tasks`).
- :func:`collect_ratings`: every submitted rating (parsed and checked by :mod:`projects.mos`, which
  also turns them into mean opinion scores); :func:`rating_progress`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_backend.classes import VOC_CLASSES
from ml_backend.labelstudio import configs
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.export import (
    export_tasks,
    is_finished,
    project_label_config,
    safe_stem,
    task_image_id,
)
from ml_backend.labelstudio.local_files import local_files_url, relative_to_root, resolve_document_root

from .mos import Rating, parse_rating_result
from .round_projects import (
    DEFAULT_BATCH,
    LabelMaps,
    PushResult,
    as_label_maps,
    check_candidates,
    ensure_storages,
    iter_tasks,
    push_tasks,
)

log = logging.getLogger(__name__)


def push_rating_tasks(
    client: LabelStudioClient,
    project_id: int,
    candidates: Sequence[Mapping[str, Any]],
    *,
    predictions: LabelMaps | str | os.PathLike[str],
    overlay_dir: str | os.PathLike[str],
    document_root: str | os.PathLike[str] | None = None,
    num_classes: int = len(VOC_CLASSES),
    alpha: float = 0.55,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
) -> PushResult:
    """Push candidates M into the rating project: one task per image with the photo and an overlay
    of the target's prediction (written to ``overlay_dir/<id>.png``, kept for re-runs).

    ``predictions``: a folder of ``<id>.png`` label maps or a function image id -> (H, W) map.
    Images and overlays must be under the document root; storages are registered as needed.
    """
    from ml_backend.imageio import read_rgb

    from .overlay import write_overlay

    root = resolve_document_root(document_root)
    title, config = project_label_config(client, project_id)
    ctl = configs.validate_rating_config(config, f"rating project {project_id} ({title!r})")
    cands = check_candidates(candidates)
    overlay_dir = Path(os.path.abspath(overlay_dir))
    overlay_dir.mkdir(parents=True, exist_ok=True)
    for c in cands:
        relative_to_root(c["path"], root, f"image {c['id']}")
    relative_to_root(overlay_dir, root, "overlay folder")
    ensure_storages(client, project_id, [overlay_dir, *{str(Path(c["path"]).parent) for c in cands}], root)
    maps = as_label_maps(predictions, num_classes)

    def maker(c: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        def make() -> dict[str, Any]:
            iid = c["id"]
            ov = overlay_dir / f"{safe_stem(iid)}.png"
            if not ov.exists():
                write_overlay(ov, read_rgb(c["path"]), maps(iid), alpha)
            return {
                "data": {ctl.image_key: local_files_url(c["path"], root), ctl.overlay_key:
                         local_files_url(ov, root, "overlay"), "image_id": iid},
                "meta": {"image_id": iid, "path": os.path.abspath(c["path"])},
            }

        return make

    return push_tasks(client, project_id, [(c["id"], maker(c)) for c in cands], batch_size=batch_size,
                      progress=progress, desc=f"rating tasks -> project {project_id}")


def _annotator(annotation: Mapping[str, Any]) -> int:
    cb = annotation.get("completed_by")
    if isinstance(cb, Mapping):
        cb = cb.get("id")
    try:
        return int(cb)
    except (TypeError, ValueError):
        return -1


def collect_ratings(client: LabelStudioClient, project_id: int) -> list[Rating]:
    """Every submitted rating of the project (cancelled / skipped ones left out).

    The label config is checked first; a malformed rating raises
    :class:`projects.mos.RatingError` naming the project, task and annotation.
    """
    title, config = project_label_config(client, project_id)
    ctl = configs.validate_rating_config(config, f"rating project {project_id} ({title!r})")
    out: list[Rating] = []
    for task in export_tasks(client, project_id):
        iid = task_image_id(task)
        if iid is None:
            log.warning("project %d task %s has no image id; ignored", project_id, task.get("id"))
            continue
        for ann in task.get("annotations") or []:
            if not is_finished(ann):
                continue
            where = f"rating project {project_id}, task {task.get('id')}, annotation {ann.get('id')}"
            score, ood = parse_rating_result(ann.get("result") or [], where, rating_from=ctl.rating_from,
                                             ood_from=ctl.ood_from)
            out.append(Rating(iid, _annotator(ann), score, ood, int(task["id"]), int(ann["id"])))
    return out


def rating_progress(client: LabelStudioClient, project_id: int, raters_per_task: int) -> tuple[int, int]:
    """(tasks rated by ``raters_per_task`` raters, all tasks) of a rating project."""
    done = total = 0
    for t in iter_tasks(client, project_id):
        total += 1
        finished = int(t.get("total_annotations") or 0)
        if finished >= raters_per_task:
            done += 1
    return done, total
