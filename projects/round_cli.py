"""``madseg round`` (drive the rounds of an experiment) and ``madseg demo`` (the README's main job).

``madseg round --config exp.toml`` runs (or resumes) rounds 1..``--rounds`` of the experiment,
the entropy baseline after round 1 (when ``[selection] baseline = "entropy"``), the evaluation
pass and the report. ``--round i`` runs only round i (``--until STAGE`` stops after a stage);
``--report`` only evaluates and renders the report from what is there. Label Studio must be
running (``[label_studio] url`` and the API key in ``$LABEL_STUDIO_API_KEY``).

``madseg demo`` starts its own Label Studio and ML backend and runs everything on ``../shared``
(see :mod:`projects.simulation.demo`).
"""

from __future__ import annotations

import argparse
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paper", action="store_true",
                   help="the paper's fine-tuning settings (80 epochs, LR grid {1,5,10}e-5) instead of "
                   "the preset")
    oracle = p.add_mutually_exclusive_group()
    oracle.add_argument("--no-oracle", dest="oracle", action="store_false", default=None,
                        help="leave rating and segmentation to people in Label Studio and wait for them")
    oracle.add_argument("--oracle", dest="oracle", action="store_true",
                        help="simulated raters/annotators even if the config does not enable them")
    p.add_argument("--rounds", type=int, default=None,
                   help="number of MAD rounds (default: round: 1, demo: 2)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between checks while waiting for people")
    p.add_argument("--wait-timeout", type=float, default=None,
                   help="give up waiting for people after this many seconds (default: wait forever)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the entropy-baseline comparison")
    p.add_argument("--no-lwf", dest="lwf", action="store_false",
                   help="skip the LwF-distillation variant of the round-1 fine-tune")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "round", help="run/resume the rounds of an experiment (score, select, rate, label, fine-tune)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="experiment TOML (see projects/templates/demo.toml)")
    p.add_argument("--round", type=int, default=None, help="run only this round (1-based)")
    p.add_argument("--until", default=None, help="with --round: stop after this stage")
    p.add_argument("--eval-pass", action="store_true",
                   help="with --round i: run the evaluation pass (T only, no fine-tune) as round i")
    p.add_argument("--report", action="store_true", help="only evaluate and render the report")
    p.add_argument("--backend-url", default=None, help="ML backend URL to connect (default: from the config)")
    _common(p)
    p.set_defaults(func=_round)

    d = subparsers.add_parser(
        "demo",
        help="the demo: local Label Studio + ML backend, 2 rounds on ../shared with the oracle, report",
        description="Start a local Label Studio (SQLite in the experiment dir) and the ML backend, run the "
        "MAD rounds on ../shared (simulated raters/annotators unless --no-oracle), render the report, "
        "print how to look at it, stop the servers (unless --keep-running). Re-running resumes.",
    )
    d.add_argument("--config", default=None, help="experiment TOML (default: projects/templates/demo.toml)")
    d.add_argument("--dir", default=None, help="experiment dir (default: runs/demo, or runs/demo-paper)")
    d.add_argument("--port", type=int, default=8080, help="Label Studio port")
    d.add_argument("--backend-port", type=int, default=9090, help="ML backend port")
    d.add_argument("--keep-running", action="store_true", help="leave Label Studio and the backend running")
    _common(d)
    d.add_argument("--lwf-variant", dest="lwf", action="store_true",
                   help="also train the LwF-distillation variant of the round-1 fine-tune (no replay; "
                        "+~80 s on 2 CPU cores; `madseg round` trains it unless --no-lwf)")
    d.set_defaults(func=_demo, lwf=False)


def _options(args: argparse.Namespace, **extra: Any) -> Any:
    import logging

    from .rounds import RunOptions

    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per Label Studio request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)

    return RunOptions(oracle=args.oracle, poll_s=args.poll, wait_timeout_s=args.wait_timeout,
                      device=args.device, progress=not args.quiet, lwf_variant=args.lwf, **extra)


def _round(args: argparse.Namespace) -> int:
    from .experiment import load_experiment
    from .layout import ExperimentLayout
    from .pipeline import report_finished_rounds, run_experiment
    from .rounds import RoundRunner
    from .state import experiment_lock

    exp = load_experiment(args.config, preset="paper" if args.paper else None)
    opts = _options(args, backend_url=args.backend_url)
    _preflight(exp, args, services=not args.report)
    with experiment_lock(exp.dir):
        if args.report:
            results = report_finished_rounds(exp, opts, baseline=args.baseline)
            print(f"report: {results['report']}")
            return 0
        if args.round is not None:
            runner = RoundRunner(exp, opts)
            plan = runner.mad_plan(args.round, final_eval=args.eval_pass)
            if args.until and args.until not in plan.stages:
                from ml_backend.errors import MadsegError

                raise MadsegError(f"--until {args.until}: not a stage; stages: {', '.join(plan.stages)}")
            st = runner.run(plan, until=args.until)
            print(f"round {args.round}: done stages {', '.join(st.done_stages())} ({st.path})")
            return 0
        results = run_experiment(exp, args.rounds or 1, opts, baseline=args.baseline)
    print(f"results: {ExperimentLayout.of(exp.dir).results}")
    if results.get("report"):
        print(f"report:  {results['report']}")
    return 0


def _preflight(exp: Any, args: argparse.Namespace, *, services: bool) -> None:
    """Before any long stage: every model loads with the experiment's classes and (``services``)
    Label Studio, the ML backend URL and Redis (when ``REDIS_URL`` is set) answer; else exit 2."""
    import os

    from .preflight import require_preflight

    require_preflight(
        exp, exp.path.name, label_studio=services, device=args.device,
        backend_url=(args.backend_url or exp.label_studio.backend_url) if services else None,
        redis_url=(os.environ.get("REDIS_URL") or None) if services else None,
    )


def _demo(args: argparse.Namespace) -> int:
    from .simulation.demo import run_demo

    return run_demo(args, _options(args))
