"""``madseg backend`` (the ML backend under gunicorn) and ``madseg worker`` (rq worker for fine-tunes).

Both read their configuration from environment variables (:mod:`ml_backend.backend_config`);
command-line options override the listen address and the queue. The ``madseg`` program
(``projects.cli``) registers them with :func:`register`; ``python -m ml_backend`` runs :func:`main`.

``madseg backend`` listens on 127.0.0.1 unless told otherwise; any other address (``0.0.0.0``, a
LAN address, a host name) is refused unless credentials are configured (basic auth or
``MADSEG_BACKEND_TOKEN``): :func:`check_exposure`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .backend_config import BackendConfig
from .errors import MadsegError

log = logging.getLogger(__name__)


def is_loopback_host(host: str) -> bool:
    """True for ``127.x.y.z``, ``::1`` and ``localhost`` (the addresses only this machine reaches)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_exposure(config: BackendConfig) -> None:
    """Refuse to listen beyond loopback without credentials (:class:`MadsegError` saying how to set them)."""
    if is_loopback_host(config.host) or config.has_credentials:
        return
    raise MadsegError(
        f"refusing to listen on {config.host}:{config.port} without authentication: anyone who reaches it "
        "could run predictions and queue fine-tunes. Set BASIC_AUTH_USER and BASIC_AUTH_PASS (give Label "
        "Studio the same when connecting the backend) and/or MADSEG_BACKEND_TOKEN (a bearer token, "
        "16+ characters), or listen on 127.0.0.1 (the default)"
    )


def serve(config: BackendConfig, *, log_level: str = "info") -> None:
    """Run the backend app under gunicorn (gthread workers) until interrupted.

    One worker process by default (the model is loaded once per process; without Redis the fine-tune
    queue lives in that process). The app is built inside the worker, after the fork.
    """
    from gunicorn.app.base import BaseApplication

    from .app import create_app

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings = {
                "bind": f"[{config.host}]:{config.port}" if ":" in config.host
                else f"{config.host}:{config.port}",
                "workers": config.workers,
                "worker_class": "gthread",
                "threads": config.threads,
                "timeout": 600,
                "graceful_timeout": 30,
                "keepalive": 5,
                "loglevel": log_level,
                "accesslog": "-",
                # path and status only: query strings and bodies may carry tokens
                "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms',
                "errorlog": "-",
                "proc_name": "madseg-backend",
            }
            # gunicorn >= 25 opens a control socket at one fixed path per user; several backends
            # (tests, a worker host) would fight over it, and nothing here uses it
            if "control_socket_disable" in self.cfg.settings:
                settings["control_socket_disable"] = True
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return create_app(config, preload=True)

    _Server().run()


def _backend(args: argparse.Namespace) -> int:
    config = BackendConfig.from_env()
    changes: dict[str, Any] = {}
    if args.host:
        changes["host"] = args.host
    if args.port is not None:
        changes["port"] = args.port
    if changes:
        config = config.with_(**changes)
    check_exposure(config)
    if os.environ.get("LABEL_STUDIO_URL", "").strip():
        from .model import check_label_studio_url

        check_label_studio_url(os.environ["LABEL_STUDIO_URL"].strip())
    config.local_files_policy()  # a document root of / with nothing narrower: one clear error
    require_label_studio_ml()
    log.info("madseg backend on %s:%d, target %s, model dir %s, queue %s", config.host, config.port,
             config.target.name, config.model_dir, "redis" if config.redis_url else "in-process")
    serve(config, log_level="debug" if args.verbose else "info")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .jobs import run_worker

    config = BackendConfig.from_env()
    if args.queue:
        config = config.with_(queue_name=args.queue)
    log.info("madseg worker on rq queue %s (model dir %s)", config.queue_name, config.model_dir)
    run_worker(config, burst=args.burst)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``backend`` and ``worker`` to the ``madseg`` CLI."""
    p = subparsers.add_parser(
        "backend",
        help="serve the Label Studio ML backend (gunicorn)",
        description="Serve the Label Studio ML backend under gunicorn. Configuration comes from environment "
        "variables (MADSEG_MODEL, MADSEG_CHECKPOINT, MADSEG_MODEL_DIR, REDIS_URL, LABEL_STUDIO_URL, ...; "
        "see ml_backend/backend_config.py).",
    )
    _backend_arguments(p)
    p.set_defaults(func=_backend)

    w = subparsers.add_parser(
        "worker",
        help="run fine-tune jobs from the rq queue (needs REDIS_URL)",
        description="Run an rq worker for the backend's fine-tune queue (same environment as "
        "`madseg backend`).",
    )
    w.add_argument("--queue", default=None, help="rq queue name (default $MADSEG_QUEUE or madseg-finetune)")
    w.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    w.set_defaults(func=_worker)


def _backend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None,
                   help="listen address (default: $MADSEG_BACKEND_HOST, else 127.0.0.1; any other address "
                   "needs BASIC_AUTH_USER/BASIC_AUTH_PASS or MADSEG_BACKEND_TOKEN)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: $MADSEG_BACKEND_PORT, 9090)")


def require_label_studio_ml() -> None:
    """Check that ``label_studio_ml`` (installed without its dependencies) imports, else one clear
    :class:`MadsegError` saying how to install it (a plain ``pip install madseg`` does not)."""
    try:
        import label_studio_ml.model  # noqa: F401
    except ImportError as exc:
        raise MadsegError(
            f"the ML backend needs label-studio-ml, which is not importable ({exc}); install it without "
            "its outdated Flask pins: `pip install --no-deps -r requirements-nodeps.txt` in the madseg "
            "checkout (or `pip install --no-deps label-studio-ml==1.0.9`)"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ml_backend``: ``madseg backend`` on its own (``madseg`` itself is ``projects.cli``).

    The experiment TOML is not read here (it belongs to ``projects``): give the settings file in
    ``MADSEG_BACKEND_SETTINGS``, or use ``madseg backend`` with ``MADSEG_EXPERIMENT``.
    """
    from .errors import MadsegError

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parser = argparse.ArgumentParser(
        prog="python -m ml_backend",
        description="Serve the Label Studio ML backend under gunicorn (the same as `madseg backend`).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _backend_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return _backend(args)
    except MadsegError as exc:
        print(f"madseg backend: error: {exc}", file=sys.stderr)
        return 2
