"""Pre-flight checks: before ``madseg round`` / ``madseg demo`` spend minutes scoring, find out
whether the run can finish.

Checks (each failure is one line that names the thing and says how to fix it):

- **models**: every model of the experiment (target and competitors) loads with the zoo, and its
  output classes, after its ``class_map``, are the experiment's ``[experiment] classes`` (same
  order; generic names such as ``class_3`` / ``LABEL_3`` match by position).
- **Label Studio**: the API key variable is set, ``[label_studio] url`` answers and accepts the key.
- **ML backend**: the backend URL (``--backend-url`` or ``[label_studio] backend_url``), when set,
  answers ``GET /health`` (200, or 401 when it asks for basic auth).
- **Redis**: when ``REDIS_URL`` is set (the backend's job queue), it answers ``PING``.

:func:`class_problem` and :func:`format_problems` are pure; the ``*_problem`` functions do one
network call or model load each; :func:`run_preflight` runs the selected checks and
:func:`require_preflight` raises :class:`PreflightError` (exit status 2 in the CLI) listing every
problem. ``madseg score`` needs none of this.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from ml_backend.errors import MadsegError

from .experiment import ExperimentConfig, ModelConfig

HTTP_TIMEOUT_S = 5.0
_GENERIC = re.compile(r"^(class_|label_)?(\d+)$", re.IGNORECASE)


class PreflightError(MadsegError):
    """One or more pre-flight checks failed; the message has one line per problem."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _where(exp: ExperimentConfig, m: ModelConfig) -> str:
    if m is exp.target:
        return f"[target] {m.key}"
    return f"[[competitors]] {m.key}"


def class_problem(model_classes: Sequence[str], exp_classes: Sequence[str]) -> str | None:
    """What is wrong with a model's output classes for an experiment's classes, or None.

    Equal lists match; so do generic names (``class_3``, ``LABEL_3``, ``3``) at the same position.
    """
    if len(model_classes) != len(exp_classes):
        shown = ", ".join(list(model_classes)[:4])
        return (f"predicts {len(model_classes)} classes ({shown}, ...) but the experiment has "
                f"{len(exp_classes)}; add options.class_map (e.g. \"ade20k-voc\", or a map file) or "
                "pick a model trained on the experiment's classes")
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(model_classes, exp_classes, strict=True))
           if a != b and not ((m := _GENERIC.match(a)) and int(m.group(2)) == i)]
    if bad:
        i, a, b = bad[0]
        return (f"class {i} is {a!r} but the experiment's class {i} is {b!r} ({len(bad)} differ); set "
                "options.class_names in the experiment's order, or a class_map")
    return None


def model_problems(
    exp: ExperimentConfig, *, device: str | None = None, loader: Callable[[ModelConfig], Any] | None = None
) -> list[str]:
    """Load every model of ``exp`` (``loader``, default ``ModelConfig.load(device)``) and check its
    classes; one line per model that fails. Loaded models are dropped again."""
    load = loader or (lambda m: m.load(device))
    out = []
    for m in exp.models:
        where = _where(exp, m)
        try:
            model = load(m)
        except MadsegError as exc:
            out.append(f"model {where}: {_first_line(exc)}")
            continue
        except Exception as exc:  # a broken model file can fail in any library: report, do not crash
            out.append(f"model {where}: does not load ({type(exc).__name__}: {_first_line(exc)[:200]}); "
                       "check name, checkpoint and options")
            continue
        problem = class_problem(tuple(model.class_names), exp.classes)
        if problem:
            out.append(f"model {where}: {problem}")
        del model
    return out


def label_studio_problem(url: str, api_key_env: str, timeout_s: float = HTTP_TIMEOUT_S) -> str | None:
    """None when Label Studio at ``url`` answers and accepts the key in ``$api_key_env``."""
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        return (f"Label Studio: environment variable {api_key_env} is not set; set it to your Label Studio "
                "access token (Account & Settings > Personal Access Token)")
    from ml_backend.labelstudio.client import connect

    try:
        connect(url, key, retries=0, backoff_s=0.0, timeout_s=timeout_s, check=True)
    except MadsegError as exc:
        line = _first_line(exc)
        if "unreachable" in line:
            line += " (for madseg round: [label_studio] url in the experiment file)"
        return line if line.startswith("Label Studio") else f"Label Studio: {line}"
    except Exception as exc:  # the SDK's own errors (bad URL, TLS, ...): report them, one line
        return (f"Label Studio at {url}: {type(exc).__name__}: {_first_line(exc)[:200]}; start it "
                "(label-studio start) or fix [label_studio] url")
    return None


def backend_problem(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> str | None:
    """None when the ML backend at ``url`` answers ``GET /health`` with 200 (or 401: basic auth)."""
    import requests

    health = f"{url.rstrip('/')}/health"
    try:
        resp = requests.get(health, timeout=timeout_s)
    except requests.RequestException as exc:
        return (f"ML backend: {health} does not answer ({type(exc).__name__}); start it with "
                "`madseg backend` (MADSEG_EXPERIMENT=<experiment.toml>) or fix --backend-url / "
                "[label_studio] backend_url")
    if resp.status_code in (200, 401):
        return None
    return (f"ML backend: {health} answers HTTP {resp.status_code}; is that address a madseg backend? "
            "fix --backend-url / [label_studio] backend_url")


def redis_problem(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> str | None:
    """None when Redis at ``url`` answers ``PING``."""
    import redis

    shown = re.sub(r"//[^@/]*@", "//***@", url)  # never print a password
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        client.ping()
    except (redis.RedisError, ValueError, OSError) as exc:
        return (f"Redis: {shown} does not answer PING ({type(exc).__name__}: {_first_line(exc)[:120]}); "
                "start Redis or unset/fix REDIS_URL")
    return None


def run_preflight(
    exp: ExperimentConfig,
    *,
    models: bool = True,
    label_studio: bool = True,
    backend_url: str | None = None,
    redis_url: str | None = None,
    device: str | None = None,
    loader: Callable[[ModelConfig], Any] | None = None,
) -> list[str]:
    """Run the selected checks; returns one line per problem (empty: all good). ``backend_url``
    and ``redis_url`` are checked only when given."""
    problems: list[str] = []
    if label_studio:
        p = label_studio_problem(exp.label_studio.url, exp.label_studio.api_key_env)
        if p:
            problems.append(p)
    if backend_url:
        p = backend_problem(backend_url)
        if p:
            problems.append(p)
    if redis_url:
        p = redis_problem(redis_url)
        if p:
            problems.append(p)
    if models:
        problems += model_problems(exp, device=device, loader=loader)
    return problems


def format_problems(problems: Sequence[str], what: str) -> str:
    """The error message: a header line, then one indented line per problem."""
    head = f"pre-flight check of {what} found {len(problems)} problem(s); nothing was run:"
    return "\n".join([head, *(f"  - {p}" for p in problems)])


def require_preflight(exp: ExperimentConfig, what: str, **kwargs: Any) -> None:
    """:func:`run_preflight`, raising :class:`PreflightError` when anything is wrong."""
    problems = run_preflight(exp, **kwargs)
    if problems:
        raise PreflightError(format_problems(problems, what))
