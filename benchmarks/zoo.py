"""Throughput of the model zoo: inference images/s of every shared model at its native input size
(batch 1 and batch 8, ``SegmentationModel.forward`` on a preprocessed batch), and training
images/s of ESPNetv2 s=2.0 at 384x384 (SGD steps of 2 new + 2 replay images, as fine-tuning does).

Also ONNX Runtime next to torch: the ESPNetv2 checkpoint named by ``--onnx`` (default s=2.0 @384,
the demo's target) is exported with ``torch.onnx`` (dynamic batch) into a temp folder and both
run at batch 1 and 8 with the same number of threads (``--onnx none`` skips it).

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


def onnx_rows(checkpoint: Path, device: str | None, iters: int) -> list[dict[str, object]]:
    """Torch module vs its ONNX export (ONNX Runtime, same thread count): rows like the main table,
    plus the largest logit difference on one random batch."""
    import tempfile

    import numpy as np

    torch_model = load_model("espnetv2", checkpoint, device=device)
    assert isinstance(torch_model, TorchSegmentationModel) and torch_model.module is not None
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{checkpoint.stem}.onnx"
        net = copy.deepcopy(torch_model.module).cpu().eval()
        t0 = time.perf_counter()
        example = (torch.zeros(2, 3, *torch_model.input_size),)
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.onnx.export(net, example, str(path), input_names=["image"], output_names=["logits"],
                          dynamo=True, verbose=False, dynamic_shapes=({0: batch},))
        export_s = time.perf_counter() - t0
        onnx_model = load_model("onnx", path, device=device, num_threads=torch.get_num_threads())
        x = torch.randn(2, 3, *torch_model.input_size)
        with torch.no_grad():
            ref = net(x).numpy()
        diff = float(np.abs(onnx_model.run_raw(x) - ref).max())
        ort_label = f"onnxruntime ({onnx_model.providers[0]})"
        for label, model in (("torch", torch_model), (ort_label, onnx_model)):
            rows.append({"model": f"{checkpoint.stem} [{label}]",
                         "input": f"{model.input_size[0]}x{model.input_size[1]}",
                         "batch1_img_s": inference_rate(model, 1, iters),
                         "batch8_img_s": inference_rate(model, 8, max(1, iters // 2 + 1)),
                         "device": str(model.device), "max_logit_diff": diff, "export_s": export_s})
            r = rows[-1]
            print(f"  {r['model']}: {r['batch1_img_s']:.2f} / {r['batch8_img_s']:.2f} img/s", file=sys.stderr,
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--models", default=None,
                    help="comma-separated substrings selecting shared models (none = skip the table)")
    ap.add_argument("--no-training", action="store_true", help="skip the training-speed figure")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations, batch 1 (batch 8: 1 + iters//2)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--onnx", default="espnetv2_s_2.0_pascal_384x384",
                    help="shared ESPNetv2 checkpoint (stem) to compare with its ONNX export; none = skip")
    args = ap.parse_args(argv)

    if args.models == "none":
        specs = []
    else:
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

    onnx_cmp: list[dict[str, object]] = []
    if args.onnx.lower() != "none":
        ckpt = next((Path(s.checkpoint) for s in shared_model_specs()
                     if s.checkpoint and Path(s.checkpoint).stem == args.onnx), None)
        if ckpt is None:
            ap.error(f"--onnx {args.onnx}: no shared checkpoint with that name")
        onnx_cmp = onnx_rows(ckpt, args.device, args.iters)

    esp = load_model("espnetv2", scale=2.0, input_size=384, device=args.device,
                     **({"bf16": True} if args.bf16 else {}))
    assert isinstance(esp, TorchSegmentationModel)
    train = float("nan") if args.no_training else training_rate(esp, 2, 2, args.iters)
    total = time.perf_counter() - t_start

    dev = rows[0]["device"] if rows else str(esp.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nDevice: {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{platform.processor() or platform.machine()}; load average {load:.1f}; {total:.0f} s in all.\n")
    print("| model | input | batch 1 img/s | batch 8 img/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['batch1_img_s']:.2f} | {r['batch8_img_s']:.2f} |")
    if onnx_cmp:
        print(f"\nONNX Runtime vs torch (export {onnx_cmp[0]['export_s']:.0f} s; max |logit difference| "
              f"{onnx_cmp[0]['max_logit_diff']:.1e}):\n")
        print("| model | input | batch 1 img/s | batch 8 img/s |")
        print("|---|---|---|---|")
        for r in onnx_cmp:
            print(f"| {r['model']} | {r['input']} | {r['batch1_img_s']:.2f} | {r['batch8_img_s']:.2f} |")
    if not args.no_training:
        print(f"\nTraining ESPNetv2 s=2.0 at 384x384 (SGD, batch 2 new + 2 replay): {train:.2f} img/s "
              f"({4 / train:.2f} s per step)")
    if args.json:
        Path(args.json).write_text(json.dumps({"inference": rows, "onnx": onnx_cmp, "training_img_s": train,
                                               "device": dev, "load_average": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
