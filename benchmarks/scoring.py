"""Benchmark of the sampler's scoring pipeline, measured in one run on this machine.

Prints four figures:

1. scoring throughput through ``score_pool`` (what ``madseg score`` runs: read + hash + decode +
   resize in DataLoader workers, inference, areas, entropy, distances, PNG maps, SQLite) divided
   by the bare forward-pass throughput of the same models on pre-decoded, pre-resized tensors of
   the same size and batch (target >= 0.90), with the default number of DataLoader workers
   (``auto_workers``: 0 on a 2-core machine, where decoding on the cores that run the forward pass
   costs more than it saves) and, for comparison, with 2 workers. Each repeat runs bare, pipeline
   and re-score back to back; the figures are medians of the per-repeat ratios (shared machine);
2. re-scoring the pool for a new target version (a perturbed copy of the target's checkpoint)
   divided by the first scoring with target + m competitors (target <= 1/(m+1) + 0.05). The bound
   assumes models of similar cost, so the defaults are three CPU models of similar cost
   (ESPNetv2 s=2.0 as the target, DiCENet s=1.75 and ESPNetv2 s=1.5 as competitors, all at
   384x384); the target's measured share of the bare forward time is printed as the reference;
3. peak RSS of ``madseg score`` on the pool list repeated 5 times divided by the list once, each in
   its own subprocess on a fresh store (target <= 1.10): the main process and the largest worker;
4. ``mad_select`` on N = 1e6 synthetic images, m = 5, C = 21: seconds.

    .venv/bin/python benchmarks/scoring.py [--images 24] [--batch-size 8] [--workers 2]
        [--target SPEC] [--competitor SPEC ...] [--repeats 3]
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent

DEFAULT_TARGET = "espnetv2,scale=2.0,input_size=384"
DEFAULT_COMPETITORS = ["dicenet,scale=1.75,input_size=384", "espnetv2,scale=1.5,input_size=384"]


def _pool_list(folder: Path, n: int, repeat: int = 1) -> Path:
    from ml_backend.shared import shared_dir

    imgs = sorted((shared_dir() / "data" / "coco_voc" / "images").glob("*.jpg"))[:n]
    lst = folder / f"pool_x{repeat}.txt"
    lst.write_text("\n".join(str(p) for p in imgs * repeat) + "\n")
    return lst


def bare_forward_seconds(models: list, images: list, batch_size: int) -> float:
    """Seconds to run every model over pre-decoded, preprocessed batches (inputs built beforehand)."""
    import torch

    total = 0.0
    for m in models:
        prep = m.preprocessor()
        batches = [torch.stack([prep(im) for im in images[i:i + batch_size]])
                   for i in range(0, len(images), batch_size)]
        t0 = time.perf_counter()
        for b in batches:
            m.forward(b)
        total += time.perf_counter() - t0
    return total


def _perturbed_checkpoint(model, folder: Path) -> str:
    import torch

    sd = torch.load(model.checkpoint, map_location="cpu")
    key = [k for k, v in sd.items() if v.dtype.is_floating_point][-1]
    sd[key] = sd[key] + 0.01
    path = folder / f"finetuned_{len(list(folder.glob('finetuned_*')))}.pth"
    torch.save(sd, path)
    return str(path)


def _rss_child(args: argparse.Namespace) -> None:
    """Subprocess entry: score ``args.rss_child`` into a fresh store, print peak RSS (KiB) as JSON."""
    import resource

    from sampler.score import auto_workers, score_pool

    workers = args.workers if args.workers is not None else auto_workers("cpu")
    stats = score_pool([args.rss_child], args.target, args.competitor, args.rss_store,
                       batch_size=args.batch_size, workers=workers, progress=False)
    print(json.dumps({
        "main_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "entries": stats.entries, "images": stats.images, "workers": workers,
    }))


def _rss_run(args: argparse.Namespace, lst: Path, store: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(lst), "--rss-store", str(store),
           "--batch-size", str(args.batch_size), "--target", args.target]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    for c in args.competitor:
        cmd += ["--competitor", c]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"RSS subprocess failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _time_mad_select() -> float:
    spec = importlib.util.spec_from_file_location("madseg_bench_select", _HERE / "selection.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.time_mad_select(repeats=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="default: sampler.score.auto_workers()")
    ap.add_argument("--overlap-workers", type=int, default=2,
                    help="also measure the pipeline with this many workers (0: skip)")
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--competitor", action="append", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.competitor = args.competitor or list(DEFAULT_COMPETITORS)
    if args.rss_child:
        _rss_child(args)
        return

    import torch

    from ml_backend.imageio import read_rgb
    from ml_backend.zoo import ModelSpec, load_model_spec
    from sampler.score import score_pool

    m = len(args.competitor)
    tmp = Path(tempfile.mkdtemp(prefix="madseg-bench-scoring-"))
    try:
        lst = _pool_list(tmp, args.images)
        paths = lst.read_text().split()
        target = load_model_spec(ModelSpec.parse(args.target), "cpu")
        comps = [load_model_spec(ModelSpec.parse(c), "cpu") for c in args.competitor]
        models = [target, *comps]
        print(f"pool: {len(paths)} COCO images; batch {args.batch_size}; "
              f"{args.workers if args.workers is not None else 'auto'} workers; "
              f"torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; load average "
              + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
        print("models: " + ", ".join(f"{x.version} @{x.input_size[0]}x{x.input_size[1]}" for x in models))
        images = [read_rgb(p) for p in paths]
        bare_model_s = {x.version: bare_forward_seconds([x], images[:args.batch_size], args.batch_size)
                        for x in models}  # warm-up and per-model cost

        from sampler.score import auto_workers

        workers = args.workers if args.workers is not None else auto_workers("cpu")
        bare, pipe, rescore, cpu_bare, cpu_pipe, overlap = [], [], [], [], [], []
        for r in range(args.repeats):
            c0 = _cpu_seconds()
            bare.append(bare_forward_seconds(models, images, args.batch_size))
            c1 = _cpu_seconds()
            store = tmp / f"store{r}"
            st = score_pool([lst], target, comps, store, batch_size=args.batch_size, workers=workers,
                            progress=False)
            c2 = _cpu_seconds()
            assert st.images == len(paths) and st.inferred[target.version] == len(paths), st
            pipe.append(st.seconds)
            cpu_bare.append(c1 - c0)
            cpu_pipe.append(c2 - c1)
            new = load_model_spec(ModelSpec.parse(
                f"{args.target},checkpoint={_perturbed_checkpoint(target, tmp)}"), "cpu")
            st2 = score_pool([lst], new, comps, store, batch_size=args.batch_size, workers=workers,
                             progress=False)
            assert st2.inferred == {new.version: len(paths)}, st2.inferred
            rescore.append(st2.seconds)
            if args.overlap_workers:
                st3 = score_pool([lst], target, comps, tmp / f"overlap{r}", batch_size=args.batch_size,
                                 workers=args.overlap_workers, progress=False)
                overlap.append(st3.seconds)
            print(f"  repeat {r + 1}: bare forward {bare[-1]:.1f}s, score {pipe[-1]:.1f}s "
                  f"({', '.join(f'{k} {v:.1f}s' for k, v in st.timings.items())}), "
                  f"re-score new target {rescore[-1]:.1f}s"
                  + (f", score with {args.overlap_workers} workers {overlap[-1]:.1f}s" if overlap else "")
                  + f"; load {os.getloadavg()[0]:.2f}", flush=True)
        n = len(paths)
        # each repeat measures bare, pipeline and re-score back to back: use the median of the
        # per-repeat ratios (robust to the load of a shared machine changing between repeats)
        thr_ratio = statistics.median(b / p for b, p in zip(bare, pipe, strict=True))
        re_ratio = statistics.median(r / p for r, p in zip(rescore, pipe, strict=True))
        cpu_ratio = statistics.median(b / p for b, p in zip(cpu_bare, cpu_pipe, strict=True))
        share = bare_model_s[target.version] / sum(bare_model_s.values())

        images.clear()
        rss1 = _rss_run(args, lst, tmp / "rss1")
        rss5 = _rss_run(args, _pool_list(tmp, args.images, repeat=5), tmp / "rss5")
        assert rss5["entries"] == 5 * rss1["entries"] and rss5["images"] == rss1["images"]
        main_ratio = rss5["main_kib"] / rss1["main_kib"]
        worker_ratio = rss5["worker_kib"] / max(rss1["worker_kib"], 1)
        sel_s = _time_mad_select()

        print()
        print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
        print(f"{'figure':58s} {'value':>10s}  target")
        print(f"{'scoring throughput / bare forward throughput':58s} {thr_ratio:10.3f}  >= 0.90"
              f"   (median of {args.repeats}; best {n / min(pipe):.2f} vs {n / min(bare):.2f} img/s; "
              f"CPU-time ratio {cpu_ratio:.3f})")
        if overlap:
            ov = statistics.median(b / p for b, p in zip(bare, overlap, strict=True))
            print(f"{f'  same with {args.overlap_workers} DataLoader workers (decode overlapping)':58s} "
                  f"{ov:10.3f}")
        print(f"{f're-score new target / first score (target + {m} competitors)':58s} {re_ratio:10.3f}  "
              f"<= {1 / (m + 1) + 0.05:.3f}   (target's share of forward time {share:.3f})")
        print(f"{'peak RSS, pool list x5 / x1 (main process)':58s} {main_ratio:10.3f}  <= 1.10"
              f"   ({rss5['main_kib'] / 1024:.0f} vs {rss1['main_kib'] / 1024:.0f} MiB)")
        if rss1["workers"]:
            print(f"{'peak RSS, pool list x5 / x1 (largest worker)':58s} {worker_ratio:10.3f}  <= 1.10"
                  f"   ({rss5['worker_kib'] / 1024:.0f} vs {rss1['worker_kib'] / 1024:.0f} MiB)")
        print(f"{'mad_select N=1e6, m=5, C=21 (s)':58s} {sel_s:10.2f}  < 5")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
