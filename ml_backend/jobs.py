"""The fine-tuning job queue behind the backend's ``/webhook``.

Which events train (pure, :func:`decide`): ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` in a
segmentation project (its label config has ``<BrushLabels>``; cancelled/skipped annotations do not
count) and ``START_TRAINING`` (the training button / "start training on annotation submission").
Every other action (``PROJECT_UPDATED``, ``TASKS_CREATED``, ...) is answered and ignored. A payload
that is not a JSON object, has no string ``action``, or names a training action without a project
id raises :class:`WebhookPayloadError` (the app answers 400).

Where jobs run:

- ``REDIS_URL`` set -> :class:`RedisFinetuneQueue`: an rq queue (``MADSEG_QUEUE``) that
  ``madseg worker`` runs. Coalescing state lives in Redis: ``<queue>:pending:<project>`` names the
  job that is queued and not yet started; it is set in the same MULTI/EXEC transaction that
  enqueues the job, so an event either joins the pending job or enqueues exactly one new one.
  A pending marker whose job is gone, finished or failed is stale and replaced.
- otherwise -> :class:`InProcessFinetuneQueue`: one worker thread in the backend process with the
  same rules kept in memory (:class:`Coalescer`).

A job waits ``MADSEG_JOB_DELAY`` seconds after it was queued before it starts, so a burst of
annotations submitted together coalesces into one job. Per project: at most one fine-tune runs at
a time (in Redis mode a lock ``<queue>:lock:<project>`` with a renewed TTL, so several workers are
safe); events that arrive while a job is queued
coalesce into it; an event that arrives while a job runs schedules exactly one follow-up (the
running job cleared its pending marker before exporting, so anything annotated after that point
goes to the follow-up). Submitting is a couple of Redis round trips or a lock + ``put``, so the
webhook answers in milliseconds even while a fine-tune runs.

The job itself (:func:`run_finetune_job`): exports every finished mask of the project (plus
``MADSEG_TRAIN_PROJECTS``) into ``<model_dir>/jobs/<job id>/data`` (``labelstudio.export``), fine-tunes the
configured target on it (replaying S(0) when configured) with ``ml_backend.finetune``, and only
then writes the new version and atomically moves ``current.json`` to it. Every job starts from the
configured target, so repeated jobs do not compound training on the same masks; the newest version
always reflects all finished masks. Before the pointer moves, the promotion gate
(:func:`gate_job_version`) compares the new version with the one served now on T(0); a rejected
version is kept under ``versions/<job id>/`` with the gate's reasons (listed by ``/versions``) and
the pointer stays where it was. A failure is logged, recorded in the job's ``status.json`` and
leaves the serving version unchanged.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import shutil
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .atomic import atomic_write_json
from .errors import MadsegError
from .labelstudio.configs import is_segmentation_config
from .versions import jobs_dir, new_record, read_pointer, record_version, versions_dir, write_pointer

log = logging.getLogger(__name__)

ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED"})
START_TRAINING = "START_TRAINING"
TRAINING_ACTIONS = ANNOTATION_ACTIONS | {START_TRAINING}


class WebhookPayloadError(MadsegError):
    """A webhook request whose body cannot be understood (answered with HTTP 400)."""


# ----------------------------------------------------------------------------------------------
# Event filtering (pure)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventDecision:
    """What to do with one webhook event: ``train`` or not, for which project, and why."""

    action: str
    train: bool
    project_id: int | None
    reason: str


#: Largest project id accepted (Label Studio's ids are 64-bit integers).
MAX_PROJECT_ID = 2**63 - 1


def _as_id(value: Any) -> int | None:
    """A positive project id from an int, a string of ASCII digits, or ``{"id": ...}``; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 < value <= MAX_PROJECT_ID:
        return value
    if isinstance(value, str) and 0 < len(value) <= 19 and value.isascii() and value.isdigit():
        return _as_id(int(value))
    if isinstance(value, dict):
        return _as_id(value.get("id"))
    return None


