"""The ML backend's HTTP API (Flask app served by gunicorn; ``madseg backend`` / ``python -m ml_backend``).

Routes (the Label Studio ML backend protocol, answered by our own Flask routes rather than
label-studio-ml 1.0.9's ``api`` module, to work around its quirks):

``GET  /health``, ``GET /``   ``{"status": "UP", ...}`` (Label Studio's health check)
``POST /setup``               checks the project's label config (400 when it is not XML or has no usable
                              ``<BrushLabels>``), remembers the Label Studio address and token it sends,
                              answers ``{"model_version": <current target version>}``; an authenticated
                              call makes the project known (:mod:`ml_backend.known_projects`)
``POST /predict``             ``{"results": [one prediction per task], "model_version": ...}`` (batched; at
                              most ``MADSEG_MAX_TASKS`` tasks, else 413; a task whose image is refused or
                              fails gets an empty result; 503 when all prediction slots are busy)
``POST /webhook``             the webhook Label Studio auto-creates (all actions): ``ANNOTATION_CREATED`` /
                              ``ANNOTATION_UPDATED`` in a segmentation project and ``START_TRAINING`` queue a
                              fine-tune for a KNOWN project (201 with the job id; coalesced into a queued one
                              when there is one); other actions, unknown projects and a full queue answer
                              200 ``ignored`` and create nothing; a broken payload or project id answers 400
``POST /train``               the pre-webhook training call of old Label Studio versions: queues a fine-tune
                              (known projects only, as ``/webhook``)
``GET|POST /versions``        fine-tuned version names and metadata (label-studio-ml's answers 405; no
                              server paths); ``details``: each one's promotion-gate status and reason
``GET  /is_training``         queue state (pending / running jobs)

label-studio-ml 1.0.9 quirks handled here: ``START_TRAINING`` is a training event (its
``process_event`` ignores it); jobs get unique ids (not 1-second timestamps that collide) and are
coalesced per project instead of one process per event; ``/versions`` answers GET and POST; payloads
and tokens are never logged (its ``api`` logs request bodies at debug level); its undeclared
``redis`` / ``rq`` imports are satisfied by our dependencies.

Configuration: environment variables, see :mod:`ml_backend.backend_config` (``MADSEG_MODEL``,
``MADSEG_CHECKPOINT``, ``MADSEG_MODEL_OPTIONS``, ``MADSEG_EXPERIMENT``, ``MADSEG_MODEL_DIR``,
``REDIS_URL``, ``MADSEG_QUEUE``, ``MADSEG_REPLAY_DIR``, ``MADSEG_TRAIN_PROJECTS``,
``MADSEG_FINETUNE_OPTIONS``, ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``,
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``, ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``, ...).
With basic auth or ``MADSEG_BACKEND_TOKEN`` configured every route needs the credentials (either
one); connect Label Studio with the basic-auth ones (:func:`ml_backend.labelstudio.connect.connect_backend`
also puts them on the auto-created webhook).

Limits (:mod:`ml_backend.limits`): a request body over ``MADSEG_MAX_BODY_BYTES`` is answered 413 before
it is read (Content-Length or chunked); one ``/predict`` runs under ``MADSEG_PREDICT_DEADLINE``; at most
threads - 1 predictions run at once, so one server thread is always free for ``/health``.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from dataclasses import replace
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from .backend_config import BackendConfig
from .errors import MadsegError
from .jobs import FinetuneQueue, QueueFull, WebhookPayloadError, decide, finetune_config, make_queue
from .known_projects import KnownProjects
from .labelstudio.configs import LabelConfigError
from .limits import BodyLimit, Busy, ConcurrencyGate, Deadline
from .model import MadsegSegmenter, model_cache
from .versions import list_versions

log = logging.getLogger(__name__)

#: Projects whose /setup details (hostname, token) are kept; the oldest are forgotten beyond this.
MAX_SETUPS = 1024


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"status": "error", "error": message}), status


def _json_body() -> Any:
    """The request's JSON body; :class:`WebhookPayloadError` when it is missing or not JSON."""
    body = request.get_json(silent=True, force=True)
    if body is None:
        raise WebhookPayloadError("request body is not valid JSON")
    return body


def _project_id_from_uid(uid: Any) -> int | None:
    """``"12.1700000000"`` (Label Studio's ``{id}.{created_at}``) or ``12`` -> 12; absent -> None.

    Anything else (``"²"``, ``-3``, ``"x.1"``, a list) raises :class:`WebhookPayloadError` (400).
    """
    if uid is None or uid == "":
        return None
    head = uid.split(".", 1)[0] if isinstance(uid, str) else uid
    if isinstance(head, bool) or not isinstance(head, (int, str)):
        raise WebhookPayloadError("'project' must be a project id such as 12 or \"12.1700000000\"")
    if isinstance(head, int):
        if 0 < head < 2**63:
            return head
    elif 0 < len(head) <= 19 and head.isascii() and head.isdigit() and 0 < int(head) < 2**63:
        return int(head)
    raise WebhookPayloadError("'project' must be a positive project id such as 12 or \"12.1700000000\"")


