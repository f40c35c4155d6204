"""``madseg score`` and ``madseg select``.

``madseg score POOL... --store DIR (--target SPEC --competitor SPEC... | --config models.toml)``
runs the target and competitor models over the pool into the score store (see
:mod:`sampler.score`). A model SPEC is ``name[,checkpoint=PATH][,key=value...]``, e.g.
``espnetv2,scale=0.5,input_size=256`` or ``tflite,checkpoint=model.tflite``. The TOML config has a
``[target]`` table and ``[[competitors]]`` tables with ``name``, ``checkpoint`` and ``options``
(relative checkpoint paths are relative to the TOML file). Works under
``torchrun --nproc-per-node N madseg score ...``.

``madseg select --store DIR --method mad|entropy|random`` writes ``candidates.jsonl`` (one line
per selected image) and a summary JSON beside it, and prints the summary table (see
:mod:`sampler.candidates`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ml_backend.errors import MadsegError
from ml_backend.modelspec import ModelSpec

log = logging.getLogger(__name__)


def _resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 256 or 256x320") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 256 or 256x320")
    return parts[0], parts[1]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score`` and ``select`` subcommands."""
    p = subparsers.add_parser(
        "score", help="run the target and competitor models over an unlabelled pool into a score store",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pool", nargs="+",
                   help="image folder(s), image file(s), list file(s) (.txt/.csv) or URL(s)")
    p.add_argument("--store", required=True, type=Path, help="score store directory (created if missing)")
    p.add_argument("--target", help="target model spec: name[,checkpoint=PATH][,key=value...]")
    p.add_argument("--competitor", action="append", default=[], help="competitor model spec (repeat)")
    p.add_argument("--config", type=Path, help="TOML file with [target] and [[competitors]] tables")
    p.add_argument("--batch-size", type=int, default=8, help="images per inference batch (default 8)")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading worker processes (default: on a GPU up to 8; on the CPU the cores "
                        "not used by torch's threads, 0 on a 2-core machine)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resolution", type=_resolution, default=None,
                   help="working resolution HxW of stored label maps (default: the target's input size)")
    p.add_argument("--timeout", type=float, default=30.0, help="download timeout for URLs (s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the run statistics as JSON")
    p.set_defaults(func=cmd_score)

    s = subparsers.add_parser(
        "select", help="choose images to label from a score store: MAD, entropy or random",
        description=__doc__.split("\n\n")[2],
    )
    s.add_argument("--store", required=True, type=Path, help="score store directory")
    s.add_argument("--method", choices=("mad", "entropy", "random"), default="mad")
    s.add_argument("--n3", type=int, default=10, help="MAD: images per (competitor, class, partition)")
    s.add_argument("--n", type=int, default=None,
                   help="entropy/random: number of images to select (required for those methods)")
    s.add_argument("--bounds", choices=("auto", "s0", "pool", "none"), default="auto",
                   help="MAD: size-bound rule: auto (default: --bounds-from masks where a class has "
                        "--min-occurrences of them, else the models' predicted areas on the pool, else "
                        "none), s0 (the paper: --bounds-from only), pool, none")
    s.add_argument("--bounds-from", type=Path, default=None,
                   help="labelled folder (masks/ or *.png), S(0), for the per-class size bounds")
    s.add_argument("--bounds-method", choices=("quartiles", "mean_std"), default="quartiles")
    s.add_argument("--min-occurrences", type=int, default=5,
                   help="fewest masks (or pool predictions) of a class for bounds from them (default 5)")
    s.add_argument("--order", choices=("failures", "rank"), default="failures",
                   help="MAD: order of M for the raters: failures (default: competitors' agreement against "
                        "the target, class round-robin) or rank (the paper's best rank)")
    s.add_argument("--budget", type=int, default=0,
                   help="MAD: rating budget R: write only M's first R candidates (default 0 = all of M)")
    s.add_argument("--metric", choices=("miou", "pixel_accuracy"), default="miou")
    s.add_argument("--target-version", default=None, help="default: the target of the latest score run")
    s.add_argument("--competitor-version", action="append", default=None,
                   help="competitor version (repeat; default: those of the latest score run)")
    s.add_argument("--seed", type=int, default=0, help="random baseline seed")
    s.add_argument("--out", type=Path, default=Path("candidates.jsonl"), help="output JSONL")
    s.add_argument("--summary", type=Path, default=None, help="summary JSON (default: <out>.summary.json)")
    s.set_defaults(func=cmd_select)


