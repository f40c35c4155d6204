"""``madseg models``, ``madseg selfcheck`` and ``madseg finetune``: the model zoo on the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .errors import MadsegError

DEFAULT_SELFCHECK_OUT = "runs/selfcheck/selfcheck.json"


def _parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, JSON value or the raw string)."""
    if "=" not in text:
        raise MadsegError(f"--option {text!r}: expected KEY=VALUE, e.g. scale=2.0 or input_size=384")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _lrs(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MadsegError(
            f"--lr {text!r}: expected a number or a comma-separated list (1e-5,5e-5,1e-4)"
        ) from None
    if not vals:
        raise MadsegError("--lr: no learning rate given")
    return vals


def cmd_models(args: argparse.Namespace) -> int:
    """Print the zoo's entries and the shared checkpoints found."""
    from .zoo import list_models

    entries = list_models()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        train = "trainable" if e["trainable"] else "inference only"
        print(f"{e['name']}  [{e['kind']}, {train}]")
        print(f"    {e['description']}")
        print(f"    options: {e['options']}")
        if e.get("example"):
            print(f"    example: {e['example']}")
        for ck in e["checkpoints"]:
            print(f"    checkpoint: {ck}")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    """Predict the shared labelled sets with every shared model and print the mIoU table."""
    from .selfcheck import format_table, run_selfcheck, select_specs
    from .zoo import shared_model_specs

    specs = select_specs(shared_model_specs(), args.models.split(",") if args.models else None)
    rows = run_selfcheck(
        specs,
        args.datasets.split(","),
        device=args.device,
        limit=args.limit,
        batch_size=args.batch_size,
        out=args.out,
        fresh=args.fresh,
        progress=not args.no_progress,
    )
    print(format_table(rows))
    print(f"\nresults: {Path(args.out).resolve()}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a zoo model on a labelled folder (resumable; re-run the same command after a crash)."""
    from .datasets import LabelledFolder
    from .finetune import finetune, preset_config
    from .zoo import load_model

    options = dict(_parse_option(o) for o in args.option or [])
    if args.bf16:
        options["bf16"] = True
    model = load_model(args.model, args.checkpoint, device=args.device, **options)
    # The preset's values (ml_backend.finetune.PRESETS) unless a flag is given explicitly.
    given = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lrs": _lrs(args.lr) if args.lr else None,
        "lwf_weight": args.lwf_weight, "lwf_temperature": args.lwf_temperature,
        "clip_grad_norm": args.clip_grad_norm, "encoder_lr_mult": args.encoder_lr_mult,
        "sampling": args.sampling, "l2sp_weight": args.l2sp_weight, "ema_decay": args.ema_decay,
        "scale_range": tuple(args.scale_range) if args.scale_range else None,
        "crop_size": (args.crop_size, args.crop_size) if args.crop_size else None,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.steps is not None:
        overrides["steps"] = args.steps
    elif args.epochs is not None:
        overrides["steps"] = None  # explicit epochs replace the preset's step count
    if args.train_bn:
        overrides["freeze_bn"] = False
    if args.no_clip:
        overrides["clip_grad_norm"] = None
    cfg = preset_config(args.preset, seed=args.seed, num_workers=args.workers, **overrides)
    res = finetune(
        model,
        LabelledFolder(args.train, args.train_subset),
        args.out,
        replay=LabelledFolder(args.replay, args.replay_subset) if args.replay else None,
        val=LabelledFolder(args.val, args.val_subset) if args.val else None,
        unlabelled=args.unlabelled,
        config=cfg,
        progress=not args.no_progress,
    )
    val = f"{res.val_miou:.4f}" if res.val_miou is not None else "n/a (no --val)"
    print(f"parent version: {model.version}")
    print(f"new version:    {res.version}")
    print(f"chosen lr:      {res.lr:g}    val mIoU: {val}")
    print(f"checkpoint:     {res.checkpoint}  (sidecar {res.sidecar.name})")
    opts = " ".join(
        f"--option {k}={json.dumps(v, separators=(',', ':'))}" for k, v in res.spec.options.items()
    )
    print(f"load it with:   madseg ... --model {res.spec.name} --checkpoint {res.checkpoint} {opts}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models``, ``selfcheck`` and ``finetune`` to the ``madseg`` CLI."""
    p = subparsers.add_parser("models", help="list the model zoo's entries and the shared checkpoints found")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser(
        "selfcheck",
        help="predict ../shared/data/{coco_voc,voc_samples} with every shared model; print per-model mIoU",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of each set")
    p.add_argument("--models", default=None,
                   help="comma-separated substrings selecting models (e.g. espnetv2_s_2.0,tflite)")
    p.add_argument("--datasets", default="coco_voc,voc_samples", help="comma-separated shared labelled sets")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=DEFAULT_SELFCHECK_OUT, help="JSON results (reused on a rerun)")
    p.add_argument("--fresh", action="store_true", help="ignore results of a previous run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_selfcheck)

    p = subparsers.add_parser("finetune", help="fine-tune a zoo model on labelled images (resumable)")
    p.add_argument("--model", required=True, help="zoo name: espnetv2, dicenet, torchvision:<builder>")
    p.add_argument("--checkpoint", default=None, help="weights file (default: the entry's standard weights)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="model option, e.g. scale=2.0 (repeat)")
    p.add_argument("--train", required=True, help="labelled folder (images/ + masks/) with the new pairs")
    p.add_argument("--train-subset", default=None, help="half0 or half1 of --train")
    p.add_argument("--replay", default=None, help="labelled folder of the original training set S(0)")
    p.add_argument("--replay-subset", default=None)
    p.add_argument("--val", default=None, help="labelled folder T(0) choosing the learning rate")
    p.add_argument("--val-subset", default=None)
    p.add_argument("--unlabelled", default=None, help="folder of unlabelled images for LwF distillation")
    p.add_argument("--out", required=True, help="output folder (checkpoints, sidecar, resumable state)")
    p.add_argument("--preset", default="demo", choices=("demo", "paper"),
                   help="recipe the other flags override (ml_backend.finetune.PRESETS; default demo: the "
                        "benchmark-chosen defaults; paper: 80 epochs, LR grid 1e-5,5e-5,1e-4, scale 0.5-2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    p.add_argument("--steps", type=int, default=None,
                   help="SGD steps, replacing --epochs (default: the preset's; demo: 40)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", default=None,
                   help="learning rate or comma-separated grid chosen on --val (default: the preset's)")
    p.add_argument("--lwf-weight", type=float, default=None,
                   help="weight of the LwF term (with --unlabelled)")
    p.add_argument("--lwf-temperature", type=float, default=None)
    p.add_argument("--clip-grad-norm", type=float, default=None, help="global gradient-norm clip")
    p.add_argument("--no-clip", action="store_true", help="no gradient clipping")
    p.add_argument("--encoder-lr-mult", type=float, default=None,
                   help="LR multiplier of the encoder (0 = train only the decoder/classifier)")
    p.add_argument("--sampling", choices=("uniform", "balanced"), default=None,
                   help="balanced: draw new pairs by the rarity of their classes")
    p.add_argument("--l2sp-weight", type=float, default=None, help="L2-SP: decay towards the parent weights")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights (0 = off)")
    p.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random scale augmentation range")
    p.add_argument("--crop-size", type=int, default=None,
                   help="training crop side (default: model input size)")
    p.add_argument("--train-bn", action="store_true", help="update BatchNorm statistics (default: frozen)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)
