"""Label Studio set-up for a round: projects, storage, idempotent bulk task import (I/O).

Every function takes a :class:`ml_backend.labelstudio.client.LabelStudioClient`
(``ml_backend.labelstudio.client.connect()``). Connecting the ML backend:
:func:`ml_backend.labelstudio.connect.connect_ml_backend`.

- :func:`create_round_projects`: the rating and the segmentation project of round i (idempotent:
  found again by title).
- :func:`register_local_storage` / :func:`ensure_storages`: local-files storages that let Label
  Studio serve the pool images and overlays (no sync: we import the tasks ourselves).
- :func:`push_tasks`: bulk import (one request per batch), keyed by the image id in task data and
  meta, and idempotent: a re-run after a crash adds only the missing tasks; a batch whose request
  failed is re-checked before it is sent again. What the rating and the segmentation project get
  is built by :mod:`projects.rating` and :mod:`projects.segmentation`.
- :func:`check_candidates`, :func:`label_maps_from_dir`, :func:`as_label_maps`: the inputs of a push.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.classes import VOC_CLASSES
from ml_backend.errors import MadsegError
from ml_backend.labelstudio import configs
from ml_backend.labelstudio.client import LabelStudioClient, LabelStudioUnreachable
from ml_backend.labelstudio.export import task_image_id
from ml_backend.labelstudio.local_files import relative_to_root, resolve_document_root

log = logging.getLogger(__name__)

DEFAULT_BATCH = 250


# ---------------------------------------------------------------------------------------------
# projects
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundProjects:
    """Project ids of one round."""

    rating: int
    segmentation: int

    def to_dict(self) -> dict[str, int]:
        return {"rating": self.rating, "segmentation": self.segmentation}


def round_titles(experiment: str, round_index: int) -> tuple[str, str]:
    """Titles of round ``round_index``'s (rating, segmentation) projects of ``experiment``."""
    name = str(experiment).strip() or "madseg"
    if round_index < 0:
        raise MadsegError(f"round {round_index}: round numbers start at 0")
    return (f"{name} round {round_index}: rating"[:50], f"{name} round {round_index}: segmentation"[:50])


def _find_project(client: LabelStudioClient, title: str) -> dict[str, Any] | None:
    page = client.request("GET", "api/projects", "listing projects",
                          params={"title": title, "page_size": 100, "include": "id,title"})
    items = page.get("results", []) if isinstance(page, dict) else page
    found = [p for p in items or [] if p.get("title") == title]
    return found[0] if found else None


def ensure_project(
    client: LabelStudioClient,
    title: str,
    label_config: str,
    *,
    maximum_annotations: int = 1,
    instructions: str = "",
    sampling: str = "Uniform sampling",
    extra: Mapping[str, Any] | None = None,
) -> int:
    """The project called ``title`` (created, or its settings updated when it exists); its id."""
    if sampling not in ("Sequential sampling", "Uniform sampling", "Uncertainty sampling"):
        raise MadsegError(f"sampling {sampling!r}: use 'Sequential sampling', 'Uniform sampling' or "
                          "'Uncertainty sampling'")
    if maximum_annotations < 1:
        raise MadsegError(f"{maximum_annotations} annotators per task: need at least 1")
    settings: dict[str, Any] = {
        "title": title,
        "label_config": label_config,
        "maximum_annotations": int(maximum_annotations),
        "overlap_cohort_percentage": 100,
        "expert_instruction": instructions,
        "show_instruction": bool(instructions),
        "sampling": sampling,
        "show_skip_button": False,
        "enable_empty_annotation": False,
        "show_collab_predictions": True,
        **(extra or {}),
    }
    existing = _find_project(client, title)
    if existing is None:
        proj = client.request("POST", "api/projects", f"creating project {title!r}", json=settings)
        log.info("created Label Studio project %d %r", proj["id"], title)
        return int(proj["id"])
    pid = int(existing["id"])
    client.request("PATCH", f"api/projects/{pid}", f"updating project {pid}", json=settings)
    return pid


def create_round_projects(
    client: LabelStudioClient,
    experiment: str,
    round_index: int,
    *,
    classes: Sequence[str] = VOC_CLASSES,
    raters_per_task: int = 3,
    rating_instructions: str = configs.RATING_INSTRUCTIONS,
    segmentation_instructions: str = configs.SEGMENTATION_INSTRUCTIONS,
    sampling: str = "Uniform sampling",
    document_root: str | os.PathLike[str] | None = None,
    storage_folders: Iterable[str | os.PathLike[str]] = (),
) -> RoundProjects:
    """Create (or find and update) the rating and segmentation projects of round ``round_index``.

    Rating: ``raters_per_task`` different raters per task (task overlap); segmentation: one
    annotator per task. ``storage_folders`` (pool folders, the round's overlay folder) get a
    local-files storage in both projects (``document_root`` required then).
    """
    if raters_per_task < 1:
        raise MadsegError(f"raters_per_task = {raters_per_task}: need at least one rater per task")
    rating_title, seg_title = round_titles(experiment, round_index)
    rating = ensure_project(
        client, rating_title, configs.rating_config(f"{experiment}, round {round_index}"),
        maximum_annotations=raters_per_task, instructions=rating_instructions, sampling=sampling,
    )
    seg = ensure_project(
        client, seg_title, configs.segmentation_config(classes), maximum_annotations=1,
        instructions=segmentation_instructions, sampling=sampling,
    )
    folders = [Path(f) for f in storage_folders]
    if folders:
        root = resolve_document_root(document_root)
        for pid in (rating, seg):
            ensure_storages(client, pid, folders, root)
    return RoundProjects(rating, seg)


