"""Efficacy of madseg on a labelled pool: does selection find the target's failures, and does
fine-tuning on them fix them? Repeated draws, usable on any labelled pool.

    .venv/bin/python benchmarks/efficacy.py [--pool IMAGES --gt MASKS] [--s0 FOLDER] [--json OUT]
                                            [--part selection|finetune|all] [--subpools 30]
                                            [--subpool-size N | --subpool-fraction 0.75]
                                            [--bounds auto|s0|pool|none] [--cache DIR] [--device cpu]

Defaults: pool = the shared ``coco_voc`` (images/ and masks/), S(0) = the shared
``voc2012/train`` (size bounds), the target and competitors, n3 and the rater model of the demo
config (``projects/templates/demo.toml``: ESPNetv2 s=2.0 @384 against DiCENet s=1.75, the TFLite
DeepLabV3 and ESPNetv2 s=1.0; 3 raters, noise 0.1).

The pool is scored once into a cache outside the repository (``$MADSEG_CACHE/efficacy`` or
``~/.cache/madseg/efficacy``, keyed by the pool folder; the score store keys by model version),
together with the target's per-image GT mIoU at the original size; later runs only load it.

``--part selection`` (``benchmarks.efficacy_selection``): MAD + rating, MAD alone, entropy and
random at n in {10, 20, 40}, and MAD's first R / entropy's top R / R random at equal rating budgets
R in {|M|, pool/2, pool/4}, over ``--subpools`` random sub-pools; tables with mean ± std and win
counts, and the issue's targets checked. ``--part finetune`` runs ``benchmarks.efficacy_finetune``
(its own options are added below when the module is present); ``all`` runs both.
``--json OUT`` writes every figure.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ml_backend.errors import MadsegError  # noqa: E402

FINETUNE_MODULE = "benchmarks.efficacy_finetune"


def _finetune_module() -> Any | None:
    """``benchmarks.efficacy_finetune`` if it exists (imported lazily; it brings its own options)."""
    if importlib.util.find_spec(FINETUNE_MODULE) is None:
        return None
    return importlib.import_module(FINETUNE_MODULE)


def build_parser() -> argparse.ArgumentParser:
    from ml_backend.shared import shared_dir

    shared = shared_dir(required=False)
    data = (shared / "data") if shared else Path("data")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 conflict_handler="resolve")  # a part may re-declare a shared option
    ap.add_argument("--pool", type=Path, default=data / "coco_voc" / "images", help="folder of pool images")
    ap.add_argument("--gt", type=Path, default=None,
                    help="folder of the pool's ground-truth masks (<stem>.png; default: <pool>/../masks)")
    ap.add_argument("--s0", type=Path, default=data / "voc2012" / "train",
                    help="labelled folder (masks/) for the S(0) size bounds")
    ap.add_argument("--config", type=Path, default=ROOT / "projects" / "templates" / "demo.toml",
                    help="experiment config giving the models, n3 and the rater model")
    ap.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    ap.add_argument("--part", choices=("selection", "finetune", "all"), default="selection")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache folder (default $MADSEG_CACHE/efficacy or ~/.cache/madseg/efficacy)")
    ap.add_argument("--device", default=None, help="torch device for the one-time scoring")
    ap.add_argument("--cached-only", action="store_true",
                    help="score nothing: use the pool images an earlier (interrupted) run already scored")
    sel = ap.add_argument_group("selection")
    sel.add_argument("--subpools", type=int, default=30, help="random sub-pools (default 30)")
    sel.add_argument("--subpool-size", type=int, default=None, help="images per sub-pool")
    sel.add_argument("--subpool-fraction", type=float, default=0.75,
                     help="sub-pool size as a share of the pool when --subpool-size is not given (0.75)")
    sel.add_argument("--bounds", choices=("auto", "s0", "pool", "none"), default=None,
                     help="size-bound rule (default: the config's [selection] bounds)")
    sel.add_argument("--order", choices=("failures", "rank"), default=None,
                     help="order of M for the raters (default: the config's [selection] order)")
    sel.add_argument("--half", type=int, choices=(0, 1), default=None,
                     help="use only half the pool: the images whose crc32(file stem) %% 2 equals this "
                          "(the design was chosen on half 0 of coco_voc, the development split)")
    sel.add_argument("--variants", action="store_true",
                     help="also run the paper's order (rank), the paper's bounds rule (s0) with its order, "
                          "and bounds from the pool's predictions only, on the same sub-pools")
    sel.add_argument("--n", type=int, nargs="+", default=[10, 20, 40], help="images kept (10 20 40)")
    ft = _finetune_module()
    if ft is not None:
        ft.add_arguments(ap.add_argument_group("finetune"))
    return ap


def run_selection_part(args: argparse.Namespace, exp: Any) -> dict[str, Any]:
    from benchmarks.efficacy_pool import prepare_pool
    from benchmarks.efficacy_selection import (
        SelectionSettings,
        ceiling_gaps,
        format_ceiling,
        format_tables,
        format_targets,
        run_selection,
        s0_area_fractions,
        targets,
    )

    pool = Path(args.pool)
    gt = Path(args.gt) if args.gt else pool.parent / "masks"
    t0 = time.perf_counter()
    print(f"scoring {pool} once (cached) ...", flush=True)
    data = prepare_pool(pool, gt, exp.target.model_spec(), [c.model_spec() for c in exp.competitors],
                        args.cache, device=args.device, cached_only=args.cached_only)
    t_prep = time.perf_counter() - t0
    s0 = s0_area_fractions(Path(args.s0), len(data.class_names)) if args.s0 else None
    universe = np.arange(len(data.ids))
    if args.half is not None:
        universe = np.flatnonzero([zlib.crc32(s.encode("utf-8")) % 2 == args.half for s in data.stems])
    n_pool = int(universe.size)
    size = args.subpool_size or int(round(args.subpool_fraction * n_pool))
    if not 1 <= size <= n_pool:
        raise MadsegError(f"--subpool-size {size}: must be between 1 and the pool's {n_pool} images")
    if args.subpools < 1:
        raise MadsegError(f"--subpools {args.subpools}: must be >= 1")
    o = exp.oracle
    st = SelectionSettings(n3=exp.selection.n3, bounds=args.bounds or exp.selection.bounds,
                           bounds_method=exp.selection.bounds_method, min_count=exp.selection.min_count,
                           order=args.order or exp.selection.order, ns=tuple(args.n),
                           subpools=args.subpools, subpool_size=size,
                           raters=exp.label_studio.raters_per_task, noise=o.noise,
                           thresholds=tuple(o.thresholds))
    agg = run_selection(data, s0, st, universe=universe)
    tg = targets(agg, [n for n in (10, 20) if n in args.n])
    title = (f"{args.pool} ({n_pool} images; target {exp.target.key}; competitors "
             f"{', '.join(c.key for c in exp.competitors)}; n3 = {st.n3}; bounds {st.bounds}; "
             f"S(0) {args.s0}; order {st.order})")
    print()
    print(format_tables(agg, st.ns, title))
    print(format_targets(tg))
    gaps = ceiling_gaps(agg, [n for n in (10, 20) if n in args.n])
    print(format_ceiling(gaps))
    variants: dict[str, Any] = {}
    if args.variants:
        from dataclasses import replace

        for name, change in (("order rank (the paper's order)", {"order": "rank"}),
                             ("bounds s0 + order rank (the paper's rule and order)",
                              {"bounds": "s0", "order": "rank"}),
                             ("bounds pool (the pool's predictions only)", {"bounds": "pool"})):
            vst = replace(st, **change)
            if vst == st:
                continue
            vagg = run_selection(data, s0, vst, universe=universe)
            print(format_tables(vagg, vst.ns, f"variant: {name}"))
            print(format_targets(targets(vagg, [n for n in (10, 20) if n in args.n])))
            variants[name] = {"settings": dict(change), "results": vagg,
                              "targets": targets(vagg, [n for n in (10, 20) if n in args.n])}
    print(f"wall time: scoring + GT mIoU {t_prep:.1f} s (first run: scoring {data.scoring_seconds:.1f} s, "
          f"GT mIoU {data.gt_seconds:.1f} s); ratings {agg['seconds']['ratings']:.2f} s; "
          f"{st.subpools} sub-pools {agg['seconds']['selections']:.2f} s", flush=True)
    scoring_s = round(data.scoring_seconds, 2) if data.scoring_seconds == data.scoring_seconds else None
    return {"pool": str(args.pool), "gt": str(gt), "s0": str(args.s0) if args.s0 else None,
            "pool_size": n_pool, "target": exp.target.key, "competitors": [c.key for c in exp.competitors],
            "target_version": data.target_version, "competitor_versions": data.competitor_versions,
            "settings": {**st.__dict__, "ns": list(st.ns), "thresholds": list(st.thresholds)},
            "pool_gt_miou_mean": round(float(data.gt_miou.mean()), 4),
            "pool_share_below_0.5": round(float((data.gt_miou < 0.5).mean()), 4),
            "pool_ood": int(data.ood.sum()), "results": agg, "targets": tg, "ceiling": gaps,
            "variants": variants,
            "wall_seconds": {"prepare": round(t_prep, 2), "scoring_first_run": scoring_s,
                             "gt_miou_first_run": round(data.gt_seconds, 2), **agg["seconds"]}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from projects.experiment import load_experiment

    exp = load_experiment(args.config)
    out: dict[str, Any] = {}
    if args.json and Path(args.json).is_file():  # one file collects the runs of several pools
        out = json.loads(Path(args.json).read_text(encoding="utf-8"))
    if args.part in ("selection", "all"):
        key = f"{pool_key(Path(args.pool))}, S(0) {pool_key(Path(args.s0)) if args.s0 else 'none'}"
        if args.half is not None:
            key += f", half {args.half}"
        out.setdefault("selection", {})[key] = run_selection_part(args, exp)
    if args.part in ("finetune", "all"):
        ft = _finetune_module()
        if ft is None:
            raise MadsegError(f"--part {args.part}: {FINETUNE_MODULE} is not available in this checkout")
        ft_args = copy.copy(args)  # the fine-tune part keeps its own (incremental) JSON file
        ft_args.json = (Path(args.json).with_name(Path(args.json).stem + "_finetune.json") if args.json
                        else ROOT / "benchmarks" / "results" / "efficacy_finetune.json")
        out["finetune"] = ft.run(ft_args)
    if args.json:
        from ml_backend.atomic import atomic_write_json

        atomic_write_json(args.json, out)
        print(f"written to {args.json}")
    return 0


def pool_key(pool: Path) -> str:
    """The pool's name in the JSON: its folder relative to the shared data (``coco_voc``,
    ``voc2012/val``), without a trailing ``images``."""
    from ml_backend.shared import shared_dir

    folder = pool.parent if pool.name == "images" else pool
    shared = shared_dir(required=False)
    try:
        return str(folder.resolve().relative_to((shared / "data").resolve())) if shared else str(folder)
    except ValueError:
        return str(folder)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(main())
    except MadsegError as exc:
        print(f"efficacy: error: {exc}", file=sys.stderr)
        sys.exit(2)
