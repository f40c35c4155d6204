"""Candidates: the one ``Candidate`` record, the one ``candidates.jsonl`` schema, and the selections
over a score store that produce them (I/O around the pure :mod:`sampler.select` /
:mod:`sampler.baselines`). ``madseg select`` and ``madseg round`` both call these functions, so
they write the same file.

``candidates.jsonl`` holds one JSON object per line, in the order raters should see the images
(``rank`` 1, 2, ...)::

    {"id": str, "path": str, "rank": int, "method": "mad"|"entropy"|"random",
     "entropy": float|null, "target_areas": [float] * C, "best_rank": int|null,
     "selections": [{"competitor", "competitor_version", "class", "class_index", "partition",
                     "distance", "rank"}, ...]}

``selections`` (MAD only) lists the (competitor, class, partition) problems that chose the image,
ordered by their rank; ``best_rank`` is the smallest of those ranks. :func:`read_candidates`
accepts any line with ``id`` and ``path`` (the other keys default), so a hand-written file works.

Python API:

- :class:`Candidate`, :class:`Selection`; :func:`read_candidates` / :func:`write_candidates`.
- ``load_selection_inputs(store_dir, target_version=None, competitor_versions=None, metric="miou")
  -> SelectionInputs``: the arrays ``mad_select`` takes (``ids`` (N,), ``target_areas`` (N, C),
  ``competitor_areas`` (m, N, C), ``distances`` (m, N), ``entropy`` (N,)) over the images scored
  by the target *and* every competitor, sorted by image id (so image index = rank of the id).
  Defaults: the target and competitors of the store's latest ``madseg score`` run.
  ``SelectionInputs.without(ids)`` leaves images out (e.g. those already labelled).
- ``select_candidates(store_dir, target_version=None, competitor_versions=None, bounds=None,
  n3=10, metric="miou", *, inputs=None, exclude=(), competitor_names=None) -> list[Candidate]``:
  MAD selection, ordered by (best rank, -largest distance, image index). ``bounds`` (C, 2) from
  :func:`bounds_from_folder` / :func:`sampler.bounds.bounds_from_masks`; None = no size
  constraint (logged). ``exclude``: image ids that may not be selected.
- ``entropy_candidates(store_dir, n, target_version=None, *, inputs=None, exclude=())`` /
  ``random_candidates(store_dir, n, seed=0, target_version=None, *, inputs=None, exclude=())``
  -> list[Candidate] (without ``inputs``: over every image the target scored).
- ``bounds_from_folder(folder, num_classes, method="quartiles", min_count=5, class_names=None)``:
  bounds from the label masks of a folder (``<folder>/masks/*.png`` or ``<folder>/*.png``).
- ``summarize(candidates, method, ...) -> dict``, ``format_summary(summary) -> str``,
  ``write_summary(path, summary)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.atomic import atomic_write_json, atomic_write_text
from ml_backend.errors import MadsegError
from ml_backend.imageio import read_mask

from .baselines import entropy_select, random_select
from .bounds import BOUNDS_RULES, NO_BOUNDS, bounds_from_fractions, class_area_fractions, class_bounds
from .order import rating_order
from .select import PARTITIONS, mad_select, n3_for_size, records_by_image
from .store import ScoreStore, open_store

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("mad", "entropy", "random")


# =============================================================================================
# the record and its file
# =============================================================================================


@dataclass(frozen=True)
class Selection:
    """One MAD problem that chose an image: competitor ``competitor`` (display name or the round's
    key; ``competitor_version``), class ``cls`` (name; index ``class_index``), partition
    (``"target"``/``"competitor"``), the distance and the image's 1-based rank in that problem."""

    competitor: str
    competitor_version: str | None
    cls: str
    class_index: int
    partition: str
    distance: float
    rank: int

    def to_dict(self) -> dict[str, Any]:
        return {"competitor": self.competitor, "competitor_version": self.competitor_version,
                "class": self.cls, "class_index": self.class_index, "partition": self.partition,
                "distance": self.distance, "rank": self.rank}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Selection:
        return cls(competitor=str(d.get("competitor", "")), competitor_version=d.get("competitor_version"),
                   cls=str(d.get("class", "")), class_index=int(d.get("class_index", -1)),
                   partition=str(d.get("partition", "")), distance=float(d.get("distance", 0.0)),
                   rank=int(d.get("rank", 0)))


