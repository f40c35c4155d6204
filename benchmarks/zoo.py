"""Throughput of the model zoo: inference images/s of every shared model at its native input size
(batch 1 and batch 8, ``SegmentationModel.forward`` on a preprocessed batch), and training
images/s of ESPNetv2 s=2.0 at 384x384 (SGD steps of 2 new + 2 replay images, as fine-tuning does).

Prints a markdown table. Usage: ``python benchmarks/zoo.py [--device cpu] [--models s_2.0,tflite]``.
A few iterations after one warm-up each keep the whole run to a few minutes on 2 CPU cores.
"""

# ruff: noqa: E402  (the path fix below must run before the other imports)
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ml_backend.finetune import segmentation_loss
from ml_backend.selfcheck import model_label, select_specs
from ml_backend.zoo import TorchSegmentationModel, load_model, shared_model_specs


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def inference_rate(model, batch_size: int, iters: int) -> float:
    """Images/s of ``model.forward`` on a random normalised batch at the model's input size."""
    x = torch.randn(batch_size, 3, *model.input_size)

    def run() -> None:
        model.forward(x)
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    return batch_size / _time(run, iters)


def training_rate(model: TorchSegmentationModel, new: int, replay: int, iters: int) -> float:
    """Images/s of SGD steps (forward, loss, backward, update) on batches of new + replay images."""
    assert model.module is not None
    net = copy.deepcopy(model.module).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-5, momentum=0.9, weight_decay=5e-4)
    b = new + replay
    x = torch.randn(b, 3, *model.input_size)
    y = torch.randint(0, model.num_classes, (b, *model.input_size))

    def step() -> None:
        with model.autocast():
            logits = net(model.prepare_input(x))
        loss = segmentation_loss(logits, y.to(model.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    return b / _time(step, iters)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--models", default=None, help="comma-separated substrings selecting shared models")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations, batch 1 (batch 8: 1 + iters//2)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    specs = select_specs(shared_model_specs(), args.models.split(",") if args.models else None)
    rows = []
    t_start = time.perf_counter()
    for spec in specs:
        opts = {"bf16": True} if args.bf16 and spec.name != "tflite" else {}
        model = load_model(spec.name, spec.checkpoint, device=args.device, **dict(spec.options), **opts)
        r1 = inference_rate(model, 1, args.iters)
        r8 = inference_rate(model, 8, max(1, args.iters // 2 + 1))
        rows.append({"model": model_label(spec), "input": f"{model.input_size[0]}x{model.input_size[1]}",
                     "batch1_img_s": r1, "batch8_img_s": r8, "device": str(model.device)})
        print(f"  {rows[-1]['model']}: {r1:.2f} / {r8:.2f} img/s", file=sys.stderr, flush=True)
        del model

    esp = load_model("espnetv2", scale=2.0, input_size=384, device=args.device,
                     **({"bf16": True} if args.bf16 else {}))
    assert isinstance(esp, TorchSegmentationModel)
    train = training_rate(esp, 2, 2, args.iters)
    total = time.perf_counter() - t_start

    dev = rows[0]["device"] if rows else str(esp.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nDevice: {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{platform.processor() or platform.machine()}; load average {load:.1f}; {total:.0f} s in all.\n")
    print("| model | input | batch 1 img/s | batch 8 img/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['batch1_img_s']:.2f} | {r['batch8_img_s']:.2f} |")
    print(f"\nTraining ESPNetv2 s=2.0 at 384x384 (SGD, batch 2 new + 2 replay): {train:.2f} img/s "
          f"({4 / train:.2f} s per step)")
    if args.json:
        Path(args.json).write_text(json.dumps({"inference": rows, "training_img_s": train,
                                               "device": dev, "load_average": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
