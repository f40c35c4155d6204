"""The segmentation project of a round (I/O): push S with pre-annotations, progress.

- :func:`push_segmentation_tasks`: S with brush pre-annotations of the target's prediction,
  validated before sending (bulk and idempotent, :func:`projects.round_projects.push_tasks`).
- :func:`segmentation_progress`. Finished masks are exported by
  :func:`ml_backend.labelstudio.export.export_masks`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_backend.classes import VOC_CLASSES
from ml_backend.labelmaps import resize_labels
from ml_backend.labelstudio import configs
from ml_backend.labelstudio.brush import class_map_results, validate_brush_prediction
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.export import image_wh, project_label_config
from ml_backend.labelstudio.local_files import local_files_url, relative_to_root, resolve_document_root

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


def push_segmentation_tasks(
    client: LabelStudioClient,
    project_id: int,
    candidates: Sequence[Mapping[str, Any]],
    *,
    predictions: LabelMaps | str | os.PathLike[str],
    model_version: str,
    classes: Sequence[str] = VOC_CLASSES,
    scores: Mapping[str, float] | None = None,
    document_root: str | os.PathLike[str] | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
) -> PushResult:
    """Push S into the segmentation project with the target's prediction as pre-annotation.

    One brush result per predicted class (label maps resized to the image with nearest
    neighbour), ``model_version`` and a score (``scores[id]``, default 0) per prediction, all
    validated before sending. The project's ``model_version`` is set so the pre-annotations show.
    """
    root = resolve_document_root(document_root)
    title, config = project_label_config(client, project_id)
    ctl = configs.validate_segmentation_config(config, classes,
                                               f"segmentation project {project_id} ({title!r})")
    cands = check_candidates(candidates)
    for c in cands:
        relative_to_root(c["path"], root, f"image {c['id']}")
    ensure_storages(client, project_id, {str(Path(c["path"]).parent) for c in cands}, root)
    maps = as_label_maps(predictions, len(classes))
    scores = scores or {}
    classes = list(classes)

    def maker(c: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        def make() -> dict[str, Any]:
            iid = c["id"]
            w, h = image_wh(c["path"])
            lm = resize_labels(maps(iid), (h, w))
            pred = {"model_version": str(model_version), "score": float(scores.get(iid, 0.0)),
                    "result": class_map_results(lm, classes, ctl)}
            validate_brush_prediction(pred, ctl, (w, h), f"image {iid}", decode_rle=False)
            return {
                "data": {ctl.image_key: local_files_url(c["path"], root), "image_id": iid},
                "meta": {"image_id": iid, "path": os.path.abspath(c["path"])},
                "predictions": [pred],
            }

        return make

    result = push_tasks(client, project_id, [(c["id"], maker(c)) for c in cands], batch_size=batch_size,
                        progress=progress, desc=f"segmentation tasks -> project {project_id}")
    if result.task_ids:  # Label Studio accepts a model version only once predictions carry it
        client.request("PATCH", f"api/projects/{project_id}",
                       f"setting model version of project {project_id}",
                       json={"model_version": str(model_version), "show_collab_predictions": True})
    return result


def segmentation_progress(client: LabelStudioClient, project_id: int) -> tuple[int, int]:
    """(tasks with a submitted annotation, all tasks) of a segmentation project."""
    done = total = 0
    for t in iter_tasks(client, project_id):
        total += 1
        if int(t.get("total_annotations") or 0) > 0:
            done += 1
    return done, total
