"""Selecting candidates from a score store (I/O around the pure :mod:`sampler.select`).

Python API (what ``madseg select`` and the round orchestrator call):

- ``load_selection_inputs(store_dir, target_version=None, competitor_versions=None, metric="miou")
  -> SelectionInputs``: the arrays ``mad_select`` takes (``ids`` (N,), ``target_areas`` (N, C),
  ``competitor_areas`` (m, N, C), ``distances`` (m, N), ``entropy`` (N,)) over the images scored
  by the target *and* every competitor, sorted by image id (so image index = rank of the id).
  Defaults: the target and competitors of the store's latest ``madseg score`` run.
- ``select_candidates(store_dir, target_version=None, competitor_versions=None, bounds=None,
  n3=10, metric="miou") -> list[dict]``: MAD selection; one dict per image of M, ordered by the
  best rank the image reached: ``{"id", "path", "best_rank", "selections": [{"competitor",
  "competitor_version", "class", "class_index", "partition", "distance", "rank"}, ...]}`` (the
  selections of the image ordered by rank). ``bounds`` (C, 2) from :func:`bounds_from_folder`
  / :func:`sampler.bounds.bounds_from_masks`; None = no size constraint (logged).
- ``entropy_candidates(store_dir, n, target_version=None)`` / ``random_candidates(store_dir, n,
  seed=0, target_version=None)`` -> list of ``{"id", "path", "rank", "entropy"}``, over the images
  the target scored.
- ``bounds_from_folder(folder, num_classes, method="quartiles", min_count=5, class_names=None)``:
  bounds from the label masks of a folder (``<folder>/masks/*.png`` or ``<folder>/*.png``).
- ``summarize(candidates, method, ...) -> dict`` and ``format_summary(summary) -> str``;
  ``write_candidates(path, candidates)`` (JSONL, atomic).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.atomic import atomic_write, atomic_write_json
from ml_backend.errors import MadsegError
from ml_backend.imageio import read_mask

from .baselines import entropy_select, random_select
from .bounds import NO_BOUNDS, bounds_from_masks
from .select import PARTITIONS, mad_select, records_by_image
from .store import ScoreStore, open_store

log = logging.getLogger(__name__)


@dataclass
class SelectionInputs:
    """Arrays for one (target, competitors) selection; image index i is ``ids[i]``."""

    ids: np.ndarray  # (N,) str
    target_areas: np.ndarray  # (N, C) float32
    competitor_areas: np.ndarray  # (m, N, C) float32
    distances: np.ndarray  # (m, N) float64
    entropy: np.ndarray  # (N,) float64 (target)
    target_version: str
    competitor_versions: list[str]
    competitor_names: list[str]
    class_names: list[str]
    metric: str


def _models_by_version(st: ScoreStore) -> dict[str, dict[str, Any]]:
    return {m["version"]: m for m in st.list_models()}


def _default_versions(
    st: ScoreStore, target_version: str | None, competitor_versions: Sequence[str] | None
) -> tuple[str, list[str]]:
    runs = st.list_runs()
    if target_version is None or competitor_versions is None:
        if not runs:
            raise MadsegError(f"{st.root}: no score run recorded; run `madseg score --store {st.root}` first")
        last = runs[-1]
        target_version = target_version or last["target_version"]
        if competitor_versions is None:
            competitor_versions = last["competitor_versions"]
    known = _models_by_version(st)
    for v in [target_version, *competitor_versions]:
        if v not in known:
            raise MadsegError(
                f"{st.root}: model version {v} has no predictions in this store; known: "
                f"{', '.join(sorted(known)) or 'none'}"
            )
    return str(target_version), list(competitor_versions)


def load_selection_inputs(
    store_dir: str | os.PathLike[str],
    target_version: str | None = None,
    competitor_versions: Sequence[str] | None = None,
    metric: str = "miou",
) -> SelectionInputs:
    """Load the selection arrays from a store (see the module docstring)."""
    with open_store(store_dir) as st:
        tv, cvs = _default_versions(st, target_version, competitor_versions)
        models = _models_by_version(st)
        t_ids, t_areas, t_ent = st.read_areas(tv)
        keep = t_ids
        comp = []
        for cv in cvs:
            c_ids, c_areas, _ = st.read_areas(cv)
            d_ids, d = st.read_distances(tv, cv, metric)
            comp.append((c_ids, c_areas, d_ids, d))
            keep = np.intersect1d(np.intersect1d(keep, c_ids), d_ids)
        if keep.size < t_ids.size:
            log.warning(
                "%d of %d images scored by the target lack a competitor prediction or distance; "
                "they are left out (run `madseg score` with these models to complete them)",
                t_ids.size - keep.size, t_ids.size,
            )

        def take(ids: np.ndarray, arr: np.ndarray) -> np.ndarray:
            return arr[np.searchsorted(ids, keep)] if keep.size else arr[:0]

        c = int(models[tv]["num_classes"])
        return SelectionInputs(
            ids=keep,
            target_areas=take(t_ids, t_areas).reshape(keep.size, c),
            competitor_areas=np.stack([take(ci, ca).reshape(keep.size, c) for ci, ca, _, _ in comp])
            if comp else np.zeros((0, keep.size, c), np.float32),
            distances=np.stack([take(di, d) for _, _, di, d in comp]) if comp else np.zeros((0, keep.size)),
            entropy=take(t_ids, t_ent),
            target_version=tv,
            competitor_versions=cvs,
            competitor_names=_display_names([models[v]["name"] for v in cvs], cvs),
            class_names=list(models[tv]["class_names"]),
            metric=metric,
        )


def _display_names(names: list[str], versions: list[str]) -> list[str]:
    """Model names, or versions where two competitors share a name."""
    dup = {n for n, k in Counter(names).items() if k > 1}
    return [v if n in dup else n for n, v in zip(names, versions, strict=True)]


def _mask_files(folder: Path) -> Iterator[Path]:
    base = folder / "masks" if (folder / "masks").is_dir() else folder
    files = sorted(p for p in base.rglob("*.png") if p.is_file())
    if not files:
        raise MadsegError(f"{folder}: no label masks (*.png) found in {base}; give a labelled folder")
    yield from files


def bounds_from_folder(
    folder: str | os.PathLike[str],
    num_classes: int,
    method: str = "quartiles",
    *,
    min_count: int = 5,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Bounds (C, 2) from the masks in ``folder/masks`` (or ``folder``), streamed one at a time."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MadsegError(f"--bounds-from {folder}: not a folder; give a folder of labelled masks")
    masks = (read_mask(p, num_classes) for p in _mask_files(folder))
    return bounds_from_masks(masks, num_classes, method, min_count=min_count,  # type: ignore[arg-type]
                             class_names=class_names)


def _paths(store_dir: str | os.PathLike[str], ids: Sequence[str]) -> list[str | None]:
    with open_store(store_dir) as st:
        return [st.image_path(i) for i in ids]


def select_candidates(
    store_dir: str | os.PathLike[str],
    target_version: str | None = None,
    competitor_versions: Sequence[str] | None = None,
    bounds: np.ndarray | None = None,
    n3: int = 10,
    metric: str = "miou",
    *,
    inputs: SelectionInputs | None = None,
) -> list[dict[str, Any]]:
    """MAD candidates from the store (see the module docstring for the dict format)."""
    if n3 < 1:
        raise MadsegError(f"--n3 must be >= 1, got {n3}")
    inp = inputs or load_selection_inputs(store_dir, target_version, competitor_versions, metric)
    c = inp.target_areas.shape[1]
    if bounds is None:
        log.warning("no size bounds given: every predicted class area in (0, 1] is eligible")
        bounds = np.tile(np.array(NO_BOUNDS), (c, 1))
    bounds = np.asarray(bounds, dtype=np.float64)
    if bounds.shape != (c, 2):
        raise MadsegError(f"bounds must have shape ({c}, 2) for {c} classes, got {bounds.shape}")
    records = mad_select(inp.target_areas, inp.competitor_areas, inp.distances, bounds, n3)
    groups = records_by_image(records)
    ids = [str(inp.ids[i]) for i in groups]
    paths = _paths(store_dir, ids)
    out = []
    for (_img, recs), iid, path in zip(groups.items(), ids, paths, strict=True):
        out.append({
            "id": iid,
            "path": path,
            "best_rank": recs[0].rank,
            "selections": [
                {
                    "competitor": inp.competitor_names[r.competitor],
                    "competitor_version": inp.competitor_versions[r.competitor],
                    "class": inp.class_names[r.cls],
                    "class_index": r.cls,
                    "partition": r.partition,
                    "distance": r.distance,
                    "rank": r.rank,
                }
                for r in recs
            ],
        })
    return out


def target_pool(
    store_dir: str | os.PathLike[str], target_version: str | None = None
) -> tuple[str, np.ndarray, np.ndarray]:
    """``(target_version, ids (N,), entropy (N,))`` of the images the target scored, by id."""
    with open_store(store_dir) as st:
        tv, _ = _default_versions(st, target_version, [])
        ids, _, ent = st.read_areas(tv)
    return tv, ids, ent


def entropy_candidates(
    store_dir: str | os.PathLike[str], n: int, target_version: str | None = None
) -> list[dict[str, Any]]:
    """Top-``n`` images by the target's mean per-pixel entropy (largest first)."""
    tv, ids, ent = target_pool(store_dir, target_version)
    if np.isnan(ent).any():
        raise MadsegError(
            f"{int(np.isnan(ent).sum())} images have no entropy for {tv} (it was scored as a competitor); "
            f"run `madseg score` with it as --target first"
        )
    idx = entropy_select(ent, n)
    paths = _paths(store_dir, [str(ids[i]) for i in idx])
    return [{"id": str(ids[i]), "path": p, "rank": r + 1, "entropy": float(ent[i])}
            for r, (i, p) in enumerate(zip(idx.tolist(), paths, strict=True))]


