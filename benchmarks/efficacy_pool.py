"""Score a labelled pool once for the efficacy benchmark and cache what the selection part needs.

``prepare_pool(pool, gt, target, competitors, cache_root, device=None) -> PoolData`` (the models as
``ml_backend.modelspec.ModelSpec`` values) scores the images of
``pool`` with the target and the competitors into a score store under ``cache_root`` (keyed by
the pool folder), with :func:`sampler.score.score_pool` (so what is cached is exactly what
``madseg score`` stores), then computes, once per target version, each image's ground-truth
per-image mIoU of the target at the image's original size (``projects.simulation.oracle.per_image_miou``:
the rater model's "true quality"), the GT classes present and the out-of-domain flag. Both are
kept in ``<cache>/gt_<target version>.json``; re-runs only load.

The cache lives outside the repository: ``$MADSEG_CACHE/efficacy`` or ``~/.cache/madseg/efficacy``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.atomic import atomic_write_json
from ml_backend.errors import MadsegError
from ml_backend.modelspec import ModelSpec


def default_cache_root() -> Path:
    """``$MADSEG_CACHE/efficacy`` or ``~/.cache/madseg/efficacy``."""
    base = os.environ.get("MADSEG_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "madseg") / "efficacy"


@dataclass
class PoolData:
    """Everything the selection benchmark needs about one scored, labelled pool (image i = ids[i]).

    Shapes: N images, m competitors, C classes.
    """

    ids: np.ndarray  # (N,) str content ids, sorted
    stems: list[str]  # (N,) file stem of each image (to find its GT mask)
    target_areas: np.ndarray  # (N, C) float32 predicted area fractions of the target
    competitor_areas: np.ndarray  # (m, N, C) float32
    distances: np.ndarray  # (m, N) float64 target-vs-competitor distance
    entropy: np.ndarray  # (N,) float64 mean per-pixel entropy of the target
    gt_miou: np.ndarray  # (N,) float64 target's per-image GT mIoU at the original size
    gt_classes: np.ndarray  # (N, C) bool class present in the GT mask
    ood: np.ndarray  # (N,) bool no foreground pixel in the GT (the oracle's out-of-domain rule)
    class_names: list[str]
    competitor_names: list[str]
    target_version: str
    competitor_versions: list[str]
    store: Path
    scoring_seconds: float  # wall seconds of the run that scored the pool (the first run)
    gt_seconds: float  # wall seconds of the run that computed the GT mIoU


def _pool_key(pool: Path) -> str:
    return hashlib.sha1(str(pool.resolve()).encode("utf-8")).hexdigest()[:12]


def _mask_for(gt: Path, stem: str) -> Path:
    p = gt / f"{stem}.png"
    if not p.is_file():
        raise MadsegError(f"--gt {gt}: no mask {stem}.png for pool image {stem}; "
                          "give the pool's ground-truth masks folder")
    return p


def prepare_pool(
    pool: str | os.PathLike[str],
    gt: str | os.PathLike[str],
    target: ModelSpec | Mapping[str, Any],
    competitors: Sequence[ModelSpec | Mapping[str, Any]],
    cache_root: str | os.PathLike[str] | None = None,
    *,
    device: str | None = None,
    progress: bool = True,
    cached_only: bool = False,
) -> PoolData:
    """Score ``pool`` (a folder of images) once and load the cached arrays (see the module docstring).

    ``cached_only``: score nothing; use the images an earlier (possibly interrupted) run scored
    with every model (a random subset of the pool, as the scorer works in content-id order).
    ``target``/``competitors``: specs (a ``{name, checkpoint, options}`` dict is read by
    :meth:`ModelSpec.from_dict`).
    """
    from ml_backend.imageio import read_mask, read_rgb
    from projects.simulation.oracle import is_out_of_domain, per_image_miou
    from sampler.candidates import load_selection_inputs
    from sampler.score import score_pool
    from sampler.store import image_paths

    pool, gt = Path(pool), Path(gt)
    target, competitors = ModelSpec.of(target), [ModelSpec.of(c) for c in competitors]
    if not pool.is_dir():
        raise MadsegError(f"--pool {pool}: not a folder; give a folder of images")
    if not gt.is_dir():
        raise MadsegError(f"--gt {gt}: not a folder; give the folder of the pool's ground-truth masks")
    cache = Path(cache_root or default_cache_root()) / f"{pool.name}-{_pool_key(pool)}"
    cache.mkdir(parents=True, exist_ok=True)
    store = cache / "store"
    t0 = time.perf_counter()
    timing_file = cache / "timing.json"
    timing: dict[str, Any] = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if cached_only:
        if not store.is_dir():
            raise MadsegError(f"--cached-only: {pool} has not been scored into {cache} yet")
        inp = load_selection_inputs(store)  # the versions of the latest score run
        timing.setdefault("scoring_s", None)
        timing["cached_only"] = True
    else:
        stats = score_pool([str(pool)], target, competitors, store, device=device,
                           progress=progress, workers=0)
        scoring_s = time.perf_counter() - t0
        if sum(stats.inferred.values()) or "scoring_s" not in timing:  # models ran: the first run
            timing["scoring_s"] = round(scoring_s, 2)
            timing["images_scored"] = {k: int(v) for k, v in stats.inferred.items()}
        inp = load_selection_inputs(store, stats.target_version, stats.competitor_versions)
    paths = image_paths(store, [str(i) for i in inp.ids])
    stems = [Path(p).stem if p else "" for p in paths]
    c = len(inp.class_names)

    t1 = time.perf_counter()
    gt_file = cache / f"gt_{inp.target_version}.json"
    known: dict[str, Any] = json.loads(gt_file.read_text()) if gt_file.exists() else {}
    todo = [(str(i), p, s) for i, p, s in zip(inp.ids.tolist(), paths, stems, strict=True)
            if str(i) not in known]
    if todo:
        from ml_backend.zoo import load_model_spec

        model = load_model_spec(target, device=device)
        for n, (iid, p, stem) in enumerate(todo, 1):
            mask = read_mask(_mask_for(gt, stem), c)
            pred = model.predict([read_rgb(p)])[0]
            present = np.unique(mask[mask < c]).astype(int).tolist()
            known[iid] = {"miou": per_image_miou(pred, mask, c), "classes": present,
                          "ood": is_out_of_domain(mask, c), "stem": stem}
            if n % 25 == 0 or n == len(todo):
                atomic_write_json(gt_file, known)
                if progress:
                    print(f"  GT mIoU {n}/{len(todo)}", flush=True)
    gt_s = time.perf_counter() - t1
    if todo or "gt_miou_s" not in timing:
        timing["gt_miou_s"] = round(gt_s, 2)
    atomic_write_json(timing_file, timing)
    rows = [known[str(i)] for i in inp.ids.tolist()]
    classes = np.zeros((len(rows), c), dtype=bool)
    for r, rec in enumerate(rows):
        classes[r, rec["classes"]] = True
    return PoolData(
        ids=inp.ids, stems=stems, target_areas=inp.target_areas, competitor_areas=inp.competitor_areas,
        distances=inp.distances, entropy=inp.entropy,
        gt_miou=np.array([rec["miou"] for rec in rows], dtype=np.float64), gt_classes=classes,
        ood=np.array([rec["ood"] for rec in rows], dtype=bool), class_names=list(inp.class_names),
        competitor_names=list(inp.competitor_names), target_version=inp.target_version,
        competitor_versions=list(inp.competitor_versions), store=store,
        scoring_seconds=float("nan") if timing["scoring_s"] is None else float(timing["scoring_s"]),
        gt_seconds=float(timing["gt_miou_s"]),
    )