def _project_of(payload: dict[str, Any]) -> int | None:
    """The project id of a webhook payload: ``project.id``, else the annotation's or task's project."""
    pid = _as_id(payload.get("project"))
    if pid is not None:
        return pid
    for part in ("annotation", "task"):
        sub = payload.get(part)
        if isinstance(sub, dict):
            pid = _as_id(sub.get("project"))
            if pid is not None:
                return pid
    return None


def decide(payload: Any) -> EventDecision:
    """Decide whether a webhook payload triggers a fine-tune (see the module docstring).

    Raises :class:`WebhookPayloadError` (message names what is wrong, never the payload's content)
    for a payload that is not an object, lacks a string ``action``, or names a training action
    without a usable project id.
    """
    if not isinstance(payload, dict):
        raise WebhookPayloadError(f"webhook body must be a JSON object, got {type(payload).__name__}")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise WebhookPayloadError("webhook body has no string 'action'")
    if action not in TRAINING_ACTIONS:
        return EventDecision(action, False, None, f"{action} does not trigger training")
    project_id = _project_of(payload)
    if project_id is None:
        raise WebhookPayloadError(f"{action} webhook has no project id (expected project.id)")
    project = payload.get("project")
    label_config = project.get("label_config") if isinstance(project, dict) else None
    if isinstance(label_config, str) and label_config and not is_segmentation_config(label_config):
        return EventDecision(action, False, project_id, f"project {project_id} is not a segmentation project")
    if action in ANNOTATION_ACTIONS:
        ann = payload.get("annotation")
        if ann is not None and not isinstance(ann, dict):
            raise WebhookPayloadError(f"{action} webhook: 'annotation' must be an object")
        if isinstance(ann, dict) and (ann.get("was_cancelled") or ann.get("skipped")):
            return EventDecision(action, False, project_id, "the annotation was skipped")
    return EventDecision(action, True, project_id, f"{action} in project {project_id}")


# ----------------------------------------------------------------------------------------------
# Coalescing (pure, in memory)
# ----------------------------------------------------------------------------------------------


class QueueFull(MadsegError):
    """The global cap on queued fine-tune jobs (``MADSEG_MAX_QUEUED_JOBS``) is reached."""


class Coalescer:
    """Per-project bookkeeping of the queued (not yet started) and the running fine-tune job.

    ``offer`` either returns the pending job (the event coalesces into it) or registers a new one;
    ``start`` moves a job from pending to running, so the next event schedules one follow-up;
    ``finish`` forgets the running job. So a project has at most one queued and one running job.
    With ``max_pending``, a new job beyond that many queued ones (all projects together) raises
    :class:`QueueFull`; an event that joins a queued job is always accepted. Thread-safe.
    """

    def __init__(self, max_pending: int | None = None) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, str] = {}
        self._running: dict[int, str] = {}
        self.max_pending = max_pending

    def offer(self, project_id: int, new_job_id: str) -> tuple[str, bool]:
        """(job id the event belongs to, True when that is ``new_job_id`` and must be enqueued)."""
        with self._lock:
            current = self._pending.get(project_id)
            if current is not None:
                return current, False
            if self.max_pending is not None and len(self._pending) >= self.max_pending:
                raise QueueFull(f"{len(self._pending)} fine-tune jobs are queued (MADSEG_MAX_QUEUED_JOBS="
                                f"{self.max_pending}); project {project_id} not queued")
            self._pending[project_id] = new_job_id
            return new_job_id, True

    def start(self, project_id: int, job_id: str) -> None:
        with self._lock:
            if self._pending.get(project_id) == job_id:
                del self._pending[project_id]
            self._running[project_id] = job_id

    def finish(self, project_id: int, job_id: str) -> None:
        with self._lock:
            if self._running.get(project_id) == job_id:
                del self._running[project_id]

    def snapshot(self) -> dict[str, dict[int, str]]:
        with self._lock:
            return {"pending": dict(self._pending), "running": dict(self._running)}


