"""Fine-tune efficacy: the gain curve of f(1) over f(0) per labelled image, with repeated draws.

    .venv/bin/python benchmarks/efficacy_finetune.py [--pool IMAGES --gt MASKS] [--json OUT]
        [--n4 10,20,40,80] [--seeds 0,1,2] [--choosers failures,entropy] [--method default]
        [--dev [--dev-seeds 0,1,2]]  (compare the methods on the dev split instead; chooses the default)

Also reached as ``benchmarks/efficacy.py --part finetune`` (:func:`add_arguments`, :func:`run`).

Per seed s the labelled pool (default: the shared ``coco_voc``, 200 images) is split at random
into a training half and a held-out half. f(0) (the target) predicts the pool once (cached under
``~/.cache/madseg``). The n4 training images are the lowest per-image GT mIoU of f(0) in the
training half ("labelled failures"), or the n4 highest mean pixel entropy (the paper's Appendix A
baseline at an equal labelling budget). f(1) = f(0) fine-tuned on them with S(0) replay
(``ml_backend.finetune``, the chosen method). Measured on three sets, never containing a
training image:

- ``random``: the whole held-out half (dataset mIoU);
- ``failure_zone``: a test set drawn from the held-out half by the paper's test-set rules
  (``projects.evaluation.testset.choose_test_set``: main predicted class buckets, <= 4 per class, 30 images)
  among the held-out images whose f(0) GT mIoU is below the held-out median;
- ``t0``: a fixed subset of T(0) (default: the first 100 sorted stems of voc2012/val), with the
  standard mIoU and the ground-truth-class mIoU (``ml_backend.metrics.gt_class_miou``).

``--dev`` fine-tunes each method of :data:`METHODS` on the failures (n4 = 40) of each dev seed
(``--dev-seeds``, default 0,1,2; each seed built exactly as seed 0 always was) and measures
them on a DEV split only, inside the training half. The rest of the training half (the 60 images
not trained on) is split deterministically (:func:`dev_split`: sorted by f(0) GT mIoU, each
consecutive pair split by a seeded coin) into a **pseudo reservoir** (the only images that method
"pseudo" pseudo-labels, or "lwf" distils on) and a **dev-eval part**, so that no image is both
pseudo-labelled and evaluated: ``dev_random`` = the whole dev-eval part, ``dev_failure_zone`` = 15
of its images below its f(0) median drawn by the same test-set rules, ``dev_t0`` = T(0) images
100-149. Every method is measured on the same sets. The held-out half and the test T(0) images
are never used to choose. In test mode the pseudo-labelled (or distilled) images are the training
half minus the training images (never a held-out image).

**The choice rule, fixed before the dev results of the pseudo-label / balanced / EMA / long-schedule
round were seen** (dev sets: standard mIoU; dev T(0): ground-truth-class mIoU; "gain" = f(1) - f(0)):
a method qualifies when its dev T(0) gain >= -0.01 and its dev_random gain >= -0.005; among the
qualifying methods the largest dev_failure_zone gain wins (a method within 0.001 of the default
``all_lr3e-5`` counts as a tie and the default stays). If none qualifies, the default stays unless a
method is better than the default on all three dev sets (then the best of those by failure-zone
gain). A winner that needs the competitors' predictions in the round (pseudo-labels) is reported
but does not become the ``FinetuneConfig`` default (it is not a config-only change).

**Repeated dev seeds (fixed before the seed-1/2 dev cells were run, after the one-seed choice of
balanced sampling was not confirmed on the test seeds).** The rule above is applied to the MEAN over
the dev seeds of each method's dev gains (:func:`choose_dev`; only methods with a cell for every dev
seed take part). A method other than the reference replaces it only if, in addition, its mean
failure-zone gain exceeds the reference's by more than the tie margin 0.001 AND by more than the
standard error of the paired difference, ``std(d_s, ddof=1) / sqrt(n)`` with ``d_s`` = method minus
reference failure-zone gain on dev seed s (n >= 2 seeds needed; with one seed no replacement). Otherwise
the reference (uniform sampling, ``all_lr3e-5``) stays.

Everything is written incrementally to ``--json`` (a rerun resumes: finished cells are skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ml_backend.errors import MadsegError  # noqa: E402

C = 21
DEFAULT_TARGET = ("espnetv2", "models/espnetv2/espnetv2_s_1.0_pascal_256x256.pth")
DEFAULT_COMPETITORS = ("espnetv2:models/espnetv2/espnetv2_s_2.0_pascal_256x256.pth,"
                       "tflite:models/tflite/deeplabv3_mnv2_dm05_voc.tflite")

#: Every method but "default" pins the sampling, so that a change of the FinetuneConfig default
#: does not change what an old method name means.
_BASE: dict[str, Any] = {"lrs": (1e-4,), "scale_range": (0.75, 1.25), "sampling": "uniform"}
_LR3E5: dict[str, Any] = {**_BASE, "lrs": (3e-5,)}
#: The methods the dev split compares: FinetuneConfig overrides ("pseudo": add the competitors'
#: agreement labels on the rated-but-unlabelled training-half images; "lwf": distil f(0) on those
#: same images (LwF, Li & Hoiem 2016), no labels; "steps_mult": longer schedule). "default" =
#: FinetuneConfig() as shipped (its first learning rate).
#: ``ema_lr3e-5`` uses ema_decay 0.9: an averaging window of ~1 / (1 - 0.9) = 10 of the 40 steps,
#: and 0.9 ** 40 = 1.5 % of the parent left in the average (0.95 / 0.99 would keep 13 % / 67 % of
#: the parent: an interpolation back to f(0), not an average of the trajectory's end).
METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "all_lr1e-4": dict(_BASE),
    "all_lr1e-4_scale0.5-2": {**_BASE, "scale_range": (0.5, 2.0)},
    "all_lr3e-5": dict(_LR3E5),
    "all_lr1e-5_long": {**_BASE, "lrs": (1e-5,), "steps_mult": 4.0},
    "enc0.1_lr1e-4": {**_BASE, "encoder_lr_mult": 0.1},
    "enc0.1_lr3e-5": {**_LR3E5, "encoder_lr_mult": 0.1},
    "decoder_lr1e-3": {**_BASE, "lrs": (1e-3,), "encoder_lr_mult": 0.0},
    "decoder_lr1e-4": {**_BASE, "encoder_lr_mult": 0.0},
    "l2sp_lr1e-4": {**_BASE, "l2sp_weight": 100.0},
    "l2sp_lr3e-5": {**_LR3E5, "l2sp_weight": 300.0},
    "balanced_lr1e-4": {**_BASE, "sampling": "balanced"},
    "balanced_lr3e-5": {**_LR3E5, "sampling": "balanced"},
    "pseudo_lr1e-4": {**_BASE, "pseudo": True},
    "pseudo_lr3e-5": {**_LR3E5, "pseudo": True, "pseudo_weight": 0.5},
    "pseudo_lr3e-5_w1": {**_LR3E5, "pseudo": True, "pseudo_weight": 1.0},
    "pseudo_lr3e-5_long": {**_LR3E5, "pseudo": True, "pseudo_weight": 0.5, "steps_mult": 3.0},
    "ema_lr1e-4": {**_BASE, "ema_decay": 0.9},
    "ema_lr3e-5": {**_LR3E5, "ema_decay": 0.9},
    "lwf_lr3e-5": {**_LR3E5, "lwf": True, "lwf_weight": 1.0},
}
#: The methods of the second dev round (the current default first, as the dev reference).
DEV_METHODS_ROUND2 = ("pseudo_lr3e-5_long", "all_lr1e-5_long", "all_lr3e-5", "pseudo_lr3e-5",
                      "pseudo_lr3e-5_w1", "balanced_lr3e-5", "ema_lr3e-5", "lwf_lr3e-5")
#: Dev failure-zone size (the dev-eval part has 30 images).
DEV_FAILURE_ZONE_SIZE = 15


def _cache_root() -> Path:
    root = Path(os.environ.get("MADSEG_CACHE", Path.home() / ".cache" / "madseg")) / "efficacy_finetune"
    root.mkdir(parents=True, exist_ok=True)
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fine-tune benchmark's options to ``parser`` (shared with benchmarks/efficacy.py)."""
    from ml_backend.shared import shared_dir

    sh = shared_dir()
    g = parser.add_argument_group("fine-tune efficacy")
    if not any(a.dest == "pool" for a in parser._actions):
        g.add_argument("--pool", default=str(sh / "data" / "coco_voc" / "images"), help="pool images folder")
        g.add_argument("--gt", default=str(sh / "data" / "coco_voc" / "masks"),
                       help="ground-truth masks folder")
        g.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "efficacy_finetune.json"),
                       help="results JSON (written incrementally; a rerun resumes)")
    g.add_argument("--ft-target", default=f"{DEFAULT_TARGET[0]}:{sh / DEFAULT_TARGET[1]}",
                   help="target NAME:CHECKPOINT (default: ESPNetv2 s=1.0 @256, lighter than the demo's "
                        "s=2.0)")
    g.add_argument("--ft-competitors", default=",".join(
        f"{c.split(':')[0]}:{sh / c.split(':')[1]}" for c in DEFAULT_COMPETITORS.split(",")),
        help="NAME:CHECKPOINT,... whose agreement gives pseudo-labels (method 'pseudo')")
    g.add_argument("--s0", default=str(sh / "data" / "voc2012" / "train"),
                   help="S(0) labelled folder (replay)")
    g.add_argument("--t0", default=str(sh / "data" / "voc2012" / "val"), help="T(0) labelled folder")
    g.add_argument("--t0-limit", type=int, default=100, help="first N sorted T(0) stems (default 100)")
    g.add_argument("--n4", default="10,20,40,80", help="labelled-failure budgets")
    g.add_argument("--seeds", default="0,1,2", help="split/training seeds")
    g.add_argument("--choosers", default="failures,entropy", help="failures and/or entropy")
    g.add_argument("--method", default="default", choices=sorted(METHODS), help="fine-tune method")
    g.add_argument("--steps", type=int, default=40,
                   help="SGD steps per fine-tune (epochs = ceil(steps / steps per epoch))")
    g.add_argument("--crop", type=int, default=192,
                   help="training crop side (inference stays at the model's input size; the scale range "
                        "is relative to that size)")
    g.add_argument("--test-size", type=int, default=30, help="failure-zone test-set size")
    g.add_argument("--dev", action="store_true",
                   help="compare METHODS on the dev split (n4 = 40, --dev-seeds)")
    g.add_argument("--dev-seeds", default="0,1,2",
                   help="dev seeds for --dev (each: its own split, failures and dev sets; default 0,1,2)")
    g.add_argument("--dev-methods", default=",".join(DEV_METHODS_ROUND2),
                   help="methods for --dev (default: the second round, the current default first)")
    g.add_argument("--procs", type=int, default=1, help="parallel worker processes (1 torch thread each)")
    g.add_argument("--device", default="cpu")


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------