@dataclass(frozen=True)
class Candidate:
    """One selected image (one line of ``candidates.jsonl``; see the module docstring).

    ``rank``: 1-based position in the order raters should see the candidates (0 = unknown);
    ``target_areas``: (C,) the target's predicted area fraction per class; ``entropy``: the
    target's mean per-pixel entropy (None = unknown); ``selections``: MAD problems, by rank.
    """

    id: str
    path: str
    rank: int = 0
    method: str = "mad"
    entropy: float | None = None
    target_areas: tuple[float, ...] = ()
    selections: tuple[Selection, ...] = ()

    @property
    def best_rank(self) -> int | None:
        """The smallest rank among the image's MAD problems (None without selections)."""
        return min((s.rank for s in self.selections), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "rank": self.rank, "method": self.method,
                "entropy": self.entropy, "target_areas": list(self.target_areas),
                "best_rank": self.best_rank, "selections": [s.to_dict() for s in self.selections]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "candidate") -> Candidate:
        """A candidate from a JSON object; MadsegError naming ``where`` if it lacks ``id``/``path``."""
        if not isinstance(d, Mapping) or not d.get("id") or not d.get("path"):
            raise MadsegError(f"{where}: a candidate needs 'id' and 'path'")
        sels = d.get("selections") or []
        if not isinstance(sels, list) or not all(isinstance(s, Mapping) for s in sels):
            raise MadsegError(f"{where}: 'selections' must be a list of objects")
        ent = d.get("entropy")
        try:
            return cls(id=str(d["id"]), path=str(d["path"]), rank=int(d.get("rank") or 0),
                       method=str(d.get("method") or "mad"), entropy=None if ent is None else float(ent),
                       target_areas=tuple(float(a) for a in d.get("target_areas") or ()),
                       selections=tuple(Selection.from_dict(s) for s in sels))
        except (TypeError, ValueError) as exc:
            raise MadsegError(f"{where}: malformed candidate ({exc}); regenerate the file") from None