def new_job_id(project_id: int) -> str:
    """A unique, time-sortable job id, e.g. ``20240501-101502-p7-3fa2c1d9`` (no 1-second collisions)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-p{project_id}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Submission:
    """The answer to one training event: the job it belongs to and whether it joined a queued one."""

    job_id: str
    project_id: int
    coalesced: bool

    def to_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "project": self.project_id, "coalesced": self.coalesced}


class FinetuneQueue(Protocol):
    mode: str

    def submit(self, project_id: int) -> Submission: ...

    def describe(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def _write_status(model_dir: Path, job_id: str, **fields: Any) -> None:
    path = jobs_dir(model_dir) / job_id / "status.json"
    atomic_write_json(path, {"job_id": job_id, "updated_at": time.time(), **fields})


def read_job_status(model_dir: str | os.PathLike[str], job_id: str) -> dict[str, Any] | None:
    """The ``status.json`` of a job (state: running / finished / skipped / failed), or None."""
    import json

    path = jobs_dir(model_dir) / job_id / "status.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def export_training_data(
    project_ids: list[int], out_dir: Path, class_names: list[str], images: dict[str, Any] | None = None
) -> int:
    """Export every finished mask of ``project_ids`` into the labelled folder ``out_dir``.

    Uses :func:`ml_backend.labelstudio.export.export_masks` with the connection from ``LABEL_STUDIO_URL`` /
    ``LABEL_STUDIO_API_KEY``. Task images come only from where ``images`` (the job settings' ``images``,
    :meth:`ml_backend.labelstudio.export.ExportImagePolicy.to_json`) allows, the same places as
    ``/predict``; without it nothing is read from disk. Returns the number of (image, mask) pairs written.
    """
    from .labelstudio.client import connect
    from .labelstudio.export import ExportImagePolicy, export_masks

    policy = ExportImagePolicy.from_json(images)
    ls = connect()
    total = 0
    for pid in project_ids:
        total += len(export_masks(ls, pid, out_dir, classes=class_names, images=policy))
    return total


#: Old names of ``FinetuneConfig.lrs`` still read (deprecated).
DEPRECATED_FINETUNE_KEYS = ("lr_grid", "lr")


def finetune_config(options: dict[str, Any]) -> Any:
    """``ml_backend.finetune.FinetuneConfig`` from backend/experiment settings.

    Starts from ``ml_backend.finetune.PRESETS[options["preset"]]`` (default ``"demo"``, the
    benchmark-chosen recipe) and applies the other keys, which are the config's own field names
    (the experiment's ``[finetune]`` uses the same names; ``replay`` is handled elsewhere). The old
    spellings ``lr_grid`` (a list) and ``lr`` (one rate) are still read as ``lrs``, with a one-line
    warning. Unknown keys, an unknown preset or bad values -> :class:`MadsegError` naming them.
    """
    import dataclasses

    from ml_backend.finetune import PRESETS, FinetuneConfig, preset_config

    preset = str(options.get("preset", "demo"))
    if preset not in PRESETS:
        raise MadsegError(f"MADSEG_FINETUNE_OPTIONS: unknown preset {preset!r}; use one of {sorted(PRESETS)}")
    opts = {k: v for k, v in options.items() if k not in ("preset", "replay")}
    for old in DEPRECATED_FINETUNE_KEYS:
        if old in opts:
            if "lrs" in opts:
                raise MadsegError(f"MADSEG_FINETUNE_OPTIONS: gives both {old!r} and 'lrs'; keep 'lrs'")
            log.warning("fine-tune setting %r is deprecated; use 'lrs' (a list of learning rates)", old)
            value = opts.pop(old)
            opts["lrs"] = value if old == "lr_grid" else (value,)
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise MadsegError(f"MADSEG_FINETUNE_OPTIONS: unknown fine-tune setting(s) {unknown}; "
                          f"known: {sorted(fields)}")
    for key, val in list(opts.items()):
        if isinstance(val, list):
            opts[key] = tuple(val)
    if isinstance(opts.get("lrs"), (int, float)):
        opts["lrs"] = (float(opts["lrs"]),)
    cfg = preset_config(preset, **opts)
    cfg.validate()
    return cfg


def _open_labelled(spec: dict[str, Any]) -> Any:
    from ml_backend.datasets import LabelledFolder

    return LabelledFolder(spec["root"], spec.get("subset"))


def gate_job_version(
    model_dir: Path, target_model: Any, child_spec: dict[str, Any], t0_set: Any, settings: dict[str, Any]
) -> Any:
    """The promotion gate (:mod:`ml_backend.gate`) of a webhook fine-tune: the child vs the version
    served now (the pointer's, else the configured target ``target_model``) on T(0), and against
    the configured target too (the anchor: no drift over many promotions).

    Every finished mask of the project is training data, so this path has no held-out failure
    images: the gate decides on T(0) alone (``require_failures=False``; ``MADSEG_GATE_OPTIONS`` may
    change any criterion). Without a T(0) (``MADSEG_VAL_DIR`` / the experiment's ``[t0]``) the
    version is rejected: nothing is promoted without a check. Returns a ``GateDecision``.
    """
    from .evaluate import per_image_confusions
    from .gate import GateCriteria, decide
    from .zoo import load_model_spec

    try:
        criteria = GateCriteria.from_dict({"require_failures": False, **(settings.get("gate_options") or {})})
    except (TypeError, ValueError) as exc:
        raise MadsegError(f"MADSEG_GATE_OPTIONS: {exc}") from None
    if t0_set is None:
        return decide(None, None, criteria=criteria)
    current = read_pointer(model_dir)
    device = settings.get("device")
    parent = target_model if current is None else load_model_spec(current.spec(), device=device)
    p_cms = per_image_confusions(parent, t0_set, progress=False)
    # the configured target anchors the check, so drops within the tolerance cannot add up over jobs
    a_cms = p_cms if current is None else per_image_confusions(target_model, t0_set, progress=False)
    del parent
    child = load_model_spec(child_spec, device=device)
    c_cms = per_image_confusions(child, t0_set, progress=False)
    return decide(p_cms, c_cms, criteria=criteria, t0_anchor=a_cms, anchor_name="the configured target")


def train_gate_publish(
    job_id: str, model: Any, data_dir: Path, settings: dict[str, Any], *, projects: list[int], n_train: int
) -> Any:
    """Fine-tune ``model`` (the configured target) on the labelled folder ``data_dir``, gate the new
    version (:func:`gate_job_version`) and record it: promoted -> the pointer moves to it; rejected
    -> recorded under ``versions/<job_id>/`` with the reasons, the pointer stays. Returns the
    ``ServingRecord`` (its ``status`` says which)."""
    from ml_backend.finetune import finetune

    model_dir = Path(settings["model_dir"])
    target = settings["target"]
    train = _open_labelled({"root": str(data_dir)})
    replay = _open_labelled(settings["replay"]) if settings.get("replay") else None
    config = finetune_config(settings.get("finetune_options") or {})
    t0_set = _open_labelled(settings["val"]) if settings.get("val") else None
    val = t0_set if len(config.lrs) > 1 else None
    result = finetune(model, train, versions_dir(model_dir) / job_id, replay=replay, val=val, config=config)
    decision = gate_job_version(model_dir, model, result.spec.to_dict(), t0_set, settings)
    record = new_record(
        version=result.version, name=target["name"], checkpoint=result.checkpoint,
        options=target.get("options") or {}, job_id=job_id, projects=tuple(projects), n_train=n_train,
        gate=decision.to_json(),
    )
    if decision.promoted:
        write_pointer(model_dir, record)
    else:
        record_version(model_dir, record)  # kept and listed, never served
    return record


def run_finetune_job(job_id: str, project_id: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Run one fine-tune job (see the module docstring); returns the new version's record.

    ``settings`` is :meth:`BackendConfig.job_settings`. Writes ``jobs/<job_id>/status.json`` as it
    goes; on failure records the error and re-raises, leaving ``current.json`` untouched.
    """
    model_dir = Path(settings["model_dir"])
    projects = sorted({int(project_id), *(int(p) for p in settings.get("train_projects") or ())})
    work = jobs_dir(model_dir) / job_id
    t0 = time.time()
    _write_status(model_dir, job_id, state="running", project=project_id, projects=projects, started_at=t0)
    log.info("fine-tune job %s: project(s) %s", job_id, projects)
    try:
        from ml_backend.zoo import load_model_spec

        target = settings["target"]
        model = load_model_spec(target, device=settings.get("device"))
        data_dir = work / "data"
        if data_dir.exists():
            shutil.rmtree(data_dir)
        n_train = export_training_data(projects, data_dir, list(model.class_names), settings.get("images"))
        if n_train == 0:
            log.info("fine-tune job %s: no finished masks in project(s) %s; nothing to do", job_id, projects)
            _write_status(model_dir, job_id, state="skipped", project=project_id, projects=projects,
                          started_at=t0, finished_at=time.time(), reason="no finished masks")
            return {"state": "skipped", "job_id": job_id}
        record = train_gate_publish(job_id, model, data_dir, settings, projects=projects, n_train=n_train)
        shutil.rmtree(data_dir, ignore_errors=True)
        _write_status(model_dir, job_id, state="finished", project=project_id, projects=projects,
                      started_at=t0, finished_at=time.time(), version=record.version, n_train=n_train,
                      promoted=record.status == "promoted", gate=record.reason)
        log.info("fine-tune job %s: version %s from %d image(s) in %.1f s, %s by the gate: %s", job_id,
                 record.version, n_train, time.time() - t0, record.status, record.reason)
        return {"state": "finished", **record.to_json()}
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.error("fine-tune job %s failed; still serving the previous version: %s", job_id, message)
        log.debug("fine-tune job %s traceback:\n%s", job_id, traceback.format_exc())
        _write_status(model_dir, job_id, state="failed", project=project_id, projects=projects,
                      started_at=t0, finished_at=time.time(), error=message)
        raise


# ----------------------------------------------------------------------------------------------
# In-process queue
# ----------------------------------------------------------------------------------------------

JobRunner = Callable[[str, int, dict[str, Any]], Any]


class InProcessFinetuneQueue:
    """One daemon worker thread in this process runs the jobs one after the other.

    The thread is started lazily on the first submission (and again in a forked child), so a
    pre-forking server does not lose it. ``runner`` is the job body (default
    :func:`run_finetune_job`).
    """

    mode = "in-process"

    def __init__(
        self, settings: dict[str, Any], runner: JobRunner = run_finetune_job, *, max_queued: int | None = None
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.state = Coalescer(max_queued)
        self._queue: queue_mod.Queue[tuple[str, int, float]] = queue_mod.Queue()
        self._thread: threading.Thread | None = None
        self._thread_pid: int | None = None
        self._start_lock = threading.Lock()
        self._idle = threading.Condition()
        self._outstanding = 0
        self.finished: list[tuple[str, str]] = []  # (job id, "finished" | "failed"), newest last

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive() and self._thread_pid == os.getpid():
                return
            self._thread = threading.Thread(target=self._loop, name="madseg-finetune", daemon=True)
            self._thread_pid = os.getpid()
            self._thread.start()

    def submit(self, project_id: int) -> Submission:
        job_id, is_new = self.state.offer(project_id, new_job_id(project_id))
        if is_new:
            with self._idle:
                self._outstanding += 1
            self._ensure_thread()
            self._queue.put((job_id, project_id, time.monotonic()))
            log.info("queued fine-tune job %s for project %d (in-process)", job_id, project_id)
        return Submission(job_id, project_id, coalesced=not is_new)

    def _loop(self) -> None:
        while True:
            job_id, project_id, queued_at = self._queue.get()
            wait = queued_at + float(self.settings.get("start_delay_s") or 0) - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # events meanwhile still coalesce into this job
            self.state.start(project_id, job_id)
            outcome = "failed"
            try:
                self.runner(job_id, project_id, self.settings)
                outcome = "finished"
            except Exception:  # logged by the runner; the worker thread keeps serving
                log.warning("fine-tune job %s did not finish; see the log above", job_id)
            finally:
                self.state.finish(project_id, job_id)
                with self._idle:
                    self.finished.append((job_id, outcome))
                    self._outstanding -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is queued or running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._outstanding > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def describe(self) -> dict[str, Any]:
        snap = self.state.snapshot()
        return {
            "mode": self.mode,
            "pending": {str(k): v for k, v in snap["pending"].items()},
            "running": {str(k): v for k, v in snap["running"].items()},
            "finished": [{"job_id": j, "state": s} for j, s in self.finished[-10:]],
        }


# ----------------------------------------------------------------------------------------------
# Redis / rq queue
# ----------------------------------------------------------------------------------------------

_LIVE_STATES = frozenset({"created", "queued", "deferred", "scheduled", "started"})
_DEL_IF_EQUAL = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
LOCK_TTL_S = 60


def pending_key(queue_name: str, project_id: int) -> str:
    return f"{queue_name}:pending:{project_id}"


def lock_key(queue_name: str, project_id: int) -> str:
    return f"{queue_name}:lock:{project_id}"


def redis_connection(url: str) -> Any:
    """A Redis connection from ``url``; :class:`MadsegError` when the server does not answer."""
    import redis

    conn = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    try:
        conn.ping()
    except redis.RedisError as exc:
        raise MadsegError(f"REDIS_URL: cannot reach Redis ({type(exc).__name__}); start Redis or unset "
                          "REDIS_URL to run fine-tunes inside the backend") from None
    return conn


class RedisFinetuneQueue:
    """Fine-tune jobs on an rq queue, coalesced per project with Redis keys (module docstring)."""

    mode = "redis"

    def __init__(
        self, conn: Any, settings: dict[str, Any], *, job_timeout_s: int = 21600,
        max_queued: int | None = None,
    ) -> None:
        from rq import Queue

        self.conn = conn
        self.settings = settings
        self.queue_name = settings["queue_name"]
        self.queue = Queue(self.queue_name, connection=conn)
        self.job_timeout_s = job_timeout_s
        #: cap on jobs waiting in the rq queue (all projects); checked before enqueueing a new job, so
        #: concurrent submissions may pass it by at most the number of server threads
        self.max_queued = max_queued

    def _is_live(self, job_id: str) -> bool:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            status = Job.fetch(job_id, connection=self.conn).get_status(refresh=False)
        except NoSuchJobError:
            return False
        return status is not None and str(getattr(status, "value", status)) in _LIVE_STATES

    def submit(self, project_id: int) -> Submission:
        import redis

        key = pending_key(self.queue_name, project_id)
        for _ in range(20):
            with self.conn.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    existing = pipe.get(key)
                    if existing is not None:
                        existing_id = existing.decode()
                        if self._is_live(existing_id):
                            pipe.unwatch()
                            return Submission(existing_id, project_id, coalesced=True)
                        log.warning("pending fine-tune job %s of project %d is gone; replacing it",
                                    existing_id, project_id)
                    if self.max_queued is not None and self.queue.count >= self.max_queued:
                        pipe.unwatch()
                        raise QueueFull(f"{self.queue.count} fine-tune jobs are queued "
                                        f"(MADSEG_MAX_QUEUED_JOBS={self.max_queued}); project {project_id} "
                                        "not queued")
                    job_id = new_job_id(project_id)
                    pipe.multi()
                    pipe.set(key, job_id)
                    self.queue.enqueue_call(
                        rq_finetune, args=(job_id, project_id, self.settings), job_id=job_id,
                        timeout=self.job_timeout_s, result_ttl=7 * 86400, failure_ttl=7 * 86400,
                        description=f"madseg fine-tune, project {project_id}",
                        meta={"project": project_id}, pipeline=pipe,
                    )
                    pipe.execute()
                except redis.WatchError:
                    continue
            log.info("queued fine-tune job %s for project %d on rq queue %s", job_id, project_id,
                     self.queue_name)
            return Submission(job_id, project_id, coalesced=False)
        raise MadsegError(f"project {project_id}: could not queue a fine-tune (Redis key {key} kept "
                          "changing); retry")

    def describe(self) -> dict[str, Any]:
        from rq.registry import StartedJobRegistry

        pending = {}
        for key in self.conn.scan_iter(match=f"{self.queue_name}:pending:*", count=100):
            val = self.conn.get(key)
            if val is not None:
                pending[key.decode().rsplit(":", 1)[-1]] = val.decode()
        return {
            "mode": self.mode,
            "queue": self.queue_name,
            "queued_jobs": self.queue.count,
            "pending": pending,
            "running": StartedJobRegistry(self.queue_name, connection=self.conn).get_job_ids(),
        }


@contextmanager
def project_lock(conn: Any, queue_name: str, project_id: int, ttl_s: int = LOCK_TTL_S) -> Iterator[None]:
    """Hold the per-project fine-tune lock (waiting for it), renewing its TTL while held.

    The TTL makes a lock of a killed worker expire after ``ttl_s`` instead of blocking forever.
    """
    lock = conn.lock(lock_key(queue_name, project_id), timeout=ttl_s, blocking=True, thread_local=False)
    lock.acquire()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                lock.reacquire()
            except Exception as exc:  # lost the lock (expired): another job may start
                log.warning("fine-tune lock of project %d could not be renewed: %s", project_id, exc)
                return

    t = threading.Thread(target=renew, name="madseg-lock-renew", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        with suppress(Exception):  # already expired: nothing to release
            lock.release()


def mark_started(conn: Any, queue_name: str, project_id: int, job_id: str) -> bool:
    """Clear the project's pending marker if it still names ``job_id`` (the job has started).

    From then on a new event schedules a follow-up job instead of joining this one.
    """
    return bool(conn.eval(_DEL_IF_EQUAL, 1, pending_key(queue_name, project_id), job_id))


def rq_finetune(job_id: str, project_id: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The rq entry point: take the project lock, clear the pending marker, run the job."""
    from rq import get_current_job

    job = get_current_job()
    conn = job.connection
    queue_name = settings["queue_name"]
    delay = float(settings.get("start_delay_s") or 0)
    if delay > 0 and job.enqueued_at is not None:
        from datetime import datetime, timezone

        enqueued = job.enqueued_at if job.enqueued_at.tzinfo else job.enqueued_at.replace(tzinfo=timezone.utc)
        wait = delay - (datetime.now(timezone.utc) - enqueued).total_seconds()
        if wait > 0:
            time.sleep(min(wait, delay))  # events meanwhile still coalesce into this job
    with project_lock(conn, queue_name, project_id):
        mark_started(conn, queue_name, project_id, job_id)
        return run_finetune_job(job_id, project_id, settings)


def purge_queue(conn: Any, queue_name: str) -> int:
    """Delete a fine-tune queue from Redis: its jobs (queued, running, finished, failed, ...), their
    results, and the queue's pending/lock keys. Returns the number of keys deleted.

    For tests and for retiring a queue; never touches keys of other queues.
    """
    from rq import Queue
    from rq.registry import (
        CanceledJobRegistry,
        DeferredJobRegistry,
        FailedJobRegistry,
        FinishedJobRegistry,
        ScheduledJobRegistry,
        StartedJobRegistry,
    )

    q = Queue(queue_name, connection=conn)
    ids = set(q.job_ids)
    for reg in (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry, DeferredJobRegistry,
                ScheduledJobRegistry, CanceledJobRegistry):
        ids.update(reg(queue_name, connection=conn).get_job_ids())
    keys: list[Any] = []
    for job_id in ids:
        keys += [f"rq:job:{job_id}", f"rq:results:{job_id}", f"rq:job:{job_id}:dependents",
                 f"rq:job:{job_id}:dependencies", f"rq:executions:{job_id}"]
    keys += list(conn.scan_iter(match=f"*{queue_name}*", count=500))
    return int(conn.delete(*keys)) if keys else 0


def make_queue(config: Any) -> FinetuneQueue:
    """The queue for a ``BackendConfig``: Redis when ``REDIS_URL`` is set, else in-process."""
    settings = config.job_settings()
    if config.redis_url:
        conn = redis_connection(config.redis_url)
        return RedisFinetuneQueue(conn, settings, job_timeout_s=config.job_timeout_s,
                                  max_queued=getattr(config, "max_queued_jobs", None))
    return InProcessFinetuneQueue(settings, max_queued=getattr(config, "max_queued_jobs", None))


def run_worker(config: Any, *, burst: bool = False) -> bool:
    """Run an rq worker on the fine-tune queue (``madseg worker``); returns whether it did any work."""
    from rq import Queue, Worker

    if not config.redis_url:
        raise MadsegError("madseg worker needs REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    conn = redis_connection(config.redis_url)
    worker = Worker([Queue(config.queue_name, connection=conn)], connection=conn)
    return bool(worker.work(burst=burst, with_scheduler=False, logging_level="INFO"))