def per_image_miou(cms: np.ndarray) -> np.ndarray:
    """(N,) mIoU of each image from per-image confusion matrices (N, C, C)."""
    from ml_backend.metrics import miou_from_confusion

    return np.array([miou_from_confusion(cm) for cm in cms])


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random halves (train, held-out) of range(n) for ``seed`` (sorted index arrays)."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    half = n // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def failure_zone(idx: np.ndarray, miou: np.ndarray, main_class: np.ndarray, stems: list[str], size: int,
                 seed: int) -> list[int]:
    """Indices of a test set drawn by the paper's rules from the images of ``idx`` whose f(0) mIoU
    is below the median over ``idx``."""
    from projects.evaluation.testset import choose_test_set

    med = float(np.median(miou[idx]))
    cand = [int(i) for i in idx if miou[i] < med]
    choice = choose_test_set([stems[i] for i in cand], [int(main_class[i]) for i in cand], size=size,
                             max_per_class=4, seed=seed)
    pos = {s: i for i, s in enumerate(stems)}
    return [pos[s] for s in choice.ids]


def dev_split(rest: np.ndarray, miou: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the ``rest`` indices (training half minus the training images) into (pseudo reservoir,
    dev-eval part), sorted index arrays of half the size each (the reservoir gets the odd one).

    Stratified by f(0) per-image mIoU ``miou`` (N,): the rest is sorted by it and each consecutive
    pair is split by a coin of ``np.random.default_rng([seed, 11])``, so both parts hold as many
    failures and the split is the same for every method.
    """
    order = np.asarray(rest)[np.argsort(miou[rest], kind="stable")]
    rng = np.random.default_rng([seed, 11])
    reservoir, evaluation = [], []
    for k in range(0, len(order) - 1, 2):
        a, b = int(order[k]), int(order[k + 1])
        if rng.random() < 0.5:
            a, b = b, a
        reservoir.append(a)
        evaluation.append(b)
    if len(order) % 2:
        reservoir.append(int(order[-1]))
    return np.array(sorted(reservoir), dtype=np.int64), np.array(sorted(evaluation), dtype=np.int64)


#: Two failure-zone gains closer than this are a tie (the reference stays).
DEV_TIE_MARGIN = 0.001


def choose_dev(cells: dict[str, Any], seeds: list[int] | None = None,
               reference: str = "all_lr3e-5") -> dict[str, Any]:
    """Apply the dev choice rule (module docstring) to the dev cells (``run()``'s ``result["cells"]``:
    dicts with ``method``, ``seed``, ``n4`` = 40, ``chooser`` = "failures" and ``delta[SET][METRIC]``).

    ``seeds``: the dev seeds (default: every seed of the reference's cells). Per method the gains are
    the means over those seeds (dev failure zone and dev random: standard mIoU; dev T(0):
    ground-truth-class mIoU); a method lacking a seed is listed under ``incomplete`` and not chosen.
    A replacement of ``reference`` must beat its mean failure-zone gain by more than
    :data:`DEV_TIE_MARGIN` and by more than the standard error of the per-seed paired difference.
    Returns the rule's inputs (``gains``, ``per_seed``, ``paired``) and the ``chosen`` method.
    """
    per_seed: dict[str, dict[int, dict[str, float]]] = {}
    for cell in cells.values():
        d = cell.get("delta", {})
        if "dev_random" not in d or cell.get("n4") != 40 or cell.get("chooser") != "failures":
            continue
        per_seed.setdefault(cell["method"], {})[int(cell["seed"])] = {
            "failure_zone": d["dev_failure_zone"]["miou"], "random": d["dev_random"]["miou"],
            "t0_gt": d["dev_t0"]["gt_miou"]}
    if reference not in per_seed:
        return {"gains": {}, "chosen": None, "why": f"the reference {reference} has no dev cell yet"}
    want = sorted(seeds) if seeds is not None else sorted(per_seed[reference])
    incomplete = sorted(m for m, v in per_seed.items() if any(s not in v for s in want))
    if reference in incomplete:
        return {"gains": {}, "seeds": want, "incomplete": incomplete, "chosen": None,
                "why": f"the reference {reference} lacks a dev seed of {want}"}
    keys = ("failure_zone", "random", "t0_gt")
    gains = {m: {k: round(float(np.mean([v[s][k] for s in want])), 4) for k in keys}
             for m, v in per_seed.items() if m not in incomplete}
    paired: dict[str, dict[str, float | None]] = {}  # se None: one seed, no standard error
    for m in gains:
        diffs = np.array([per_seed[m][s]["failure_zone"] - per_seed[reference][s]["failure_zone"]
                          for s in want])
        se = round(float(diffs.std(ddof=1) / np.sqrt(len(diffs))), 4) if len(diffs) > 1 else None
        paired[m] = {"mean_diff": round(float(diffs.mean()), 4), "se": se}
    qualify = sorted(m for m, v in gains.items() if v["t0_gt"] >= -0.01 and v["random"] >= -0.005)
    ref = gains[reference]
    if qualify:
        best = max(qualify, key=lambda m: (gains[m]["failure_zone"], m == reference))
        tie = gains[best]["failure_zone"] - ref["failure_zone"] <= DEV_TIE_MARGIN
        if best != reference and reference in qualify and tie:
            best, why = reference, f"tie within {DEV_TIE_MARGIN} with the reference: the reference stays"
        else:
            why = "largest mean dev failure-zone gain among the qualifying methods"
    else:
        better = [m for m, v in gains.items() if m != reference and all(v[k] > ref[k] for k in ref)]
        if better:
            best = max(better, key=lambda m: gains[m]["failure_zone"])
            why = "none qualifies; better than the reference on all three dev sets (means)"
        else:
            best = reference
            why = "none qualifies and none beats the reference on all three: the reference stays"
    if best != reference:
        diff, se = paired[best]["mean_diff"], paired[best]["se"]
        if not (diff is not None and se is not None and diff > DEV_TIE_MARGIN and diff > se):
            why = (f"{best} won by the rule on the means ({why}), but its failure-zone gain over the "
                   f"reference ({diff:+.4f}) is not above both the tie margin {DEV_TIE_MARGIN} and the "
                   f"standard error of the paired difference ({se}) over {len(want)} dev seed(s): the "
                   "reference stays")
            best = reference
    return {"seeds": want, "gains": gains,
            "per_seed": {m: {str(s): v[s] for s in want} for m, v in per_seed.items() if m in gains},
            "paired": paired, "incomplete": incomplete, "qualifying": qualify, "chosen": best, "why": why,
            "needs_competitors": bool(METHODS.get(best, {}).get("pseudo"))}


def summarize(cm: np.ndarray) -> dict[str, float]:
    from ml_backend.metrics import gt_class_miou, miou_from_confusion

    return {"miou": round(miou_from_confusion(cm), 4), "gt_miou": round(gt_class_miou(cm), 4)}


def mean_spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
            "min": round(float(a.min()), 4), "max": round(float(a.max()), 4), "n": int(len(a))}


# ----------------------------------------------------------------------------------------------
# model I/O (cached)
# ----------------------------------------------------------------------------------------------


def _load(spec: str, device: str) -> Any:
    from ml_backend.zoo import load_model

    name, _, ckpt = spec.partition(":")
    return load_model(name, ckpt or None, device=device)


def _pool_folder(pool: Path, gt: Path) -> Path:
    key = hashlib.sha256(f"{pool.resolve()}|{gt.resolve()}".encode()).hexdigest()[:12]
    d = _cache_root() / f"pool-{key}"
    d.mkdir(exist_ok=True)
    for name, src in (("images", pool), ("masks", gt)):
        link = d / name
        if not link.exists():
            link.symlink_to(src.resolve(), target_is_directory=True)
    return d


def predict_pool(model: Any, pairs: list[tuple[Path, Path]], tag: str, *, want_entropy: bool = True
                 ) -> dict[str, np.ndarray]:
    """Per image: confusion (N, C, C), predicted class areas (N, C), mean pixel entropy (N,),
    cached in ``~/.cache/madseg/efficacy_finetune/pred-<tag>.npz``."""
    from ml_backend.datasets import read_pair
    from ml_backend.metrics import confusion_matrix

    key = hashlib.sha256((tag + "|" + "|".join(str(p) for p, _ in pairs)).encode()).hexdigest()[:16]
    f = _cache_root() / f"pred-{key}.npz"
    if f.is_file():
        z = np.load(f)
        return {k: z[k] for k in z.files}
    cms, areas, ent = [], [], []
    for img_path, mask_path in pairs:
        image, mask = read_pair(img_path, mask_path, C)
        if want_entropy:
            p = model.predict_proba([image], batch_size=1)[0]
            pred = p.argmax(0).astype(np.uint8)
            ent.append(float(-(p * np.log(np.clip(p, 1e-12, 1))).sum(0).mean()))
        else:
            pred = model.predict([image], batch_size=1)[0]
            ent.append(float("nan"))
        cms.append(confusion_matrix(pred, mask, C))
        areas.append(np.bincount(pred.reshape(-1), minlength=C)[:C] / pred.size)
    out = {"cms": np.stack(cms), "areas": np.stack(areas), "entropy": np.array(ent)}
    np.savez(f, **out)
    return out


def pseudo_folder(competitors: list[str], pairs: list[tuple[Path, Path]], device: str) -> Path:
    """Agreement pseudo-labels of the competitors for all pool images (cached labelled folder)."""
    from ml_backend.imageio import read_rgb
    from ml_backend.pseudolabels import write_agreement_labels

    text = "|".join(competitors) + "|".join(str(p) for p, _ in pairs)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    d = _cache_root() / f"pseudo-{key}"
    done = d / "done.json"
    if done.is_file():
        return d
    models = [_load(c, device) for c in competitors]
    imgs = [p for p, _ in pairs]
    preds = []
    for p in imgs:
        im = read_rgb(p)
        preds.append([m.predict([im], batch_size=1)[0] for m in models])
    stems = write_agreement_labels(imgs, preds, d, min_coverage=0.5)
    done.write_text(json.dumps({"stems": stems}))
    return d


# ----------------------------------------------------------------------------------------------
# one fine-tune cell (runs in a worker process)
# ----------------------------------------------------------------------------------------------


def _confusions(model: Any, pairs: list[tuple[Path, Path]], batch: int = 8) -> np.ndarray:
    """Per-image confusion matrices (N, C, C) of ``model`` on labelled pairs (batched prediction)."""
    from ml_backend.datasets import read_pair
    from ml_backend.metrics import confusion_matrix

    out = []
    for k in range(0, len(pairs), batch):
        items = [read_pair(i, m, C) for i, m in pairs[k : k + batch]]
        preds = model.predict([im for im, _ in items], batch_size=batch)
        out += [confusion_matrix(p, m, C) for p, (_, m) in zip(preds, items, strict=True)]
    return np.stack(out) if out else np.zeros((0, C, C), dtype=np.int64)


def _cell(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune on ``job['train']`` stems and evaluate on the job's sets; returns the cell's record."""
    import torch

    torch.set_num_threads(1)
    from ml_backend.datasets import LabelledFolder
    from ml_backend.finetune import FinetuneConfig, finetune

    t0 = time.time()
    model = _load(job["target"], job["device"])
    pool = LabelledFolder(job["pool_dir"])
    train = LabelledFolder(job["pool_dir"], job["train"])
    overrides = dict(job["config"])
    use_pseudo = bool(overrides.pop("pseudo", False))
    use_lwf = bool(overrides.pop("lwf", False))
    steps_mult = float(overrides.pop("steps_mult", 1.0))
    spe = int(np.ceil(len(train) / overrides.get("batch_size", 2)))
    overrides["epochs"] = max(1, int(np.ceil(job["steps"] * steps_mult / spe)))
    overrides["crop_size"] = (job["crop"], job["crop"])
    overrides["seed"] = job["seed"]
    overrides["num_workers"] = 0
    if "lrs" in overrides:
        overrides["lrs"] = tuple(overrides["lrs"])
    if "scale_range" in overrides:
        overrides["scale_range"] = tuple(overrides["scale_range"])
    base = asdict(FinetuneConfig())
    base.update(overrides)
    cfg = FinetuneConfig(**base)
    if len(cfg.lrs) > 1:
        cfg.lrs = cfg.lrs[:1]
    cfg.steps = None
    # scale_range is relative to the inference scale: a crop smaller than the model's input size
    # is cut from the image resized to the input size (times the random factor), not to the crop
    ratio = model.input_size[0] / job["crop"]
    cfg.scale_range = (cfg.scale_range[0] * ratio, cfg.scale_range[1] * ratio)
    pseudo = None
    if use_pseudo and job.get("pseudo_dir"):
        pf = LabelledFolder(job["pseudo_dir"])
        wanted = [s for s in job["pseudo_stems"] if s in set(pf.stems)]
        pseudo = LabelledFolder(job["pseudo_dir"], wanted) if wanted else None
    unlabelled = None
    if use_lwf:
        by_stem = dict(zip(pool.stems, pool.pairs, strict=True))
        unlabelled = [str(by_stem[s][0]) for s in job["pseudo_stems"]]
    out = Path(job["out_dir"])
    res = finetune(model, train, out, replay=LabelledFolder(job["s0"]), config=cfg, pseudo=pseudo,
                   unlabelled=unlabelled, progress=False)
    t_train = time.time() - t0
    from ml_backend.zoo import load_model_spec

    tuned = load_model_spec(res.spec, device=job["device"])
    t1 = time.time()
    pairs = pool.pairs
    idx = list(job["eval_pool"])
    pool_cms = _confusions(tuned, [pairs[i] for i in idx])
    cms = dict(zip(idx, pool_cms, strict=True))
    t0_cm = _confusions(tuned, LabelledFolder(job["t0"], job["t0_stems"]).pairs).sum(0)
    sets = {name: summarize(sum((cms[i] for i in idx), np.zeros((C, C), dtype=np.int64)))
            for name, idx in job["sets"].items()}
    sets[job["t0_name"]] = summarize(t0_cm)
    losses = res.runs[0]["train_loss"] if res.runs else []
    return {"key": job["key"], "sets": sets, "epochs": cfg.epochs, "lr": res.lr,
            "steps": cfg.epochs * int(np.ceil(len(train) / cfg.batch_size)),
            "pseudo_images": len(pseudo) if pseudo is not None else 0,
            "lwf_images": len(unlabelled) if unlabelled is not None else 0,
            "scale_range_at_crop": [round(v, 3) for v in cfg.scale_range],
            "train_loss": [round(v, 4) for v in losses],
            "seconds": {"finetune": round(t_train, 1), "evaluate": round(time.time() - t1, 1)}}


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------


def _write(path: Path, data: dict[str, Any]) -> None:
    from ml_backend.atomic import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def _t0_eval(model: Any, t0: Path, stems: list[str], tag: str) -> dict[str, float]:
    from ml_backend.datasets import LabelledFolder

    d = predict_pool(model, LabelledFolder(t0, stems).pairs, tag, want_entropy=False)
    return summarize(d["cms"].sum(0))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the fine-tune gain curve (or the dev comparison with ``args.dev``); returns the JSON dict."""
    import torch

    from ml_backend.datasets import LabelledFolder

    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    t_start = time.time()
    pool_dir = _pool_folder(Path(args.pool), Path(args.gt))
    pool = LabelledFolder(pool_dir)
    stems = list(pool.stems)
    n = len(stems)
    if n < 20:
        raise MadsegError(f"efficacy_finetune: the pool {args.pool} has {n} labelled images; it needs >= 20")
    target = _load(args.ft_target, args.device)
    t = time.time()
    f0 = predict_pool(target, pool.pairs, f"f0|{args.ft_target}")
    timings["f0_predict_pool_s"] = round(time.time() - t, 1)
    miou, main_class = per_image_miou(f0["cms"]), f0["areas"][:, 1:].argmax(1) + 1
    main_class = np.where(f0["areas"][:, 1:].max(1) > 0, main_class, 0)
    t0_all = list(LabelledFolder(args.t0).stems)
    t0_stems = t0_all[: args.t0_limit]
    dev_t0_stems = t0_all[args.t0_limit : args.t0_limit + 50]
    t = time.time()
    t0_name = "dev_t0" if args.dev else "t0"
    f0_t0 = _t0_eval(target, Path(args.t0), dev_t0_stems if args.dev else t0_stems,
                     f"f0t0|{args.ft_target}|{args.dev}")
    timings["f0_t0_s"] = round(time.time() - t, 1)

    out_path = Path(args.json)
    result: dict[str, Any] = {}
    if out_path.is_file():
        result = json.loads(out_path.read_text(encoding="utf-8"))
    result.setdefault("cells", {})
    result["setup"] = {
        "pool": str(Path(args.pool).resolve()), "pool_size": n, "target": args.ft_target,
        "s0": args.s0, "t0": args.t0, "t0_subset": f"first {len(t0_stems)} sorted stems" if not args.dev
        else f"stems {args.t0_limit}..{args.t0_limit + len(dev_t0_stems) - 1} (dev)",
        "crop": args.crop, "steps": args.steps, "test_size": args.test_size,
        "method": args.method if not args.dev else "dev comparison",
        "config": {k: v for k, v in METHODS[args.method].items()} if not args.dev else None,
        "definitions": __doc__,
        "dev_sets": (
            "dev_split(): the training half minus the training images, sorted by f(0) GT mIoU, each "
            "consecutive pair split by a seeded coin (rng [seed, 11]) into a pseudo reservoir (pseudo-"
            "labelled / distilled images) and a dev-eval part; dev_random = the dev-eval part, "
            f"dev_failure_zone = {DEV_FAILURE_ZONE_SIZE} images below its f(0) median by the test-set "
            "rules; the same sets for every method") if args.dev else None,
        "pseudo_images": "the pseudo reservoir (dev)" if args.dev
        else "the training half minus the training images (never a held-out image)",
    }

    pseudo_dir = None
    methods = [m for m in args.dev_methods.split(",") if m] if args.dev else [args.method]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MadsegError(f"efficacy_finetune: method(s) {unknown} unknown; known: {sorted(METHODS)}")
    if any(METHODS[m].get("pseudo") for m in methods):
        t = time.time()
        competitors = [c for c in args.ft_competitors.split(",") if c]
        pseudo_dir = str(pseudo_folder(competitors, pool.pairs, args.device))
        timings["pseudo_labels_s"] = round(time.time() - t, 1)

    jobs: list[dict[str, Any]] = []
    f0_rows: dict[str, Any] = {}
    dev_seeds = [int(s) for s in args.dev_seeds.split(",") if s]
    seeds = dev_seeds if args.dev else [int(s) for s in args.seeds.split(",")]
    n4s = [40] if args.dev else [int(v) for v in args.n4.split(",")]
    choosers = ["failures"] if args.dev else [c for c in args.choosers.split(",") if c]
    for seed in seeds:
        tr, ho = split(n, seed)
        for n4 in n4s:
            if n4 > len(tr):
                raise MadsegError(f"efficacy_finetune: n4 = {n4} > training half ({len(tr)} images)")
            for chooser in choosers:
                if chooser == "failures":
                    train_idx = tr[np.argsort(miou[tr], kind="stable")[:n4]]
                elif chooser == "entropy":
                    train_idx = tr[np.argsort(-f0["entropy"][tr], kind="stable")[:n4]]
                else:
                    raise MadsegError(
                        f"efficacy_finetune: chooser {chooser!r} unknown; use failures, entropy"
                    )
                rest = np.array(sorted(set(tr.tolist()) - set(train_idx.tolist())), dtype=np.int64)
                if args.dev:
                    reservoir, dev_eval = dev_split(rest, miou, seed)
                    sets = {"dev_random": dev_eval.tolist(),
                            "dev_failure_zone": failure_zone(dev_eval, miou, main_class, stems,
                                                             DEV_FAILURE_ZONE_SIZE, seed)}
                    rated_unlabelled = reservoir.tolist()
                else:
                    sets = {"random": ho.tolist(),
                            "failure_zone": failure_zone(ho, miou, main_class, stems, args.test_size, seed)}
                    rated_unlabelled = rest.tolist()
                evaluated = {i for v in sets.values() for i in v}
                trained = set(train_idx.tolist())
                extra = set(rated_unlabelled)
                if trained & evaluated or trained & extra or evaluated & extra:
                    raise AssertionError(  # a leak is a bug of this script, never of the input
                        f"efficacy_finetune: seed {seed}: training, pseudo-labelled and evaluated images "
                        "overlap")
                f0_sets = {k: summarize(f0["cms"][v].sum(0)) for k, v in sets.items()}
                f0_sets[t0_name] = f0_t0
                f0_rows[f"seed{seed}/n4={n4}/{chooser}"] = f0_sets
                for method in methods:
                    key = f"{method}/seed{seed}/n4={n4}/{chooser}"
                    if key in result["cells"]:
                        continue
                    cfg = METHODS[method]
                    # what is trained (not where it is evaluated): dev and test cells share runs
                    what = [cfg, [stems[i] for i in train_idx], seed, args.steps, args.crop, args.ft_target,
                            args.s0, "inference-scale"]
                    if cfg.get("pseudo") or cfg.get("lwf"):  # the extra images are part of what is trained
                        what.append(sorted(stems[i] for i in rated_unlabelled))
                    blob = json.dumps(what, sort_keys=True, default=str).encode()
                    tag = hashlib.sha256(blob).hexdigest()[:12]
                    jobs.append({
                        "key": key, "target": args.ft_target, "device": args.device,
                        "pool_dir": str(pool_dir),
                        "train": [stems[i] for i in train_idx], "s0": args.s0, "t0": args.t0,
                        "t0_stems": dev_t0_stems if args.dev else t0_stems, "t0_name": t0_name,
                        "config": cfg, "steps": args.steps, "crop": args.crop, "seed": seed,
                        "out_dir": str(_cache_root() / "runs" / tag),
                        "eval_pool": sorted({i for v in sets.values() for i in v}),
                        "sets": sets, "pseudo_dir": pseudo_dir,
                        "pseudo_stems": [stems[i] for i in rated_unlabelled],
                        "f0": f0_sets, "meta": {"method": method, "seed": seed, "n4": n4, "chooser": chooser,
                                                "train": [stems[i] for i in train_idx],
                                                "pseudo_pool": [stems[i] for i in rated_unlabelled]
                                                if (cfg.get("pseudo") or cfg.get("lwf")) else [],
                                                "set_sizes": {k: len(v) for k, v in sets.items()}},
                    })
    # the headline cells first (failures, n4 = 40), so that a partial run still answers the target,
    # then the entropy baseline at n4 = 40, then the rest of the curve
    jobs.sort(key=lambda j: (j["meta"]["n4"] != 40, j["meta"]["chooser"] != "failures", j["meta"]["n4"],
                             j["meta"]["seed"]))
    result["f0"] = f0_rows
    result["timings"] = {**result.get("timings", {}), **timings}
    _write(out_path, result)
    print(f"{len(jobs)} fine-tune cells to run ({len(result['cells'])} already done)", flush=True)

    def record(job: dict[str, Any], cell: dict[str, Any]) -> None:
        cell.update(job["meta"])
        cell["f0"] = job["f0"]
        cell["delta"] = {k: {m: round(cell["sets"][k][m] - job["f0"][k][m], 4) for m in ("miou", "gt_miou")}
                         for k in cell["sets"]}
        result["cells"][job["key"]] = cell
        result["summary"] = summary(result["cells"])
        if args.dev:
            result["choice"] = choose_dev(result["cells"], dev_seeds)
        spent = cell["seconds"]["finetune"] + cell["seconds"]["evaluate"]
        result["timings"]["cells_s"] = round(result["timings"].get("cells_s", 0.0) + spent, 1)
        _write(out_path, result)
        d = cell["delta"]
        print(f"{job['key']}: " + "  ".join(f"{k} {v['miou']:+.4f}/{v['gt_miou']:+.4f}" for k, v in d.items())
              + f"  [{cell['seconds']['finetune']:.0f}+{cell['seconds']['evaluate']:.0f} s]", flush=True)

    if args.procs > 1 and len(jobs) > 1:
        ctx = mp.get_context("spawn")
        by_key = {j["key"]: j for j in jobs}
        with ctx.Pool(args.procs) as workers:
            for cell in workers.imap_unordered(_cell, jobs):
                record(by_key[cell["key"]], cell)
    else:
        for job in jobs:
            record(job, _cell(job))
    result["timings"]["wall_s_this_run"] = round(time.time() - t_start, 1)
    result["summary"] = summary(result["cells"])
    if args.dev:
        result["choice"] = choose_dev(result["cells"], dev_seeds)
        print(json.dumps(result["choice"], indent=1), flush=True)
    _write(out_path, result)
    return result


def summary(cells: dict[str, Any]) -> dict[str, Any]:
    """Mean ± spread over seeds of each set's metric and its delta over f(0), per (method, n4, chooser)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for cell in cells.values():
        groups.setdefault(f"{cell['method']}/n4={cell['n4']}/{cell['chooser']}", []).append(cell)
    out: dict[str, Any] = {}
    for g, cs in sorted(groups.items()):
        row: dict[str, Any] = {"seeds": sorted(c["seed"] for c in cs)}
        for s in cs[0]["sets"]:
            for m in ("miou", "gt_miou"):
                row[f"{s}.{m}"] = mean_spread([c["sets"][s][m] for c in cs])
                row[f"{s}.{m}.f0"] = mean_spread([c["f0"][s][m] for c in cs])
                row[f"{s}.{m}.delta"] = mean_spread([c["delta"][s][m] for c in cs])
        row["finetune_s"] = mean_spread([c["seconds"]["finetune"] for c in cs])
        row["evaluate_s"] = mean_spread([c["seconds"]["evaluate"] for c in cs])
        out[g] = row
    return out


def markdown(result: dict[str, Any]) -> str:
    """The summary as a markdown table: per (method, n4, chooser) f(0) -> f(1) mean ± std over seeds."""
    rows = ["| method / n4 / chosen by | seeds | set | f(0) mIoU | f(1) mIoU | delta mIoU (mean ± std) "
            "| delta GT-class mIoU | fine-tune s | eval s |", "|---|---|---|---|---|---|---|---|---|"]
    for g, row in result.get("summary", {}).items():
        sets = sorted({k.split(".")[0] for k in row if "." in k})
        for s in sets:
            f0, f1 = row[f"{s}.miou.f0"], row[f"{s}.miou"]
            d, dg = row[f"{s}.miou.delta"], row[f"{s}.gt_miou.delta"]
            rows.append(f"| {g} | {len(row['seeds'])} | {s} | {f0['mean']:.3f} | {f1['mean']:.3f} | "
                        f"{d['mean']:+.3f} ± {d['std']:.3f} | {dg['mean']:+.3f} ± {dg['std']:.3f} | "
                        f"{row['finetune_s']['mean']:.0f} | {row['evaluate_s']['mean']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --json")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge the cells of these result files into --json (runs from separate processes)")
    args = ap.parse_args(argv)
    if args.merge:
        target = Path(args.json)
        result = json.loads(target.read_text(encoding="utf-8"))
        for other in args.merge:
            data = json.loads(Path(other).read_text(encoding="utf-8"))
            result["cells"].update(data["cells"])
            result["f0"].update(data.get("f0", {}))
        result["summary"] = summary(result["cells"])
        _write(target, result)
        print(markdown(result))
        return 0
    if args.table:
        print(markdown(json.loads(Path(args.json).read_text(encoding="utf-8"))))
        return 0
    try:
        print(markdown(run(args)))
    except MadsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
