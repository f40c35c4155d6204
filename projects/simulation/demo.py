"""``madseg demo``: the whole method on ``../shared`` with one command.

1. The experiment is ``projects/templates/demo.toml`` (pool = coco_voc + unlabelled images;
   target ESPNetv2 s=2.0 @384; competitors DiCENet s=1.75 @384, the TFLite DeepLabV3 and ESPNetv2
   s=1.0 @384; S(0) = VOC 2012 train, T(0) = a fixed 21-image subset of VOC 2012 val), with the
   experiment dir, the Label Studio URL and the ML backend URL filled in (a copy is written to
   ``<dir>/experiment.toml``).
2. A local Label Studio starts on 127.0.0.1:``--port`` with its SQLite data in ``<dir>/label-studio``,
   a legacy API token, and local-files serving from a document root that holds ``../shared`` and
   the experiment dir. The admin account (e-mail + password) is generated once and kept in
   ``<dir>/label-studio/credentials.json`` (mode 0600), so re-runs log in with the same account.
3. The ML backend (``madseg backend``) starts on 127.0.0.1:``--backend-port`` serving the target
   and, after each round, the version the round fine-tuned if the promotion gate promoted it
   (``<dir>/backend/current.json``; a rejected version is kept and listed, never served); it
   does not fine-tune on annotations (``MADSEG_TRAIN_ON_ANNOTATION=0``): the rounds do that
   in-process.
4. ``projects.pipeline.run_experiment`` runs rounds 1..``--rounds`` (default 2) with the simulated
   raters/annotators (``--no-oracle``: people do it and the demo waits), the entropy baseline and
   the LwF variant after round 1, the evaluation pass and the report.
5. It prints the report's path, the wall time of every stage, and how to open Label Studio; then
   stops both servers unless ``--keep-running``.

Re-running the same command resumes where it stopped (finished stages are not redone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ml_backend.atomic import atomic_write_json, atomic_write_text
from ml_backend.errors import MadsegError

from ..layout import ExperimentLayout

TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "demo.toml"
BACKEND_START_TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------


def demo_overrides(exp_dir: Path, port: int, backend_port: int, oracle: bool | None) -> dict[str, Any]:
    """Dotted-key overrides of the demo config for ``load_experiment``."""
    out: dict[str, Any] = {
        "experiment.dir": str(exp_dir),
        "label_studio.url": f"http://127.0.0.1:{port}",
        "label_studio.backend_url": f"http://127.0.0.1:{backend_port}",
    }
    if oracle is not None:
        out["oracle.enabled"] = bool(oracle)
    return out


def credentials(ls_dir: Path) -> dict[str, str]:
    """The demo's Label Studio admin account and legacy token (created once, kept 0600)."""
    path = ls_dir / "credentials.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if all(isinstance(data.get(k), str) and data[k] for k in ("username", "password", "token")):
                return data
        except (OSError, ValueError):
            pass
        raise MadsegError(f"{path}: unreadable demo credentials; delete {ls_dir} to start Label Studio "
                          "afresh")
    ls_dir.mkdir(parents=True, exist_ok=True)
    data = {"username": "admin@madseg.local", "password": secrets.token_urlsafe(12),
            "token": secrets.token_hex(20)}
    atomic_write_json(path, data)
    os.chmod(path, 0o600)
    return data


# ----------------------------------------------------------------------------------------------
# servers
# ----------------------------------------------------------------------------------------------


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, what: str, log: Path) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if _http_ok(url):
            return
        if proc.poll() is not None:
            raise MadsegError(f"{what} exited with status {proc.returncode} while starting; see {log}")
        time.sleep(1.0)
    raise MadsegError(f"{what} did not answer {url} within {timeout_s:.0f} s; see {log}")


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise MadsegError(f"`{name}` not found; install madseg with its server extra (make demo does)")
    return found