class BackendState:
    """What the app keeps per process: config, job queue, per-project /setup info, segmenters."""

    def __init__(self, config: BackendConfig, queue: FinetuneQueue | None = None) -> None:
        self.config = config
        self._queue = queue
        self._queue_lock = threading.Lock()
        self._setup: dict[int | None, dict[str, str]] = {}
        self._segmenters: dict[tuple[str, str, str], MadsegSegmenter] = {}
        self._lock = threading.Lock()
        self.known = KnownProjects(config.model_dir, config.train_projects, config.experiment_dir)
        self.predict_gate = ConcurrencyGate(max(1, config.threads - 1))

    @property
    def queue(self) -> FinetuneQueue:
        with self._queue_lock:
            if self._queue is None:
                self._queue = make_queue(self.config)
            return self._queue

    def remember_setup(self, project_id: int | None, hostname: str, access_token: str) -> None:
        with self._lock:
            self._setup.pop(project_id, None)
            self._setup[project_id] = {"hostname": hostname, "access_token": access_token}
            while len(self._setup) > MAX_SETUPS:  # bounded memory whatever ids callers send
                self._setup.pop(next(iter(self._setup)))

    def segmenter(self, label_config: str, project_id: int | None) -> MadsegSegmenter:
        info = self._setup.get(project_id) or {}
        key = (label_config, info.get("hostname", ""), info.get("access_token", ""))
        with self._lock:
            seg = self._segmenters.get(key)
            if seg is None:
                seg = MadsegSegmenter(label_config=label_config, config=self.config, hostname=key[1],
                                      access_token=key[2], setup_trusted=self.config.has_credentials)
                if len(self._segmenters) > 64:
                    self._segmenters.clear()
                self._segmenters[key] = seg
            return seg