# ---------------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------------


def list_storages(client: LabelStudioClient, project_id: int) -> list[dict[str, Any]]:
    """The project's local-files import storages."""
    items = client.request("GET", "api/storages/localfiles", f"listing storages of project {project_id}",
                           params={"project": project_id})
    return list(items or [])


def register_local_storage(
    client: LabelStudioClient,
    project_id: int,
    folder: str | os.PathLike[str],
    document_root: Path,
    title: str | None = None,
) -> int:
    """A local-files storage on ``folder`` (a subfolder of the document root) for the project;
    idempotent (an existing storage on the same folder is reused). Returns the storage id.

    The storage only grants Label Studio permission to serve the files; it is never synced (the
    tasks are imported by the push functions).
    """
    folder_path = Path(os.path.abspath(folder))
    if not folder_path.is_dir():
        raise MadsegError(f"storage folder {folder_path} does not exist or is not a folder")
    relative_to_root(folder_path, document_root, "storage folder")
    for st in list_storages(client, project_id):
        if os.path.abspath(st.get("path") or "") == str(folder_path):
            return int(st["id"])
    st = client.request(
        "POST", "api/storages/localfiles", f"registering storage {folder_path} for project {project_id}",
        json={"project": project_id, "path": str(folder_path), "title": (title or folder_path.name)[:256],
              "use_blob_urls": False, "recursive_scan": True, "regex_filter": ""},
    )
    log.info("project %d: local-files storage %s on %s", project_id, st["id"], folder_path)
    return int(st["id"])


def ensure_storages(
    client: LabelStudioClient, project_id: int, folders: Iterable[str | os.PathLike[str]], document_root: Path
) -> list[int]:
    """Storages so that every file in ``folders`` can be served; folders already covered by a
    storage of a parent folder are left alone. Returns the storage ids used."""
    have = {os.path.abspath(st.get("path") or ""): int(st["id"]) for st in list_storages(client, project_id)}
    ids: list[int] = []
    for folder in sorted({os.path.abspath(f) for f in folders}):
        covering = [sid for path, sid in have.items() if folder == path or folder.startswith(path + os.sep)]
        if covering:
            ids.append(covering[0])
            continue
        sid = register_local_storage(client, project_id, folder, document_root)
        have[folder] = sid
        ids.append(sid)
    return ids


# ---------------------------------------------------------------------------------------------
# tasks: listing and idempotent bulk import
# ---------------------------------------------------------------------------------------------


def iter_tasks(client: LabelStudioClient, project_id: int, page_size: int = 1000) -> Iterator[dict[str, Any]]:
    """The project's tasks (id, data, meta, annotation counts), page by page."""
    page = 1
    while True:
        body = client.request(
            "GET", "api/tasks", f"listing tasks of project {project_id}",
            params={"project": project_id, "page": page, "page_size": page_size, "fields": "task_only",
                    "include": "id,data,meta,total_annotations,cancelled_annotations,is_labeled"},
        )
        tasks = body.get("tasks", []) if isinstance(body, dict) else body
        yield from tasks
        total = int(body.get("total", 0)) if isinstance(body, dict) else len(tasks)
        if not tasks or page * page_size >= total:
            return
        page += 1


def existing_image_ids(client: LabelStudioClient, project_id: int) -> dict[str, int]:
    """Image id -> task id of the project's tasks that carry one."""
    out: dict[str, int] = {}
    for t in iter_tasks(client, project_id):
        iid = task_image_id(t)
        if iid is not None:
            out.setdefault(iid, int(t["id"]))
    return out


@dataclass
class PushResult:
    """What a push did: tasks created now, tasks that were there already, task id per image."""

    created: int = 0
    existing: int = 0
    task_ids: dict[str, int] = field(default_factory=dict)

    def __int__(self) -> int:
        return self.created

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "existing": self.existing, "tasks": len(self.task_ids)}


