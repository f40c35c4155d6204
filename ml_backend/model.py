"""The Label Studio ML backend model: the current target version pre-fills brush masks.

:class:`MadsegSegmenter` is a ``label_studio_ml.model.LabelStudioMLBase`` (label-studio-ml 1.0.9)
subclass. Its :meth:`~MadsegSegmenter.predict` takes Label Studio tasks, predicts each task's image
with the CURRENT target model version and returns, per task, one prediction::

    {"model_version": "<target version>", "score": <mean max-probability over the image>,
     "result": [<one brushlabels result per predicted class, RLE of its pixels>, ...]}

``from_name`` / ``to_name`` / the image key come from the project's label config (its first
``<BrushLabels>`` control and the ``<Image>`` it labels: ``labelstudio.configs.find_brush_controls``);
a label's name is the model's class name. Every predicted class the config has a label for is
drawn, ``background`` included (the export treats unpainted pixels as "ignore", so an accepted
pre-fill must paint background too); classes without a label in the config are left out. Each
result also carries a ``score``: the mean max-probability over that class's pixels.

Models are loaded once per process: :class:`ModelCache` keeps them by model spec, and before each
prediction compares the model dir's ``current.json`` (inode, mtime, size) with what it last saw; a
new pointer, written atomically by a fine-tune job, switches the served model without a restart.
A pointer that cannot be read is logged and the previous model keeps serving.

Task images come through :func:`image_source` (``labelstudio.task_images``: where images may come
from, which credentials go where, byte and pixel caps). One ``/predict`` runs under a
:class:`~ml_backend.limits.Deadline`: a task whose image is refused, fails, or is not reached
before the deadline gets an empty result and a log line naming the task; the rest are answered.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from label_studio_ml.model import LabelStudioMLBase

from .backend_config import BackendConfig
from .errors import MadsegError
from .labelstudio.brush import label_map_results
from .labelstudio.configs import LabelConfigError, find_brush_controls
from .labelstudio.task_images import FetchLimits, ImageSource, LabelStudioAuth
from .limits import Deadline
from .modelspec import ModelSpec
from .netguard import UrlPolicy, UrlRefused, origin_of
from .versions import ServingRecord, pointer_stamp, read_pointer

log = logging.getLogger(__name__)


def drawn_classes(class_names: tuple[str, ...], labels: tuple[str, ...]) -> dict[int, str]:
    """Class index -> label for the classes the backend draws: those the config has a label for."""
    label_set = set(labels)
    return {idx: name for idx, name in enumerate(class_names) if name in label_set}


class ModelCache:
    """The models of one process, keyed by model spec; serves the pointer's version (hot swap)."""

    def __init__(self, config: BackendConfig, max_models: int = 2) -> None:
        self.config = config
        self.max_models = max_models
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._loading: set[str] = set()
        self._failed: set[str] = set()
        self.predict_lock = threading.Lock()  # one forward pass at a time per process
        self._stamp: tuple[int, int, int] | None = None
        self._record: ServingRecord | None = None
        self.loads = 0  # how many times a model was built (tests check "once per process")

    def record(self) -> ServingRecord | None:
        """The current pointer record (re-read only when the file changed), or None."""
        stamp = pointer_stamp(self.config.model_dir)
        if stamp != self._stamp:
            try:
                rec = read_pointer(self.config.model_dir)
            except MadsegError as exc:
                log.error("cannot read the current-version pointer, keeping the served model: %s", exc)
                return self._record
            self._record, self._stamp = rec, stamp
        return self._record

    def spec(self) -> ModelSpec:
        rec = self.record()
        return rec.spec() if rec is not None else self.config.target

    def current(self, wait: bool = True) -> Any:
        """The model to serve now (a ``ml_backend.zoo`` SegmentationModel).

        A model not loaded yet is loaded (and warmed up) here when ``wait``; otherwise, if some model
        is already loaded, it keeps serving while the new one loads in the background (for the
        calls Label Studio makes with a short timeout: ``/setup``, ``/health``). A version that
        cannot be loaded is logged once and the previous model keeps serving.
        """
        spec = self.spec()
        key = json.dumps(spec.to_dict(), sort_keys=True, default=str)
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model
            fallback = next(reversed(self._models.values())) if self._models else None
            failed = key in self._failed
        if fallback is not None and failed:
            return fallback
        if fallback is not None and not wait:
            self._load_in_background(key, spec, fallback)
            return fallback
        return self._load(key, spec, fallback)

    def _load(self, key: str, spec: ModelSpec, fallback: Any) -> Any:
        from ml_backend.zoo import load_model_spec

        with self._load_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            t0 = time.perf_counter()
            try:
                model = load_model_spec(spec, device=self.config.device)
                _warm_up(model)
            except MadsegError as exc:
                if fallback is None or spec == self.config.target:
                    raise
                with self._lock:
                    self._failed.add(key)
                log.error("cannot load model %s (%s); still serving %s", spec.checkpoint, exc,
                          fallback.version)
                return fallback
            self.loads += 1
            log.info("loaded model %s in %.1f s", model.version, time.perf_counter() - t0)
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            return model

    def _load_in_background(self, key: str, spec: ModelSpec, fallback: Any) -> None:
        with self._lock:
            if key in self._loading:
                return
            self._loading.add(key)

        def run() -> None:
            try:
                self._load(key, spec, fallback)
            except Exception:
                log.exception("background load of %s failed", spec.checkpoint)
            finally:
                with self._lock:
                    self._loading.discard(key)

        threading.Thread(target=run, name="madseg-model-load", daemon=True).start()