def random_candidates(
    store_dir: str | os.PathLike[str], n: int, seed: int = 0, target_version: str | None = None
) -> list[dict[str, Any]]:
    """``n`` images drawn uniformly (seeded) from those the target scored."""
    _, ids, ent = target_pool(store_dir, target_version)
    idx = random_select(ids.size, n, seed)
    paths = _paths(store_dir, [str(ids[i]) for i in idx])
    return [{"id": str(ids[i]), "path": p, "rank": r + 1, "entropy": float(ent[i])}
            for r, (i, p) in enumerate(zip(idx.tolist(), paths, strict=True))]


def summarize(
    candidates: list[dict[str, Any]], method: str, *, pool_size: int, n3: int | None = None,
    competitor_names: Sequence[str] = (), class_names: Sequence[str] = (),
    bounds: np.ndarray | None = None, metric: str | None = None, target_version: str | None = None,
    competitor_versions: Sequence[str] = (),
) -> dict[str, Any]:
    """Summary of a selection: |M|, counts per (competitor, class[, partition]), and how many
    images several problems chose (histogram of problems per image)."""
    summary: dict[str, Any] = {
        "method": method, "pool_size": pool_size, "selected": len(candidates),
        "target_version": target_version,
    }
    if method != "mad":
        return summary
    counts: dict[str, dict[str, int]] = {c: dict.fromkeys(class_names[1:], 0) for c in competitor_names}
    parts: Counter[tuple[str, str, str]] = Counter()
    per_image = Counter()
    for cand in candidates:
        per_image[len(cand["selections"])] += 1
        for s in cand["selections"]:
            counts.setdefault(s["competitor"], {}).setdefault(s["class"], 0)
            counts[s["competitor"]][s["class"]] += 1
            parts[(s["competitor"], s["class"], s["partition"])] += 1
    summary.update({
        "n3": n3, "metric": metric, "competitor_versions": list(competitor_versions),
        "counts": counts,
        "counts_by_partition": [
            {"competitor": c, "class": k, "partition": p, "count": n}
            for (c, k, p), n in sorted(parts.items())
        ],
        "chosen_by_several": sum(n for k, n in per_image.items() if k > 1),
        "problems_per_image": {str(k): n for k, n in sorted(per_image.items())},
        "partitions": list(PARTITIONS),
    })
    if bounds is not None:
        summary["bounds"] = {
            name: [float(b[0]), float(b[1])] for name, b in zip(class_names, bounds, strict=False)
        }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Printable summary: a table of selections per class (rows) and competitor (columns)."""
    lines = [f"method {summary['method']}: {summary['selected']} images selected from {summary['pool_size']}"]
    if summary["method"] != "mad":
        return "\n".join(lines)
    counts: dict[str, dict[str, int]] = summary["counts"]
    comps = list(counts)
    classes = list(next(iter(counts.values())).keys()) if counts else []
    width = max([len(c) for c in classes] + [5])
    cw = [max(len(c), 5) for c in comps]
    lines.append(" " * width + "  " + "  ".join(c.rjust(w) for c, w in zip(comps, cw, strict=True)))
    for k in classes:
        lines.append(k.ljust(width) + "  " + "  ".join(
            str(counts[c].get(k, 0)).rjust(w) for c, w in zip(comps, cw, strict=True)))
    lines.append(f"|M| = {summary['selected']}; chosen by several problems: {summary['chosen_by_several']}")
    return "\n".join(lines)


def write_candidates(path: str | os.PathLike[str], candidates: list[dict[str, Any]]) -> Path:
    """Write one JSON object per line, atomically."""
    def write(fh: Any) -> None:
        for c in candidates:
            fh.write((json.dumps(c) + "\n").encode("utf-8"))

    return atomic_write(path, write)


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    return atomic_write_json(path, summary)