def read_models_config(path: Path) -> tuple[ModelSpec, list[ModelSpec]]:
    """``[target]`` and ``[[competitors]]`` of a TOML file, each read by the zoo's one table reader
    (``ml_backend.zoo.model_spec_from_table``: types checked, paths relative to the file)."""
    from ml_backend.tomlfile import read_toml

    data = read_toml(path, f"--config {path}")
    target = data.get("target")
    comps = data.get("competitors", [])
    if not isinstance(target, dict) or not target.get("name"):
        raise MadsegError(f"--config {path}: needs a [target] table with a name")
    if not isinstance(comps, list) or not all(isinstance(c, dict) and c.get("name") for c in comps):
        raise MadsegError(f"--config {path}: [[competitors]] tables each need a name")

    from ml_backend.zoo import model_spec_from_table

    return (model_spec_from_table(target, path, "[target]"),
            [model_spec_from_table(c, path, f"[[competitors]] #{i + 1}") for i, c in enumerate(comps)])


def cmd_score(args: argparse.Namespace) -> int:
    from .score import score_pool

    if args.config is not None:
        if args.target or args.competitor:
            raise MadsegError("give either --config or --target/--competitor, not both")
        target, comps = read_models_config(args.config)
    else:
        if not args.target:
            raise MadsegError("give the target model (--target SPEC) or a --config TOML")
        target = ModelSpec.parse(args.target)
        comps = [ModelSpec.parse(c) for c in args.competitor]
    if not comps:
        raise MadsegError("give at least one competitor model (--competitor SPEC)")
    stats = score_pool(
        args.pool, target, comps, args.store, batch_size=args.batch_size, workers=args.workers,
        device=args.device, resolution=args.resolution, progress=not args.no_progress,
        fetch_timeout=args.timeout,
    )
    if stats.report:  # rank 0 only
        if args.json:
            print(json.dumps(stats.as_dict(), indent=2))
        else:
            ran = ", ".join(f"{v}: {n}" for v, n in stats.inferred.items()) or "nothing new"
            print(
                f"scored {stats.images} images ({stats.paths} paths, {stats.duplicates} duplicates, "
                f"{stats.bad} bad, {stats.unreadable} unreadable, {stats.converted} converted) in "
                f"{stats.seconds:.1f}s; models run: {ran}\nstore: {args.store}  report: {stats.report}"
            )
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from . import candidates as cand

    summary_path = args.summary or args.out.with_name(args.out.name.removesuffix(".jsonl") + ".summary.json")
    if args.method == "mad":
        inp = cand.load_selection_inputs(
            args.store, args.target_version, args.competitor_version, args.metric
        )
        if args.n3 < 1:
            raise MadsegError(f"--n3 must be >= 1, got {args.n3}")
        s0 = None
        if args.bounds_from is not None:
            s0 = cand.folder_area_fractions(args.bounds_from, len(inp.class_names))
        sel = cand.mad_candidates(
            args.store, inp, n3=args.n3, bounds=args.bounds, s0_fractions=s0,
            bounds_method=args.bounds_method, min_count=args.min_occurrences, order=args.order,
            rating_budget=args.budget,
        )
        result = sel.candidates
        summary = cand.summarize(
            result, "mad", pool_size=int(inp.ids.size), n3=args.n3, competitor_names=inp.competitor_names,
            class_names=inp.class_names, bounds=sel.bounds, metric=args.metric,
            target_version=inp.target_version, competitor_versions=inp.competitor_versions,
        )
        summary.update(sel.info())
    else:
        n = args.n
        if n is None:
            raise MadsegError(f"--method {args.method} needs --n (how many images to select)")
        inp = cand.target_pool(args.store, args.target_version)
        if args.method == "entropy":
            result = cand.entropy_candidates(args.store, n, inputs=inp)
        else:
            result = cand.random_candidates(args.store, n, args.seed, inputs=inp)
        summary = cand.summarize(result, args.method, pool_size=int(inp.ids.size),
                                 target_version=inp.target_version)
    cand.write_candidates(args.out, result)
    cand.write_summary(summary_path, summary)
    print(cand.format_summary(summary))
    print(f"candidates: {args.out}  summary: {summary_path}", file=sys.stderr)
    return 0
