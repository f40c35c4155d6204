"""Configuration of the ML backend and its fine-tune worker, read from environment variables.

Target model (what ``/predict`` serves until a fine-tune has finished, and what every fine-tune
starts from):

``MADSEG_MODEL``            zoo model name, e.g. ``espnetv2``, ``dicenet``, ``tflite``, ``torchvision:<b>``
``MADSEG_CHECKPOINT``       checkpoint file of the target (optional for names that imply one)
``MADSEG_MODEL_OPTIONS``    JSON object of zoo options, e.g. ``{"scale": 0.5, "input_size": 256}``
``MADSEG_EXPERIMENT``       an experiment TOML: its ``[target]``, ``[finetune]`` (fine-tune settings; S(0)
                            replayed when ``replay`` is true), ``[s0]``, ``[t0]``, pool folders and
                            ``[label_studio] document_root`` fill in what the variables here leave unset.
                            Read by ``madseg backend`` / ``madseg worker`` (``projects.backend_settings``),
                            which write them as data to ``<experiment dir>/backend-settings.json`` and set
``MADSEG_BACKEND_SETTINGS`` to it: the file the backend reads (``ml_backend.experiment_settings``)
``MADSEG_DEVICE``           torch device (default: the zoo's choice)

Model directory, queue, fine-tuning:

``MADSEG_MODEL_DIR``        where fine-tuned versions and ``current.json`` live (default ``runs/backend``)
``REDIS_URL``               e.g. ``redis://redis:6379/0``: jobs go to an rq queue run by ``madseg worker``;
                            unset: one in-process worker thread in the backend
``MADSEG_QUEUE``            rq queue name and Redis key prefix (default ``madseg-finetune``)
``MADSEG_REPLAY_DIR``       S(0): a labelled folder (images/ + masks/) replayed in every fine-tune
``MADSEG_REPLAY_SUBSET``    part of that folder to replay, e.g. ``half0`` (default: all of it)
``MADSEG_VAL_DIR``, ``MADSEG_VAL_SUBSET``  T(0): labelled folder that picks the learning rate when the
                            fine-tune settings give several (``lrs``) and that the promotion gate
                            checks forgetting on. Without it no fine-tuned version is promoted (it is
                            kept and listed as rejected in ``/versions``; the pointer does not move)
``MADSEG_GATE_OPTIONS``     JSON object of ``ml_backend.gate.GateCriteria`` fields, e.g.
                            ``{"t0_tolerance": 0.02}`` (default: the gate's defaults, T(0) only)
``MADSEG_TRAIN_PROJECTS``   comma-separated Label Studio project ids whose finished masks are added to
                            every fine-tune (e.g. the segmentation projects of earlier rounds)
``MADSEG_FINETUNE_OPTIONS`` JSON object of ``ml_backend.finetune.FinetuneConfig`` fields (epochs, ...)
``MADSEG_JOB_TIMEOUT``      seconds an rq fine-tune job may run (default 21600)
``MADSEG_JOB_DELAY``        seconds a job waits after its first event before it starts (default 2): a
                            burst of annotations submitted together becomes one fine-tune
``MADSEG_TRAIN_ON_ANNOTATION`` ``0``/``false``: annotation webhooks do not queue fine-tunes (the backend only
                            serves predictions; ``START_TRAINING`` and ``/train`` still do). Set by
                            ``madseg demo``/``madseg round``, which fine-tune in-process (default ``1``)

Label Studio (used by the fine-tune job to export masks, and by ``/predict`` to fetch images):

``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``   the server and a legacy token or personal access token
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``      the root Label Studio serves local files from (the same
                                                value as Label Studio's); local-files task images are read
                                                from disk when they pass :mod:`ml_backend.localfiles`
``MADSEG_LOCAL_FILES_DIRS`` comma-separated folders under that root the backend may read images from
                            (default: the experiment's pool folders with ``MADSEG_EXPERIMENT``, else the
                            root itself; a root of ``/`` needs this or an experiment). Ground-truth mask
                            folders (the experiment's oracle ``gt``, S(0)/T(0) ``masks/``) and the model
                            dir are never read
``MADSEG_IMAGE_HOSTS``      comma-separated hosts (``name``, ``name:port``, ``*.domain``, IP) other than
                            Label Studio that task image URLs may point to (:mod:`ml_backend.netguard`);
                            names must resolve to public addresses. Default: none

HTTP server (``madseg backend`` / ``python -m ml_backend``, gunicorn):

``MADSEG_BACKEND_HOST`` (``127.0.0.1``; any other address needs credentials, see below),
``MADSEG_BACKEND_PORT`` (``9090``), ``MADSEG_BACKEND_THREADS`` (``4``; one thread is always kept free of
predictions, so ``/health`` answers while they run),
``MADSEG_BACKEND_WORKERS`` (``1``; more than one needs ``REDIS_URL``),
``MADSEG_PREDICT_BATCH`` (images per forward pass, ``4``),
``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``  when both are set every route requires these HTTP basic-auth
credentials; give Label Studio the same ones when connecting the backend.
``MADSEG_BACKEND_TOKEN``    a bearer token (at least 16 characters) every route accepts as
                            ``Authorization: Bearer <token>`` (for scripts; Label Studio uses basic auth)

Limits (:mod:`ml_backend.limits`, :mod:`ml_backend.image_limits`):

``MADSEG_MAX_BODY_BYTES`` (33554432) request body, refused with 413 before it is read;
``MADSEG_BODY_TIMEOUT`` (30 s) to receive a request body, else 408;
``MADSEG_MAX_TASKS`` (100) tasks per ``/predict``; ``MADSEG_MAX_IMAGE_BYTES`` (33554432) one image file or
download; ``MADSEG_MAX_IMAGE_PIXELS`` (40000000) images with more pixels are not decoded;
``MADSEG_PREDICT_PIXELS`` (16000000) larger images are downscaled to this before inference;
``MADSEG_PREDICT_DEADLINE`` (90 s; Label Studio waits 100 s) for one ``/predict``: tasks not done by then
get empty results; ``MADSEG_FETCH_CONNECT_TIMEOUT`` (5 s) / ``MADSEG_FETCH_READ_TIMEOUT`` (20 s) per image
download; ``MADSEG_MAX_QUEUED_JOBS`` (8) fine-tune jobs queued at once over all projects.

Secrets (the API key, the basic-auth password) are never part of a queued job or a log line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import MadsegError
from .experiment_settings import SETTINGS_ENV, ExperimentSettings
from .modelspec import ModelSpec

DEFAULT_QUEUE = "madseg-finetune"
DEFAULT_MODEL_DIR = "runs/backend"


def _json_object(env: Mapping[str, str], name: str) -> dict[str, Any]:
    raw = env.get(name, "").strip()
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MadsegError(
            f"{name}: not valid JSON ({exc.msg}); give a JSON object such as '{{\"epochs\": 1}}'"
        ) from None
    if not isinstance(obj, dict):
        raise MadsegError(f"{name}: must be a JSON object, got {type(obj).__name__}")
    return obj


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        val = int(raw)
    except ValueError:
        raise MadsegError(f"{name}={raw!r}: not an integer") from None
    if val < minimum:
        raise MadsegError(f"{name}={val}: must be at least {minimum}")
    return val


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        val = float(raw)
    except ValueError:
        raise MadsegError(f"{name}={raw!r}: not a number") from None
    if not 0 <= val <= 3600:
        raise MadsegError(f"{name}={val}: must be between 0 and 3600 seconds")
    return val


def _project_ids(env: Mapping[str, str], name: str) -> tuple[int, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        return ()
    out = []
    for part in raw.replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise MadsegError(f"{name}: {part!r} is not a project id; give comma-separated integers")
        out.append(int(part))
    return tuple(out)


def _experiment_settings(env: Mapping[str, str]) -> ExperimentSettings:
    """The experiment's settings as data (:mod:`ml_backend.experiment_settings`), read (and checked)
    once from the file named by ``MADSEG_BACKEND_SETTINGS``; empty settings when there is none. The
    backend never reads the experiment TOML itself: ``madseg backend`` / ``madseg worker``
    (``projects.backend_settings``) write that file from ``MADSEG_EXPERIMENT``."""
    path = env.get(SETTINGS_ENV, "").strip()
    if path:
        return ExperimentSettings.read(path)
    if env.get("MADSEG_EXPERIMENT", "").strip():
        raise MadsegError(
            f"MADSEG_EXPERIMENT is read by `madseg backend` / `madseg worker`, which turn it into "
            f"{SETTINGS_ENV} (a JSON file); start the backend with one of them, or set {SETTINGS_ENV}"
        )
    return ExperimentSettings.NONE


@dataclass(frozen=True)
class BackendConfig:
    """Everything the backend and the fine-tune job need, minus secrets (see the module docstring).
    ``target``: the configured model (f(0)); a ``{name, checkpoint, options}`` dict given here is
    read once by :meth:`ModelSpec.from_dict`."""

    target: ModelSpec
    model_dir: Path
    redis_url: str | None = None
    queue_name: str = DEFAULT_QUEUE
    replay_dir: Path | None = None
    replay_subset: str | list[str] | None = None
    val_dir: Path | None = None
    val_subset: str | list[str] | None = None
    train_projects: tuple[int, ...] = ()
    finetune_options: dict[str, Any] = field(default_factory=dict)
    gate_options: dict[str, Any] = field(default_factory=dict)
    job_timeout_s: int = 21600
    start_delay_s: float = 2.0
    train_on_annotation: bool = True
    device: str | None = None
    document_root: Path | None = None
    predict_batch: int = 4
    host: str = "127.0.0.1"
    port: int = 9090
    threads: int = 4
    workers: int = 1
    basic_auth_user: str | None = field(default=None, repr=False)
    basic_auth_pass: str | None = field(default=None, repr=False)
    backend_token: str | None = field(default=None, repr=False)
    experiment_dir: Path | None = None
    local_dirs: tuple[Path, ...] = ()
    ground_truth_dirs: tuple[Path, ...] = ()
    image_hosts: tuple[Any, ...] = ()  # netguard.HostRule
    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout_s: float = 30.0
    max_tasks: int = 100
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    predict_pixels: int = 16_000_000
    predict_deadline_s: float = 90.0
    fetch_connect_s: float = 5.0
    fetch_read_s: float = 20.0
    max_queued_jobs: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", ModelSpec.of(self.target))

    @property
    def has_credentials(self) -> bool:
        """Whether every route requires basic auth or the bearer token."""
        return self.basic_auth is not None or bool(self.backend_token)

    def local_files_policy(self) -> Any:
        """The :class:`ml_backend.localfiles.LocalFilesPolicy` for this config, or None without a
        document root; :class:`MadsegError` for a root of ``/`` with nothing narrower."""
        if self.document_root is None:
            return None
        from .localfiles import LocalFilesPolicy

        denied = [*self.ground_truth_dirs, self.model_dir]
        denied += [d / "masks" for d in (self.replay_dir, self.val_dir) if d is not None]
        denied = list(dict.fromkeys(denied))
        return LocalFilesPolicy.build(self.document_root, self.local_dirs, denied, self.max_image_bytes)

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user and self.basic_auth_pass:
            return (self.basic_auth_user, self.basic_auth_pass)
        return None

    def job_settings(self) -> dict[str, Any]:
        """The JSON-serialisable part a queued job carries (no secrets). ``images``: where the job's
        export may read task images from (the same policy as ``/predict``)."""
        from .labelstudio.export import ExportImagePolicy

        return {
            "images": ExportImagePolicy.from_backend_config(self).to_json(),
            "target": self.target.to_dict(),
            "model_dir": str(self.model_dir),
            "queue_name": self.queue_name,
            "start_delay_s": self.start_delay_s,
            "document_root": str(self.document_root) if self.document_root else None,
            "replay": (
                {"root": str(self.replay_dir), "subset": self.replay_subset} if self.replay_dir else None
            ),
            "val": {"root": str(self.val_dir), "subset": self.val_subset} if self.val_dir else None,
            "train_projects": list(self.train_projects),
            "finetune_options": self.finetune_options,
            "gate_options": self.gate_options,
            "device": self.device,
        }

    def with_(self, **changes: Any) -> BackendConfig:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BackendConfig:
        """Build the configuration from ``env`` (default ``os.environ``); bad values -> MadsegError."""
        env = os.environ if env is None else env
        exp = _experiment_settings(env)
        exp_target = exp.target

        name = env.get("MADSEG_MODEL", "").strip() or (exp_target.name if exp_target else None)
        if not name:
            raise MadsegError(
                "no target model configured: set MADSEG_MODEL (e.g. espnetv2) and MADSEG_CHECKPOINT, "
                "or MADSEG_EXPERIMENT to an experiment TOML"
            )
        if env.get("MADSEG_MODEL", "").strip():
            checkpoint = env.get("MADSEG_CHECKPOINT", "").strip() or None
            options: dict[str, Any] = {}
        else:
            checkpoint = env.get("MADSEG_CHECKPOINT", "").strip() or (
                exp_target.checkpoint if exp_target else None) or None
            options = dict(exp_target.options) if exp_target else {}
        options.update(_json_object(env, "MADSEG_MODEL_OPTIONS"))
        if checkpoint and not Path(checkpoint).exists():
            raise MadsegError(f"MADSEG_CHECKPOINT={checkpoint}: file not found")

        finetune = dict(exp.finetune)
        finetune.update(_json_object(env, "MADSEG_FINETUNE_OPTIONS"))

        exp_replay = exp.replay or {}
        replay = env.get("MADSEG_REPLAY_DIR", "").strip() or exp_replay.get("root") or None
        subset = env.get("MADSEG_REPLAY_SUBSET", "").strip() or exp_replay.get("subset") or None
        if replay and not (Path(replay) / "images").is_dir():
            raise MadsegError(f"MADSEG_REPLAY_DIR={replay}: not a labelled folder (needs images/ and masks/)")
        exp_val = exp.val or {}
        val = env.get("MADSEG_VAL_DIR", "").strip() or exp_val.get("root") or None
        val_subset = env.get("MADSEG_VAL_SUBSET", "").strip() or exp_val.get("subset") or None
        if val and not (Path(val) / "images").is_dir():
            raise MadsegError(f"MADSEG_VAL_DIR={val}: not a labelled folder (needs images/ and masks/)")
        doc_root = env.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "").strip() or exp.document_root

        redis_url = env.get("REDIS_URL", "").strip() or None
        workers = _int(env, "MADSEG_BACKEND_WORKERS", 1)
        if workers > 1 and not redis_url:
            raise MadsegError(
                f"MADSEG_BACKEND_WORKERS={workers} needs REDIS_URL: without Redis the fine-tune queue lives "
                "inside the one backend process; set REDIS_URL or use 1 worker"
            )
        token = env.get("MADSEG_BACKEND_TOKEN", "").strip() or None
        if token is not None and len(token) < 16:
            raise MadsegError("MADSEG_BACKEND_TOKEN: use at least 16 characters "
                              "(e.g. `openssl rand -hex 24`)")
        from .netguard import parse_host_rules

        local_dirs_raw = [d.strip() for d in env.get("MADSEG_LOCAL_FILES_DIRS", "").split(",") if d.strip()]
        for d in local_dirs_raw:
            if not Path(d).is_dir():
                raise MadsegError(f"MADSEG_LOCAL_FILES_DIRS: {d} is not a folder")
        local_dirs = local_dirs_raw or list(exp.pool_dirs)
        user = env.get("BASIC_AUTH_USER", "") or None
        password = env.get("BASIC_AUTH_PASS", "") or None
        if bool(user) != bool(password):
            raise MadsegError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        queue = env.get("MADSEG_QUEUE", "").strip() or DEFAULT_QUEUE
        if any(c.isspace() for c in queue):
            raise MadsegError(f"MADSEG_QUEUE={queue!r}: no spaces allowed")
        return cls(
            target=ModelSpec(name, checkpoint, options),
            model_dir=Path(env.get("MADSEG_MODEL_DIR", "").strip() or DEFAULT_MODEL_DIR).resolve(),
            redis_url=redis_url,
            queue_name=queue,
            replay_dir=Path(replay).resolve() if replay else None,
            replay_subset=subset,
            val_dir=Path(val).resolve() if val else None,
            val_subset=val_subset,
            train_projects=_project_ids(env, "MADSEG_TRAIN_PROJECTS"),
            finetune_options=finetune,
            gate_options=_json_object(env, "MADSEG_GATE_OPTIONS"),
            job_timeout_s=_int(env, "MADSEG_JOB_TIMEOUT", 21600),
            start_delay_s=_float(env, "MADSEG_JOB_DELAY", 2.0),
            train_on_annotation=env.get("MADSEG_TRAIN_ON_ANNOTATION", "1").strip().lower()
            not in ("0", "false", "no", "off"),
            device=env.get("MADSEG_DEVICE", "").strip() or None,
            document_root=Path(doc_root).resolve() if doc_root else None,
            predict_batch=_int(env, "MADSEG_PREDICT_BATCH", 4),
            host=env.get("MADSEG_BACKEND_HOST", "").strip() or "127.0.0.1",
            port=_int(env, "MADSEG_BACKEND_PORT", 9090, minimum=0),
            threads=_int(env, "MADSEG_BACKEND_THREADS", 4),
            workers=workers,
            basic_auth_user=user,
            basic_auth_pass=password,
            backend_token=token,
            experiment_dir=Path(exp.dir).resolve() if exp.dir else None,
            local_dirs=tuple(Path(d).resolve() for d in local_dirs),
            ground_truth_dirs=tuple(Path(d).resolve() for d in exp.ground_truth),
            image_hosts=parse_host_rules(env.get("MADSEG_IMAGE_HOSTS", "")),
            max_body_bytes=_int(env, "MADSEG_MAX_BODY_BYTES", 32 * 1024 * 1024, minimum=1024),
            body_timeout_s=_float(env, "MADSEG_BODY_TIMEOUT", 30.0),
            max_tasks=_int(env, "MADSEG_MAX_TASKS", 100),
            max_image_bytes=_int(env, "MADSEG_MAX_IMAGE_BYTES", 32 * 1024 * 1024, minimum=1024),
            max_image_pixels=_int(env, "MADSEG_MAX_IMAGE_PIXELS", 40_000_000, minimum=64 * 64),
            predict_pixels=_int(env, "MADSEG_PREDICT_PIXELS", 16_000_000, minimum=64 * 64),
            predict_deadline_s=_float(env, "MADSEG_PREDICT_DEADLINE", 90.0),
            fetch_connect_s=_float(env, "MADSEG_FETCH_CONNECT_TIMEOUT", 5.0),
            fetch_read_s=_float(env, "MADSEG_FETCH_READ_TIMEOUT", 20.0),
            max_queued_jobs=_int(env, "MADSEG_MAX_QUEUED_JOBS", 8),
        )