def _warm_up(model: Any) -> None:
    """One forward pass on a blank input, so the first real request does not pay the kernel set-up."""
    import torch

    h, w = model.input_size
    model.forward(torch.zeros((1, 3, h, w), dtype=torch.float32))


_CACHES: dict[str, ModelCache] = {}
_CACHES_LOCK = threading.Lock()


def model_cache(config: BackendConfig) -> ModelCache:
    """The process-wide :class:`ModelCache` for ``config``'s model dir and target."""
    key = json.dumps([str(config.model_dir), config.target.to_dict(), config.device], sort_keys=True,
                     default=str)
    with _CACHES_LOCK:
        cache = _CACHES.get(key)
        if cache is None:
            cache = _CACHES[key] = ModelCache(config)
        return cache


def check_label_studio_url(url: str) -> None:
    """:class:`MadsegError` naming ``LABEL_STUDIO_URL`` when it is not an absolute http(s) URL."""
    try:
        origin_of(url)
    except UrlRefused as exc:
        raise MadsegError(f"LABEL_STUDIO_URL={url!r}: {exc}; give e.g. http://localhost:8080") from None


def image_source(
    config: BackendConfig, hostname: str = "", access_token: str = "", setup_trusted: bool = False,
    env: dict[str, str] | None = None,
) -> ImageSource:
    """Where this backend may fetch task images from, and with which credentials.

    ``LABEL_STUDIO_URL`` set: it is the trusted origin and the base of relative URLs;
    ``LABEL_STUDIO_API_KEY`` goes to it only; the ``/setup`` token only when ``/setup`` named that
    same origin; a different ``/setup`` hostname is ignored. ``LABEL_STUDIO_URL`` unset: the API key
    is never used; the ``/setup`` hostname is the base of relative URLs and receives its own token,
    and it is trusted (a private address allowed) only when that ``/setup`` call was authenticated
    (``setup_trusted``); otherwise it must pass the policy like any other host.
    """
    env = dict(os.environ) if env is None else env
    ls_url = env.get("LABEL_STUDIO_URL", "").strip() or None
    api_key = env.get("LABEL_STUDIO_API_KEY", "").strip()
    if ls_url:
        check_label_studio_url(ls_url)
    setup_origin = None
    if hostname:
        try:
            setup_origin = origin_of(hostname)
        except UrlRefused as exc:
            log.warning("ignoring the Label Studio hostname sent to /setup: %s", exc)
            hostname = ""
    if ls_url:
        base, trusted = ls_url, ls_url
        auth = LabelStudioAuth(ls_url, api_key) if api_key else None
        if setup_origin is not None and setup_origin != origin_of(ls_url):
            log.warning("/setup named Label Studio at %s, but LABEL_STUDIO_URL is %s; using LABEL_STUDIO_URL",
                        setup_origin, origin_of(ls_url))
            setup_origin = None
    else:
        base = hostname or None
        trusted = hostname if (hostname and setup_trusted) else None
        auth = None  # LABEL_STUDIO_API_KEY is only ever sent to LABEL_STUDIO_URL
        if api_key:
            log.warning("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: not used; "
                        "set LABEL_STUDIO_URL")
    limits = FetchLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels,
                         predict_pixels=config.predict_pixels, connect_s=config.fetch_connect_s,
                         read_s=config.fetch_read_s)
    return ImageSource(
        policy=UrlPolicy.build(trusted, config.image_hosts),
        label_studio_url=base,
        local=config.local_files_policy(),
        auth=auth,
        setup_token=access_token or None,
        setup_origin=setup_origin,
        limits=limits,
    )


#: Threads fetching one request's images, and the share of its deadline they may use.
IMAGE_WORKERS = 4
FETCH_SHARE = 0.6


def _task_name(task: Any, index: int) -> str:
    """``task 12`` (Label Studio's id when it is a plain number), else ``task #<index in the request>``."""
    tid = task.get("id") if isinstance(task, dict) else None
    if isinstance(tid, int) and not isinstance(tid, bool):
        return f"task {tid}"
    return f"task #{index}"