def _import_batch(
    client: LabelStudioClient, project_id: int, batch: list[tuple[str, dict[str, Any]]]
) -> dict[str, int]:
    """Import one batch in one request; after a failed request, re-check which tasks arrived and
    send only the missing ones (bounded attempts). Image id -> task id of the batch."""
    pending = list(batch)
    delay = client.backoff_s
    for attempt in range(client.retries + 1):
        try:
            body = client.post_json_once(f"api/projects/{project_id}/import", [t for _, t in pending],
                                         params={"return_task_ids": "true"})
            if body.status_code < 400:
                ids = body.json().get("task_ids") or []
                if len(ids) != len(pending):
                    raise MadsegError(f"project {project_id}: import returned {len(ids)} task ids for "
                                      f"{len(pending)} tasks")
                return {iid: int(tid) for (iid, _), tid in zip(pending, ids, strict=True)}
            if body.status_code < 500 and body.status_code not in (408, 429):
                try:
                    detail = str(body.json())[:300]
                except ValueError:
                    detail = body.text[:300]
                raise MadsegError(f"Label Studio at {client.url}: importing tasks into project {project_id} "
                                  f"failed (HTTP {body.status_code}: {detail})")
            reason = f"HTTP {body.status_code}"
        except MadsegError:
            raise
        except Exception as exc:  # connection errors, timeouts
            import httpx

            if not isinstance(exc, httpx.TransportError):
                raise
            reason = type(exc).__name__
        if attempt == client.retries:
            break
        log.warning("project %d: import of %d tasks failed (%s); re-checking and retrying in %.1f s",
                    project_id, len(pending), reason, delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
        try:
            there = existing_image_ids(client, project_id)
        except LabelStudioUnreachable:
            continue
        done = {iid: there[iid] for iid, _ in pending if iid in there}
        pending = [(iid, t) for iid, t in pending if iid not in there]
        if not pending:
            return done
    raise LabelStudioUnreachable(
        f"Label Studio at {client.url} unreachable: importing tasks into project {project_id} failed "
        f"after {client.retries + 1} attempts; re-run the same command to push the missing tasks"
    )


def push_tasks(
    client: LabelStudioClient,
    project_id: int,
    items: Iterable[tuple[str, Callable[[], dict[str, Any]]]],
    *,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
    desc: str = "push",
) -> PushResult:
    """Bulk-import tasks keyed by image id; images that already have a task are skipped.

    ``items``: (image id, make_task) pairs; ``make_task()`` builds the task dict (only called for
    missing images, so overlays / predictions are computed only for them).
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise MadsegError(f"batch size {batch_size} must be >= 1")
    result = PushResult()
    there = existing_image_ids(client, project_id)
    items = list(items)
    seen: set[str] = set()
    todo: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for iid, make in items:
        if iid in seen:
            raise MadsegError(f"image id {iid!r} appears twice in the input; image ids must be unique")
        seen.add(iid)
        if iid in there:
            result.existing += 1
            result.task_ids[iid] = there[iid]
        else:
            todo.append((iid, make))
    chunks = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]

    def build(chunk: list[tuple[str, Callable[[], dict[str, Any]]]]) -> list[tuple[str, dict[str, Any]]]:
        return [(iid, make()) for iid, make in chunk]

    # Build batch k+1 (overlays, RLE) in a worker thread while batch k is being imported.
    with ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=len(todo), desc=desc, unit="task", disable=not progress or not todo) as bar:
        ahead = pool.submit(build, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            assert ahead is not None
            batch = ahead.result()
            ahead = pool.submit(build, chunks[k + 1]) if k + 1 < len(chunks) else None
            got = _import_batch(client, project_id, batch)
            result.task_ids.update(got)
            result.created += len(got)
            bar.update(len(batch))
    return result


# ---------------------------------------------------------------------------------------------
# candidates and label maps
# ---------------------------------------------------------------------------------------------


def check_candidates(cands: Sequence[Mapping[str, Any]], source: str = "candidates") -> list[dict[str, Any]]:
    """Each candidate as a dict with a non-empty ``id`` and ``path``; clear error otherwise (the
    candidates of a file are read by ``sampler.candidates.read_candidates``; these are what the
    push functions are given, e.g. ``Candidate.to_dict()``)."""
    out = []
    for n, c in enumerate(cands, 1):
        if not isinstance(c, Mapping) or not c.get("id") or not c.get("path"):
            raise MadsegError(f"{source}: entry {n} lacks 'id' or 'path'; each line needs both")
        out.append(dict(c, id=str(c["id"])))
    return out


LabelMaps = Callable[[str], np.ndarray]


def label_maps_from_dir(pred_dir: str | os.PathLike[str], num_classes: int) -> LabelMaps:
    """Image id -> (H, W) label map read from ``<pred_dir>/<id>.png``."""
    from ml_backend.imageio import read_mask

    pred_dir = Path(pred_dir)

    def load(image_id: str) -> np.ndarray:
        p = pred_dir / f"{image_id}.png"
        if not p.exists():
            raise MadsegError(f"no prediction for image {image_id}: {p} is missing; run the predict stage")
        return read_mask(p, num_classes)

    return load


def as_label_maps(predictions: LabelMaps | str | os.PathLike[str], num_classes: int) -> LabelMaps:
    """``predictions`` as a function image id -> (H, W) label map (a function is returned as is, a
    folder is read by :func:`label_maps_from_dir`)."""
    if callable(predictions):
        return predictions
    return label_maps_from_dir(predictions, num_classes)