def read_candidates(path: str | os.PathLike[str]) -> list[Candidate]:
    """The candidates of a ``candidates.jsonl`` file, in file order (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MadsegError(f"{path}: no candidates file; run `madseg select` or the round's select stage") \
            from None
    except OSError as exc:
        raise MadsegError(f"{path}: cannot read candidates ({exc.strerror or exc})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MadsegError(f"{path}:{n}: not valid JSON ({exc.msg}); fix or regenerate the file") from None
        out.append(Candidate.from_dict(rec, f"{path}:{n}"))
    return out


def write_candidates(path: str | os.PathLike[str], candidates: Sequence[Candidate]) -> Path:
    """Write the candidates, one JSON object per line (schema in the module docstring), atomically."""
    text = "".join(json.dumps(c.to_dict()) + "\n" for c in candidates)
    return atomic_write_text(path, text)


# =============================================================================================
# selection inputs from a score store
# =============================================================================================


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

    def without(self, exclude: Iterable[str]) -> SelectionInputs:
        """The same inputs minus the images whose id is in ``exclude``."""
        ex = {str(e) for e in exclude}
        if not ex:
            return self
        keep = np.array([str(i) not in ex for i in self.ids.tolist()], dtype=bool)
        return replace(self, ids=self.ids[keep], target_areas=self.target_areas[keep],
                       competitor_areas=self.competitor_areas[:, keep], distances=self.distances[:, keep],
                       entropy=self.entropy[keep])


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


def mask_area_fractions(masks: Iterable[str | os.PathLike[str]], num_classes: int) -> np.ndarray:
    """Area fractions (M, C) of the label masks at ``masks`` (paths), read one at a time."""
    rows = [class_area_fractions(read_mask(p, num_classes), num_classes) for p in masks]
    return np.stack(rows) if rows else np.zeros((0, num_classes))


def folder_area_fractions(folder: str | os.PathLike[str], num_classes: int) -> np.ndarray:
    """Area fractions (M, C) of the masks in ``folder/masks`` (or ``folder``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MadsegError(f"--bounds-from {folder}: not a folder; give a folder of labelled masks")
    return mask_area_fractions(_mask_files(folder), num_classes)


def bounds_from_folder(
    folder: str | os.PathLike[str],
    num_classes: int,
    method: str = "quartiles",
    *,
    min_count: int = 5,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Bounds (C, 2) from the masks in ``folder/masks`` (or ``folder``) by the S(0) rule."""
    fractions = folder_area_fractions(folder, num_classes)
    return bounds_from_fractions(fractions, method, min_count, "pooled", class_names)  # type: ignore[arg-type]


def selection_bounds(
    inputs: SelectionInputs,
    rule: str = "auto",
    s0_fractions: np.ndarray | None = None,
    method: str = "quartiles",
    min_count: int = 5,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Size bounds (C, 2) for ``inputs`` by ``rule`` (``sampler.bounds.class_bounds``: S(0)
    fractions (M, C) where a class has enough masks, else the pool's predictions) and the report
    (rule, method, per-class source and counts) that the round keeps in its state."""
    if rule not in BOUNDS_RULES:
        raise MadsegError(f"unknown bounds rule {rule!r}; choose one of {', '.join(BOUNDS_RULES)}")
    if rule in ("s0",) and (s0_fractions is None or len(s0_fractions) == 0):
        raise MadsegError("bounds rule 's0' needs S(0) masks (--bounds-from FOLDER)")
    return class_bounds(s0_fractions, inputs.target_areas, inputs.competitor_areas, rule,
                        method, min_count, inputs.class_names)  # type: ignore[arg-type]


def _paths(store_dir: str | os.PathLike[str], ids: Sequence[str]) -> list[str | None]:
    with open_store(store_dir) as st:
        return [st.image_path(i) for i in ids]


def _with_paths(store_dir: str | os.PathLike[str], inp: SelectionInputs, order: Sequence[int]
                ) -> list[tuple[int, str]]:
    """(image index, path) for the images of ``order`` that have a known path, in order."""
    ids = [str(inp.ids[i]) for i in order]
    out = []
    for i, iid, p in zip(order, ids, _paths(store_dir, ids), strict=True):
        if p is None:
            log.warning("image %s has no known path in the store; left out of the candidates", iid)
            continue
        out.append((int(i), p))
    return out


def _candidate(inp: SelectionInputs, i: int, path: str, rank: int, method: str,
               selections: Sequence[Selection] = ()) -> Candidate:
    ent = float(inp.entropy[i])
    return Candidate(id=str(inp.ids[i]), path=path, rank=rank, method=method,
                     entropy=None if ent != ent else ent,
                     target_areas=tuple(round(float(a), 6) for a in inp.target_areas[i]),
                     selections=tuple(selections))


def select_candidates(
    store_dir: str | os.PathLike[str],
    target_version: str | None = None,
    competitor_versions: Sequence[str] | None = None,
    bounds: np.ndarray | None = None,
    n3: int = 10,
    metric: str = "miou",
    *,
    inputs: SelectionInputs | None = None,
    exclude: Iterable[str] = (),
    competitor_names: Sequence[str] | None = None,
    order: str = "failures",
) -> list[Candidate]:
    """All of M from the store with the given ``bounds`` (C, 2), in the rating ``order``
    (:func:`sampler.order.rating_order`).

    ``competitor_names`` (one per competitor) replaces the store's display names in the records
    (the round uses its competitor keys). :func:`mad_candidates` adds the bounds rule and the
    rating budget.
    """
    if n3 < 1:
        raise MadsegError(f"--n3 must be >= 1, got {n3}")
    inp = inputs or load_selection_inputs(store_dir, target_version, competitor_versions, metric)
    inp = inp.without(exclude)
    names = list(competitor_names) if competitor_names is not None else inp.competitor_names
    if len(names) != len(inp.competitor_versions):
        raise MadsegError(f"{len(names)} competitor names for {len(inp.competitor_versions)} competitors")
    c = inp.target_areas.shape[1]
    if bounds is None:
        log.warning("no size bounds given: every predicted class area in (0, 1] is eligible")
        bounds = np.tile(np.array(NO_BOUNDS), (c, 1))
    bounds = np.asarray(bounds, dtype=np.float64)
    if bounds.shape != (c, 2):
        raise MadsegError(f"bounds must have shape ({c}, 2) for {c} classes, got {bounds.shape}")
    records = mad_select(inp.target_areas, inp.competitor_areas, inp.distances, bounds, n3)
    groups = records_by_image(records)
    ranked = rating_order(records, inp.target_areas, inp.competitor_areas, inp.distances, order).tolist()
    out = []
    for i, path in _with_paths(store_dir, inp, ranked):
        sels = [Selection(competitor=names[r.competitor],
                          competitor_version=inp.competitor_versions[r.competitor],
                          cls=inp.class_names[r.cls], class_index=r.cls, partition=r.partition,
                          distance=r.distance, rank=r.rank) for r in groups[i]]
        out.append(_candidate(inp, i, path, len(out) + 1, "mad", sels))
    return out


@dataclass
class MadSelection:
    """What :func:`mad_candidates` chose: ``candidates`` (M in rating order, cut at the rating
    budget), ``m_size`` (|M| before the budget), the bounds (C, 2) and their report, the ``n3``
    used."""

    candidates: list[Candidate]
    m_size: int
    pool_size: int
    bounds: np.ndarray
    bounds_report: dict[str, Any]
    order: str
    rating_budget: int
    n3: int

    def info(self) -> dict[str, Any]:
        """JSON-able facts for the round's state and the summary (the candidates excepted)."""
        return {"n_candidates": len(self.candidates), "m_size": self.m_size, "pool_size": self.pool_size,
                "n_records": sum(len(c.selections) for c in self.candidates), "order": self.order,
                "rating_budget": self.rating_budget, "n3": self.n3, "bounds_rule": self.bounds_report}


def mad_candidates(
    store_dir: str | os.PathLike[str],
    inputs: SelectionInputs,
    *,
    n3: int,
    bounds: str = "auto",
    s0_fractions: np.ndarray | None = None,
    bounds_method: str = "quartiles",
    min_count: int = 5,
    order: str = "failures",
    rating_budget: int = 0,
    exclude: Iterable[str] = (),
    competitor_names: Sequence[str] | None = None,
) -> MadSelection:
    """The selection entry point of ``madseg select`` and ``madseg round``: size bounds by the
    rule ``bounds`` (:func:`selection_bounds`, over ``inputs`` minus ``exclude``), MAD with
    ``n3`` images per problem, M in the rating ``order``, and only M's first ``rating_budget``
    candidates kept when ``rating_budget`` > 0 (the rating budget R; the experiment's
    ``[selection] rating_budget``, ``madseg select --budget``). When R is larger than M, n3 is
    raised to the smallest value whose M holds R images (``sampler.select.n3_for_size``), so the
    budget is spent on MAD's picks; ``n3`` in :meth:`MadSelection.info` is the value used."""
    if rating_budget < 0:
        raise MadsegError(f"rating budget must be >= 0 (0 = all of M), got {rating_budget}")
    inp = inputs.without(exclude)
    b, report = selection_bounds(inp, bounds, s0_fractions, bounds_method, min_count)
    n3_used = n3
    if rating_budget:  # a budget beyond |M| is filled by more images per problem (still MAD's picks)
        n3_used = n3_for_size(inp.target_areas, inp.competitor_areas, inp.distances, b, n3, rating_budget)
        if n3_used > n3:
            log.info("rating budget %d > |M| at n3 = %d: n3 raised to %d", rating_budget, n3, n3_used)
    cands = select_candidates(store_dir, bounds=b, n3=n3_used, inputs=inp, competitor_names=competitor_names,
                              order=order)
    m_size = len(cands)
    if rating_budget and rating_budget < m_size:
        log.info("rating budget %d: the first %d of %d candidates go to the raters", rating_budget,
                 rating_budget, m_size)
        cands = cands[:rating_budget]
    return MadSelection(candidates=cands, m_size=m_size, pool_size=int(inp.ids.size), bounds=b,
                        bounds_report=report, order=order, rating_budget=rating_budget, n3=n3_used)


def target_pool(
    store_dir: str | os.PathLike[str], target_version: str | None = None
) -> SelectionInputs:
    """The selection inputs of the images the target scored (no competitors): for entropy/random."""
    return load_selection_inputs(store_dir, target_version, [])


def entropy_candidates(
    store_dir: str | os.PathLike[str], n: int, target_version: str | None = None, *,
    inputs: SelectionInputs | None = None, exclude: Iterable[str] = (),
) -> list[Candidate]:
    """Top-``n`` images by the target's mean per-pixel entropy (largest first), minus ``exclude``."""
    inp = (inputs or target_pool(store_dir, target_version)).without(exclude)
    if np.isnan(inp.entropy).any():
        raise MadsegError(
            f"{int(np.isnan(inp.entropy).sum())} images have no entropy for {inp.target_version} (it was "
            f"scored as a competitor); run `madseg score` with it as --target first"
        )
    idx = entropy_select(inp.entropy, n).tolist()
    picked = _with_paths(store_dir, inp, idx)
    return [_candidate(inp, i, p, r + 1, "entropy") for r, (i, p) in enumerate(picked)]


def random_candidates(
    store_dir: str | os.PathLike[str], n: int, seed: int = 0, target_version: str | None = None, *,
    inputs: SelectionInputs | None = None, exclude: Iterable[str] = (),
) -> list[Candidate]:
    """``n`` images drawn uniformly (seeded) from those the target scored, minus ``exclude``."""
    inp = (inputs or target_pool(store_dir, target_version)).without(exclude)
    idx = random_select(inp.ids.size, n, seed).tolist()
    picked = _with_paths(store_dir, inp, idx)
    return [_candidate(inp, i, p, r + 1, "random") for r, (i, p) in enumerate(picked)]


def summarize(
    candidates: Sequence[Candidate], method: str, *, pool_size: int, n3: int | None = None,
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
        per_image[len(cand.selections)] += 1
        for s in cand.selections:
            counts.setdefault(s.competitor, {}).setdefault(s.cls, 0)
            counts[s.competitor][s.cls] += 1
            parts[(s.competitor, s.cls, s.partition)] += 1
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
    m = summary.get("m_size", summary["selected"])
    rated = f" (the first {summary['selected']} go to the raters)" if m != summary["selected"] else ""
    lines.append(f"|M| = {m}{rated}; chosen by several problems: {summary['chosen_by_several']}")
    if summary.get("bounds_rule"):
        counts = summary["bounds_rule"]["counts"]
        lines.append(f"size bounds ({summary['bounds_rule']['rule']}): "
                     + ", ".join(f"{n} classes from {k}" for k, n in counts.items() if n)
                     + (f"; n3 = {summary['n3']}" if summary.get("n3") is not None else ""))
    return "\n".join(lines)


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    return atomic_write_json(path, summary)