class MadsegSegmenter(LabelStudioMLBase):
    """Pre-fills segmentation tasks with the current target version's masks (see the module docstring).

    ``config`` defaults to :meth:`BackendConfig.from_env`; ``hostname`` / ``access_token`` are what
    Label Studio sent to ``/setup``, ``setup_trusted`` whether that call was authenticated (see
    :func:`image_source`). A label config that cannot be parsed raises :class:`LabelConfigError`.
    """

    def __init__(
        self,
        label_config: str | None = None,
        train_output: dict | None = None,
        *,
        config: BackendConfig | None = None,
        hostname: str = "",
        access_token: str = "",
        setup_trusted: bool = False,
        **kwargs: Any,
    ) -> None:
        target = find_brush_controls(label_config)  # not XML / no brush control: LabelConfigError (400)
        try:
            super().__init__(label_config=label_config, train_output=train_output, hostname=hostname,
                             access_token=access_token, **kwargs)
        except Exception as exc:  # label-studio-tools' own parser: a config it cannot read is bad input
            raise LabelConfigError(f"label config cannot be parsed ({type(exc).__name__})") from None
        self.config = config or BackendConfig.from_env()
        self.cache = model_cache(self.config)
        self.target = target
        self.images = image_source(self.config, hostname, access_token, setup_trusted)

    @property
    def model_version(self) -> str:
        return self.cache.current(wait=False).version

    def check_classes(self) -> dict[int, str]:
        """The classes this project can receive; :class:`LabelConfigError` when there are none."""
        model = self.cache.current(wait=False)
        drawn = drawn_classes(tuple(model.class_names), self.target.labels)
        if not drawn:
            raise LabelConfigError(
                f"label config <BrushLabels name={self.target.from_name!r}> has none of the model's classes "
                f"({', '.join(model.class_names[:6])}, ...); generate the config from the model's class list"
            )
        return drawn

    def _load_images(
        self, tasks: list[dict[str, Any]], login: tuple[str, str] | None, deadline: Deadline
    ) -> list[Any]:
        """Each task's image (an (H, W, 3) uint8 array) or the exception that refused it, in order.

        Images are fetched by up to :data:`IMAGE_WORKERS` threads, all within the first
        :data:`FETCH_SHARE` of the request's remaining time (the rest is kept for inference), so one
        slow host costs its own task only.
        """
        from concurrent.futures import ThreadPoolExecutor

        fetch_deadline = Deadline(deadline.remaining() * FETCH_SHARE)

        def one(i: int, task: Any) -> Any:
            what = _task_name(task, i)
            try:
                data = task.get("data") if isinstance(task, dict) else None
                if not isinstance(data, dict):
                    raise MadsegError(f"{what}: no 'data' object")
                fetch_deadline.check(what)
                return self.images.load(data.get(self.target.image_key), what, login, fetch_deadline)
            except MadsegError as exc:
                log.error("no prediction for %s: %s", what, exc)
                return exc
            except Exception as exc:  # a task no check anticipated must not fail the others
                log.error("no prediction for %s: unexpected %s", what, type(exc).__name__)
                return exc

        if not tasks:
            return []
        with ThreadPoolExecutor(max_workers=min(IMAGE_WORKERS, len(tasks)),
                                thread_name_prefix="madseg-image") as pool:
            return list(pool.map(one, range(len(tasks)), tasks))

    def predict(self, tasks: list[dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
        """One prediction per task, in order (a task whose image cannot be read gets an empty result).

        ``kwargs`` may carry Label Studio's ``login`` / ``password`` (the project's task-data basic auth)
        and ``deadline`` (a :class:`~ml_backend.limits.Deadline`; default ``MADSEG_PREDICT_DEADLINE``):
        tasks not predicted by then get empty results.
        """
        import torch

        from ml_backend.zoo.base import upsample_labels

        deadline = kwargs.get("deadline")
        if not isinstance(deadline, Deadline):
            deadline = Deadline(self.config.predict_deadline_s)
        login = None
        if kwargs.get("login") and kwargs.get("password"):
            login = (str(kwargs["login"]), str(kwargs["password"]))
        model = self.cache.current()
        drawn = drawn_classes(tuple(model.class_names), self.target.labels)
        images = self._load_images(tasks, login, deadline)
        preds: list[dict[str, Any]] = [
            {"model_version": model.version, "score": 0.0, "result": []} for _ in tasks
        ]
        ok = [i for i, im in enumerate(images) if isinstance(im, np.ndarray)]
        prep = model.preprocessor()
        batch_size = self.config.predict_batch
        for start in range(0, len(ok), batch_size):
            idx = ok[start : start + batch_size]
            if deadline.expired:
                names = ", ".join(_task_name(tasks[i], i) for i in ok[start:])
                log.error("no prediction for %s: the request's %g s deadline passed", names, deadline.seconds)
                break
            with torch.inference_mode():
                batch = torch.stack([prep.to_tensor(images[i], model.device) for i in idx])
            with self.cache.predict_lock:
                probs = model.forward(batch)  # [B, C, h, w] at the model's input size
            with torch.inference_mode():
                maxp_small, _ = probs.max(dim=1)  # [B, h, w]
                for j, i in enumerate(idx):
                    h, w = images[i].shape[:2]
                    label_map = upsample_labels(probs[j], (h, w)).numpy()
                    maxp = torch.nn.functional.interpolate(
                        maxp_small[j][None, None], size=(h, w), mode="bilinear", align_corners=False
                    )[0, 0].numpy()
                    preds[i] = {
                        "model_version": model.version,
                        "score": round(float(maxp_small[j].mean()), 4),
                        "result": label_map_results(label_map, drawn, self.target, maxp),
                    }
        return preds
