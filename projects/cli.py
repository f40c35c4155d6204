"""The ``madseg`` command line: one program, one subcommand per job.

Each area of the code registers its own subcommands (``register(subparsers)`` in the modules
listed in :data:`COMMAND_MODULES`); heavy imports (torch, Label Studio) happen inside the
subcommands, so ``madseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

#: Modules that add subcommands; each has ``register(subparsers: argparse._SubParsersAction)``
#: and sets ``func(args) -> int | None`` as the parser default.
COMMAND_MODULES: tuple[str, ...] = (
    "ml_backend.backend_cli",
    "ml_backend.cli",
    "projects.admin_cli",
    "projects.evaluation.report_cli",
    "projects.round_cli",
    "sampler.cli",
)

#: Commands of ``ml_backend.backend_cli`` that read ``MADSEG_EXPERIMENT`` through
#: ``projects.backend_settings`` (the backend itself never reads the experiment TOML).
BACKEND_COMMANDS: frozenset[str] = frozenset({"backend", "worker"})


def build_parser() -> argparse.ArgumentParser:
    """The ``madseg`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="madseg",
        description="Find where a segmentation model fails (MAD competition against a model zoo) "
        "and fix it with few human labels in Label Studio.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``madseg`` console script; returns the exit status."""
    from ml_backend.errors import MadsegError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if args.command in BACKEND_COMMANDS:  # the backend gets the experiment's settings as data
            from .backend_settings import prepare_backend_env

            prepare_backend_env(os.environ)
        rc = args.func(args)
    except MadsegError as exc:
        print(f"madseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"madseg {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
