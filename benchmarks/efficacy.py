"""Efficacy of MAD on the shared data with the shared models (prints a markdown table, writes it).

    .venv/bin/python benchmarks/efficacy.py [--config projects/templates/demo.toml] [--out runs/efficacy]
                                            [--epochs N] [--random-seeds 5] [--device cpu]

Nothing is tuned to flatter the method: the pool, models, n3/n4/|T|, oracle noise and fine-tune
settings are the demo config's (``projects/templates/demo.toml``), unchanged. If MAD loses, the
table says so.

1. Failure discovery. The target f(0) and the competitors score the pool (the score store is
   shared with the demo when ``--store`` points at ``runs/demo/store``; otherwise it is built in
   ``<out>/store``). Only ``coco_voc`` images have ground truth, so the comparison is on them:
   M = the MAD candidates among the coco_voc images (bounds from the S(0) masks, the config's
   n3), n = |M|; then the top-n by the target's mean entropy, and n at random (mean ± std over
   ``--random-seeds`` seeds). Reported: mean ground-truth per-image mIoU of the target on each
   set (lower = better at exposing failures) and the share of images with mIoU < 0.5.
2. One round, simulated exactly like the demo but without Label Studio: the oracle's scores
   (``projects.oracle.simulated_scores``, the config's noise and thresholds, 3 raters) give each
   candidate a MOS (out of domain -> excluded); S(1) = the n4 lowest; a held-out test set T is
   drawn from M \\ S(1) with the test-set rules (``projects.testset``); the pixel labels of S(1)
   and T are the coco_voc ground-truth masks (what the oracle annotator submits). f(1) =
   f(0) fine-tuned on S(1) with S(0) replay (``ml_backend.finetune``, the config's preset).
   Reported: the target's mIoU on T and on T(0) before (f(0)) and after (f(1)) — the latter
   measures forgetting. The same budget spent on entropy (top-n4 in-domain by entropy) gives
   f_entropy, evaluated on the same T and T(0).
3. Wall time per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml_backend.errors import MadsegError  # noqa: E402


class Timer:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    def __call__(self, name: str):  # noqa: ANN204 - context manager
        timer = self

        class _Ctx:
            def __enter__(self) -> None:
                self.t0 = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                timer.rows.append((name, time.perf_counter() - self.t0))
                print(f"  [{name}: {timer.rows[-1][1]:.1f} s]", flush=True)

        return _Ctx()


def _link_folder(dst: Path, pairs: list[tuple[Path, Path]]) -> Path:
    """A labelled folder (images/ + masks/) of symlinks to the shared files (nothing copied)."""
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for p in (dst / sub).iterdir():
            p.unlink()
    for img, mask in pairs:
        (dst / "images" / img.name).symlink_to(img)
        (dst / "masks" / f"{img.stem}.png").symlink_to(mask)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "projects" / "templates" / "demo.toml"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "efficacy"))
    ap.add_argument("--store", default=None, help="score store to reuse (default: runs/demo/store if it "
                    "exists, else <out>/store)")
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-finetune", action="store_true", help="only the failure-discovery part")
    args = ap.parse_args(argv)

    from ml_backend.datasets import LabelledFolder
    from ml_backend.finetune import FinetuneConfig, finetune
    from ml_backend.imageio import read_mask, read_rgb
    from ml_backend.zoo import load_model_spec
    from projects.evaluation import ModelEntry, TestSet, evaluate_models
    from projects.experiment import load_experiment
    from projects.oracle import is_out_of_domain, per_image_miou, simulated_scores
    from projects.testset import choose_test_set, main_classes
    from sampler.baselines import entropy_select, random_select
    from sampler.bounds import bounds_from_masks
    from sampler.score import score_pool
    from sampler.select import mad_select, selected_images
    from sampler.store import image_paths, read_areas, read_distances

    exp = load_experiment(args.config)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo_store = ROOT / "runs" / "demo" / "store"
    store = Path(args.store) if args.store else (demo_store if demo_store.is_dir() else out / "store")
    c = exp.num_classes
    timer = Timer()
    gt_dir = Path(exp.oracle.gt[0]) if exp.oracle.gt else None
    if gt_dir is None:
        raise MadsegError(f"{args.config}: [oracle] gt must name the ground-truth masks folder")
    coco_images = gt_dir.parent / "images"

    # ---- scoring (cached in the store) ---------------------------------------------------------
    print(f"scoring the pool into {store} (cached) ...", flush=True)
    sources = [*map(str, exp.pool.folders), *map(str, exp.pool.lists)]
    with timer("score pool (f(0) + competitors)"):
        stats = score_pool(sources, exp.target.spec(), [m.spec() for m in exp.competitors], store,
                           device=args.device, resolution=exp.selection.working_size, workers=2)
    tv = stats.target_version
    ids, t_areas, ent = read_areas(store, tv)
    ids = ids.tolist()
    paths = image_paths(store, ids)
    coco = [k for k, p in enumerate(paths) if p and Path(p).parent == coco_images]
    if not coco:
        raise MadsegError(f"no pool image lies in {coco_images}; the benchmark needs the coco_voc images")
    sub_ids = [ids[k] for k in coco]
    sub_paths = [Path(paths[k]) for k in coco]
    comp_areas, dists = [], []
    for cv in stats.competitor_versions:
        cids, ca, _ = read_areas(store, cv)
        did, d = read_distances(store, tv, cv, exp.selection.metric)
        ca_map = dict(zip(cids.tolist(), ca, strict=True))
        d_map = dict(zip(did.tolist(), d.tolist(), strict=True))
        comp_areas.append(np.stack([ca_map[k] for k in sub_ids]))
        dists.append(np.array([d_map[k] for k in sub_ids]))
    ta, ea = t_areas[coco], ent[coco]

    # ---- ground-truth per-image mIoU of f(0) on coco_voc (cached) ------------------------------
    cache = out / f"gt_miou_{tv}.json"
    gt_miou: dict[str, float] = json.loads(cache.read_text()) if cache.exists() else {}
    with timer("f(0) per-image GT mIoU on coco_voc"):
        todo = [(k, p) for k, p in zip(sub_ids, sub_paths, strict=True) if k not in gt_miou]
        if todo:
            model = load_model_spec(exp.target.spec(), device=args.device)
            for k, p in todo:
                pred = model.predict([read_rgb(p)])[0]
                gt = read_mask(gt_dir / f"{p.stem}.png", c)
                gt_miou[k] = per_image_miou(pred, gt, c)
            cache.write_text(json.dumps(gt_miou))
    q = np.array([gt_miou[k] for k in sub_ids])

    # ---- failure discovery ---------------------------------------------------------------------
    with timer("MAD / entropy / random selection"):
        bounds = bounds_from_masks((read_mask(m, c) for _, m in exp.s0.open().pairs), c, exp.selection.bounds)
        recs = mad_select(ta, np.stack(comp_areas), np.stack(dists), bounds, exp.selection.n3)
        mad = selected_images(recs)
        n = len(mad)
        ent_idx = entropy_select(ea, n)
        rnd = [random_select(len(sub_ids), n, seed=s) for s in range(args.random_seeds)]

    def stats_of(idx: np.ndarray) -> tuple[float, float]:
        return float(q[idx].mean()), float((q[idx] < 0.5).mean())

    rows = [("MAD", *stats_of(mad)), ("entropy", *stats_of(ent_idx))]
    rnd_stats = np.array([stats_of(r) for r in rnd])
    lines = ["## Failure discovery (coco_voc pool images with ground truth)", "",
             f"Target {exp.target.key}; competitors {', '.join(m.key for m in exp.competitors)}; "
             f"n3 = {exp.selection.n3}; n = |M| = {n} of {len(sub_ids)} images. "
             "Lower mIoU = better at exposing failures.", "",
             "| selection | n | mean GT mIoU of f(0) | share with mIoU < 0.5 |", "|---|---|---|---|"]
    for name, m, s in rows:
        lines.append(f"| {name} | {n} | {100 * m:.1f} | {100 * s:.0f}% |")
    lines.append(f"| random (mean ± std over {args.random_seeds} seeds) | {n} | "
                 f"{100 * rnd_stats[:, 0].mean():.1f} ± {100 * rnd_stats[:, 0].std():.1f} | "
                 f"{100 * rnd_stats[:, 1].mean():.0f}% |")
    lines.append(f"| whole coco_voc pool | {len(sub_ids)} | {100 * q.mean():.1f} | "
                 f"{100 * (q < 0.5).mean():.0f}% |")
    best = min(rows + [("random", rnd_stats[:, 0].mean(), 0.0)], key=lambda r: r[1])[0]
    verdict = ("MAD exposes failures best" if best == "MAD" else
               f"MAD does NOT win here: {best} finds lower-mIoU images")
    lines += ["", f"Verdict: {verdict}.", ""]

    # ---- one simulated round --------------------------------------------------------------------
    if not args.no_finetune:
        o = exp.oracle
        mad_ids = [sub_ids[i] for i in mad.tolist()]
        gts = {k: read_mask(gt_dir / f"{sub_paths[sub_ids.index(k)].stem}.png", c) for k in mad_ids}
        mos, ood = {}, set()
        for k in mad_ids:
            if is_out_of_domain(gts[k], c):
                ood.add(k)
                continue
            mos[k] = float(np.mean(simulated_scores(k, gt_miou[k], n_raters=exp.label_studio.raters_per_task,
                                                    noise=o.noise, thresholds=o.thresholds, seed=o.seed)))
        s1 = [k for _, k in sorted((v, k) for k, v in mos.items())[:exp.selection.n4]]
        mc = main_classes(np.stack([ta[sub_ids.index(k)] for k in mad_ids]))
        tset = choose_test_set(mad_ids, mc, ood=ood, used=set(s1), size=exp.selection.test_size,
                               max_per_class=exp.selection.max_per_class, seed=exp.seed,
                               class_names=exp.classes)
        in_domain = [i for i in range(len(sub_ids)) if sub_ids[i] not in set(tset.ids)
                     and not is_out_of_domain(read_mask(gt_dir / f"{sub_paths[i].stem}.png", c), c)]
        ent_order = entropy_select(ea[in_domain], exp.selection.n4)
        s_ent = [sub_ids[in_domain[i]] for i in ent_order.tolist()]

        def pairs_of(keys: list[str]) -> list[tuple[Path, Path]]:
            ps = [sub_paths[sub_ids.index(k)] for k in keys]
            return [(p, gt_dir / f"{p.stem}.png") for p in ps]

        s_dir = _link_folder(out / "S1", pairs_of(s1))
        e_dir = _link_folder(out / "S_entropy", pairs_of(s_ent))
        t_pairs = pairs_of(tset.ids)
        ft = exp.finetune
        cfg = FinetuneConfig(epochs=args.epochs or ft.epochs, batch_size=ft.batch_size, lrs=tuple(ft.lr_grid),
                             lwf_weight=0.0, seed=exp.seed)
        specs = {"f(0)": exp.target.spec()}
        for key, folder, tag in (("f(1) MAD", s_dir, "mad"), ("f(1) entropy", e_dir, "entropy")):
            with timer(f"fine-tune {key} ({cfg.epochs} epochs, {len(LabelledFolder(folder))} images + S(0))"):
                res = finetune(load_model_spec(exp.target.spec(), device=args.device), LabelledFolder(folder),
                               out / f"finetune-{tag}-e{cfg.epochs}",
                               replay=exp.s0.open() if ft.replay else None, val=exp.t0.open(), config=cfg)
            specs[key] = res.spec.to_dict()
        with timer("evaluate on T and T(0)"):
            sets = [TestSet("T", tuple(t_pairs), 1), TestSet("T(0)", tuple(exp.t0.open().pairs), 0)]
            ev = evaluate_models([ModelEntry(k, v) for k, v in specs.items()], sets, c, out / "eval",
                                 device=args.device)
        lines += ["## One round (simulated raters/annotator, no Label Studio)", "",
                  f"S(1) = {len(s1)} lowest-MOS candidates ({len(ood)} of {len(mad_ids)} candidates out of "
                  f"domain); T = {len(tset.ids)} images drawn from M \\ S(1) with the test-set rules "
                  f"(per class: {tset.per_class}); T(0) = {len(exp.t0.open())} voc_samples images. "
                  f"Fine-tune: {cfg.epochs} epochs, LR {', '.join(f'{v:g}' for v in cfg.lrs)}, "
                  f"S(0) replay = {ft.replay}. Entropy baseline: the same budget ({len(s_ent)} images, "
                  "top entropy among in-domain coco_voc images outside T).", "",
                  "| model | mIoU on T | mIoU on T(0) |", "|---|---|---|"]
        for key in specs:
            lines.append(f"| {key} | {100 * ev.miou(key, 'T'):.1f} | {100 * ev.miou(key, 'T(0)'):.1f} |")
        d_t = ev.miou("f(1) MAD", "T") - ev.miou("f(0)", "T")
        d_0 = ev.miou("f(1) MAD", "T(0)") - ev.miou("f(0)", "T(0)")
        d_e = ev.miou("f(1) MAD", "T") - ev.miou("f(1) entropy", "T")
        lines += ["", f"f(1) MAD vs f(0): {100 * d_t:+.1f} mIoU on T, {100 * d_0:+.1f} on T(0) "
                  f"({'forgetting' if d_0 < 0 else 'no forgetting'}); MAD vs entropy on T: {100 * d_e:+.1f}"
                  + (" (MAD loses)" if d_e < 0 else "") + ".", ""]

    lines += ["## Wall time per stage (2 CPU cores unless noted)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in timer.rows]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    (out / "efficacy.md").write_text(text)
    print(f"written to {out / 'efficacy.md'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(main())
    except MadsegError as exc:
        print(f"efficacy: error: {exc}", file=sys.stderr)
        sys.exit(2)