def _stop(proc: subprocess.Popen[bytes] | None, what: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def start_backend(exp_dir: Path, config_file: Path, port: int, ls_url: str, token: str,
                  document_root: Path) -> subprocess.Popen[bytes]:
    """Start ``madseg backend`` for the experiment (no training on annotations); wait for /health."""
    url = f"http://127.0.0.1:{port}"
    if _http_ok(f"{url}/health"):
        raise MadsegError(f"something already answers on {url}; stop it or pass --backend-port")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update({
        "MADSEG_EXPERIMENT": str(config_file),
        "MADSEG_MODEL_DIR": str(ExperimentLayout.of(exp_dir).model_dir),
        "MADSEG_TRAIN_ON_ANNOTATION": "0",
        "MADSEG_BACKEND_HOST": "127.0.0.1",
        "MADSEG_BACKEND_PORT": str(port),
        "MADSEG_BACKEND_THREADS": "2",
        "LABEL_STUDIO_URL": ls_url,
        "LABEL_STUDIO_API_KEY": token,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
    })
    log = ExperimentLayout.of(exp_dir).backend_log
    fh = open(log, "ab")  # noqa: SIM115 - owned by the child
    madseg = _bin("madseg")
    proc = subprocess.Popen([madseg, "backend"], env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_http(f"{url}/health", proc, BACKEND_START_TIMEOUT_S, "the ML backend", log)
    except BaseException:
        _stop(proc, "ML backend")
        raise
    return proc


@contextlib.contextmanager
def servers(exp: Any, exp_dir: Path, config_file: Path, port: int, backend_port: int,
            keep_running: bool) -> Iterator[dict[str, Any]]:
    """Label Studio + ML backend for the demo; stopped on exit unless ``keep_running``."""
    from .ls_local import start_local_label_studio

    ls_dir = ExperimentLayout.of(exp_dir).label_studio
    creds = credentials(ls_dir)
    doc_root = exp.document_root()
    port = int(exp.label_studio.url.rsplit(":", 1)[1].split("/")[0])
    if _http_ok(f"{exp.label_studio.url}/health"):
        raise MadsegError(f"something already answers on {exp.label_studio.url}; stop it or pass --port")
    ls = backend = None
    try:
        print(f"starting Label Studio on {exp.label_studio.url} (the first start migrates its database, "
              "~1 min) ...", flush=True)
        ls = start_local_label_studio(ls_dir / "data", port=port, document_root=doc_root,
                                      username=creds["username"], password=creds["password"],
                                      token=creds["token"], log_path=ls_dir / "label-studio.log")
        os.environ[exp.label_studio.api_key_env] = creds["token"]
        print(f"starting the ML backend on {exp.label_studio.backend_url} ...", flush=True)
        backend = start_backend(exp_dir, config_file, backend_port, exp.label_studio.url, creds["token"],
                                doc_root)
        yield {"credentials": creds, "ls": ls, "backend": backend}
    finally:
        if keep_running and sys.exc_info()[0] is None:
            pids = [p.pid for p in (ls.process if ls else None, backend) if p is not None]
            print(f"servers keep running (process groups {pids}); stop them with: kill -- "
                  + " ".join(f"-{p}" for p in pids))
        else:
            _stop(backend, "ML backend")
            if ls is not None:
                ls.stop()


# ----------------------------------------------------------------------------------------------
# the demo
# ----------------------------------------------------------------------------------------------


def stage_times(exp_dir: Path) -> list[tuple[str, str, float]]:
    """(round folder, stage, seconds) of every finished stage, in order (for the wall-time table)."""
    out = []
    for state in sorted(exp_dir.glob("**/round-*/state.json")):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        where = str(state.parent.relative_to(exp_dir))
        for name, rec in data.get("stages", {}).items():
            if rec.get("status") == "done":
                out.append((where, name, float(rec.get("seconds") or 0.0)))
    return out


def stage_table(exp_dir: Path) -> str:
    """Markdown table of the wall time per stage and round (from the state files)."""
    rows = stage_times(exp_dir)
    wheres = list(dict.fromkeys(w for w, _, _ in rows))
    stages = list(dict.fromkeys(s for _, s, _ in rows))
    t = {(w, s): sec for w, s, sec in rows}
    lines = ["| stage | " + " | ".join(wheres) + " |", "|---|" + "---|" * len(wheres)]
    for s in stages:
        cells = [f"{t[(w, s)]:.0f}" if (w, s) in t else "" for w in wheres]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("| **total (s)** | " + " | ".join(
        f"{sum(sec for w2, _, sec in rows if w2 == w):.0f}" for w in wheres) + " |")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace, options: Any) -> int:
    """The ``madseg demo`` command (see the module docstring)."""
    from ..experiment import load_experiment
    from ..pipeline import run_experiment
    from ..state import experiment_lock

    config = Path(args.config).resolve() if args.config else TEMPLATE
    exp_dir = Path(args.dir or ("runs/demo-paper" if args.paper else "runs/demo")).resolve()
    overrides = demo_overrides(exp_dir, args.port, args.backend_port, args.oracle)
    exp = load_experiment(config, preset="paper" if args.paper else None, overrides=overrides)
    rounds = args.rounds or 2
    t0 = time.monotonic()
    # SIGTERM (and SIGINT, even where a background shell ignores it) end the demo through the
    # normal exit path, so Label Studio and the ML backend are stopped too; re-running resumes.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    from ..preflight import require_preflight

    # before starting anything: every model loads and predicts the experiment's classes
    require_preflight(exp, "the demo's models", label_studio=False, device=options.device)
    with experiment_lock(exp.dir):
        layout = ExperimentLayout.of(exp.dir)
        config_copy = layout.config_copy
        atomic_write_text(config_copy, _toml_with_overrides(config.read_text(), overrides, exp))
        with servers(exp, exp.dir, config_copy, args.port, args.backend_port, args.keep_running) as srv:
            # what the demo started: Label Studio accepts the token, the backend answers
            require_preflight(exp, "the demo's servers", models=False,
                              backend_url=exp.label_studio.backend_url)
            options.backend_url = exp.label_studio.backend_url
            options.model_dir = layout.model_dir
            results = run_experiment(exp, rounds, options, baseline=args.baseline)
            creds = srv["credentials"]
            print()
            print(f"madseg demo: {rounds} round(s) done in {time.monotonic() - t0:.0f} s (this run)")
            print(f"  report:       {results.get('report')}")
            print(f"  results:      {layout.results}")
            print(f"  Label Studio: {exp.label_studio.url}  (user {creds['username']}, password "
                  f"{creds['password']}; also in {layout.label_studio / 'credentials.json'})")
            if not args.keep_running:
                print("  (the servers stop now; re-run with --keep-running to browse the projects; "
                      "re-running resumes and only starts the servers)")
            print()
            print("wall time per stage (s):")
            print(stage_table(exp.dir))
    return 0


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _toml_with_overrides(text: str, overrides: dict[str, Any], exp: Any) -> str:
    """The demo config as run: the template with the overrides written into their sections, and
    relative paths made absolute (so the ML backend can read it from the experiment dir)."""
    import re

    lines = text.splitlines()
    pending = dict(overrides)
    section = None
    replaced: list[str] = []
    for line in lines:  # pass 1: replace keys that the template sets
        m = re.match(r"^\s*\[([a-z_]+)\]\s*$", line)
        if m:
            section = m.group(1)
        key_m = re.match(r"^\s*([a-z_0-9]+)\s*=", line)
        dotted = f"{section}.{key_m.group(1)}" if key_m and section else None
        if dotted in pending:
            replaced.append(f"{key_m.group(1)} = {json.dumps(pending.pop(dotted))}")
        else:
            replaced.append(line)
    out: list[str] = []
    for line in replaced:  # pass 2: add the others right after their section header
        out.append(line)
        m = re.match(r"^\s*\[([a-z_]+)\]\s*$", line)
        if m:
            for dotted in [d for d in pending if d.split(".")[0] == m.group(1)]:
                out.append(f"{dotted.split('.')[1]} = {json.dumps(pending.pop(dotted))}")
    for dotted, value in pending.items():  # sections the template lacks
        out += ["", f"[{dotted.split('.')[0]}]", f"{dotted.split('.')[1]} = {json.dumps(value)}"]
    text = "\n".join(out) + "\n"
    text = text.replace("{config_dir}", str(TEMPLATE.parent))
    return text