def create_app(
    config: BackendConfig | None = None, *, queue: FinetuneQueue | None = None, preload: bool = False
) -> Flask:
    """The backend's Flask app for ``config`` (default: from the environment).

    ``preload`` loads and warms up the served model now (the server does this at start, because
    Label Studio gives ``/setup`` only a few seconds).
    """
    config = config or BackendConfig.from_env()
    finetune_config(config.finetune_options)  # bad fine-tune settings fail at start, not in a job
    config.local_files_policy()  # a document root of / with nothing narrower fails at start
    if preload:
        model = model_cache(config).current()
        log.info("serving %s", model.version)
    state = BackendState(config, queue)
    app = Flask("madseg_backend")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.wsgi_app = BodyLimit(app.wsgi_app, config.max_body_bytes,  # type: ignore[method-assign]
                             config.body_timeout_s)
    app.extensions["madseg"] = state
    auth = config.basic_auth
    token = config.backend_token

    def _authorized() -> bool:
        header = request.headers.get("Authorization", "")
        if token and header[:7].lower() == "bearer ":
            return hmac.compare_digest(header[7:].strip().encode(), token.encode())
        given = request.authorization
        return (
            auth is not None
            and given is not None
            and given.username is not None
            and given.password is not None
            and hmac.compare_digest(given.username.encode(), auth[0].encode())
            and hmac.compare_digest(given.password.encode(), auth[1].encode())
        )

    @app.before_request
    def _check_auth() -> Any:
        if not config.has_credentials or _authorized():
            return None
        kinds = " or ".join(k for k, on in (("basic", auth is not None), ("bearer", bool(token))) if on)
        resp, _ = _error(401, f"authentication required ({kinds})")
        resp.status_code = 401
        if auth is not None:
            resp.headers["WWW-Authenticate"] = 'Basic realm="madseg ML backend"'
        return resp

    @app.errorhandler(Busy)
    def _busy(exc: Busy) -> Any:
        resp, _ = _error(503, str(exc))
        resp.status_code = 503
        resp.headers["Retry-After"] = "5"
        return resp

    @app.errorhandler(WebhookPayloadError)
    def _bad_payload(exc: WebhookPayloadError) -> Any:
        return _error(400, str(exc))

    @app.errorhandler(LabelConfigError)
    def _bad_config(exc: LabelConfigError) -> Any:
        return _error(400, str(exc))

    @app.errorhandler(MadsegError)
    def _madseg_error(exc: MadsegError) -> Any:
        log.error("%s %s: %s", request.method, request.path, exc)
        return _error(500, str(exc))

    @app.errorhandler(413)
    def _too_large(_exc: Any) -> Any:
        return _error(413, f"request body larger than {config.max_body_bytes} bytes")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):
            return _error(exc.code or 500, exc.description or exc.name)
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the backend log")

    @app.route("/", methods=["GET"])
    @app.route("/health", methods=["GET"])
    def health() -> Any:
        rec = model_cache(config).record()
        return jsonify({
            "status": "UP",
            "model_class": MadsegSegmenter.__name__,
            "model_version": rec.version if rec else None,
            "queue": "redis" if config.redis_url else "in-process",
        })

    @app.route("/setup", methods=["POST"])
    def setup() -> Any:
        body = _json_body()
        if not isinstance(body, dict):
            raise WebhookPayloadError("/setup body must be a JSON object")
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise WebhookPayloadError("/setup body has no label config ('schema')")
        project_id = _project_id_from_uid(body.get("project"))
        hostname = body.get("hostname") if isinstance(body.get("hostname"), str) else ""
        setup_token = body.get("access_token") if isinstance(body.get("access_token"), str) else ""
        state.remember_setup(project_id, hostname, setup_token)
        seg = state.segmenter(schema, project_id)
        seg.check_classes()
        if project_id is not None and config.has_credentials and state.known.register(project_id):
            log.info("project %d completed an authenticated /setup: its annotations may queue fine-tunes",
                     project_id)
        return jsonify({"model_version": seg.model_version})

    @app.route("/predict", methods=["POST"])
    def predict() -> Any:
        body = _json_body()
        if not isinstance(body, dict):
            raise WebhookPayloadError("/predict body must be a JSON object")
        tasks = body.get("tasks")
        label_config = body.get("label_config")
        if not isinstance(tasks, list):  # a task that is not an object gets an empty result, not a 400
            raise WebhookPayloadError("/predict body needs 'tasks': a list of task objects")
        if not isinstance(label_config, str) or not label_config.strip():
            raise WebhookPayloadError("/predict body needs the project's 'label_config'")
        if len(tasks) > config.max_tasks:
            return _error(413, f"/predict got {len(tasks)} tasks; send at most {config.max_tasks} per "
                               "request (MADSEG_MAX_TASKS)")
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        seg = state.segmenter(label_config, _project_id_from_uid(body.get("project")))
        t0 = time.perf_counter()
        with state.predict_gate.enter("/predict"):
            results = seg.predict(tasks, login=params.get("login"), password=params.get("password"),
                                  deadline=Deadline(config.predict_deadline_s))
        version = results[0]["model_version"] if results else seg.model_version
        log.info("predicted %d task(s) with %s in %.2f s", len(tasks), version, time.perf_counter() - t0)
        return jsonify({"results": results, "model_version": version})

    @app.route("/webhook", methods=["POST"])
    def webhook() -> Any:
        decision = decide(_json_body())
        if decision.train and decision.action != "START_TRAINING" and not state.config.train_on_annotation:
            decision = replace(decision, train=False, reason="MADSEG_TRAIN_ON_ANNOTATION=0")
        if not decision.train:
            log.debug("webhook %s ignored: %s", decision.action, decision.reason)
            return jsonify({"status": "ignored", "action": decision.action, "reason": decision.reason}), 200
        assert decision.project_id is not None
        refused = _unknown_or_full(decision.project_id)
        if isinstance(refused, str):
            log.info("webhook %s ignored: %s", decision.action, refused)
            return jsonify({"status": "ignored", "action": decision.action, "reason": refused}), 200
        sub = refused
        log.info("webhook %s, project %d -> fine-tune job %s%s", decision.action, decision.project_id,
                 sub.job_id, " (coalesced)" if sub.coalesced else "")
        return jsonify({"status": "queued", "action": decision.action, **sub.to_json()}), 201

    def _unknown_or_full(project_id: int) -> Any:
        """The submission for a known project, or why nothing was queued (a string)."""
        if state.known.why(project_id) is None:
            return (f"project {project_id} is not known to this backend (MADSEG_TRAIN_PROJECTS, the "
                    "experiment's segmentation projects, or an authenticated /setup)")
        try:
            return state.queue.submit(project_id)
        except QueueFull as exc:
            return str(exc)

    @app.route("/train", methods=["POST"])
    def train() -> Any:
        body = _json_body()
        project_id = _project_id_from_uid(body.get("project")) if isinstance(body, dict) else None
        if project_id is None:
            raise WebhookPayloadError("/train body needs 'project' (\"<id>.<timestamp>\")")
        sub = _unknown_or_full(project_id)
        if isinstance(sub, str):
            return jsonify({"status": "ignored", "reason": sub}), 200
        return jsonify({"job": sub.job_id, **sub.to_json()}), 201

    @app.route("/versions", methods=["GET", "POST"])
    def versions() -> Any:
        rec = model_cache(config).record()
        records = list_versions(config.model_dir)
        return jsonify({
            "versions": [r.version for r in records],
            "current": rec.version if rec else None,
            # every fine-tuned version with the promotion gate's verdict; a rejected one is never served
            "details": [{"version": r.version, "job_id": r.job_id, "status": r.status, "reason": r.reason,
                         "n_train": r.n_train, "created_at": r.created_at,
                         "serving": rec is not None and r.version == rec.version} for r in records],
        })

    @app.route("/is_training", methods=["GET"])
    def is_training() -> Any:
        desc = state.queue.describe()
        return jsonify({"is_training": bool(desc.get("running")), **desc})

    return app
