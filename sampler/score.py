"""Scoring a pool: run the target and the competitors once per image and fill the score store.

``score_pool(pool, target, competitors, store_dir, *, batch_size=8, workers=None, device=None,
resolution=None, progress=True) -> ScoreStats``

``target``/``competitors`` are loaded zoo models (``SegmentationModel``) or
:class:`ml_backend.modelspec.ModelSpec`\\ s; at this public edge a spec dict ``{name, checkpoint,
options}`` (read by ``ModelSpec.from_dict``) or a string ``name[,checkpoint=...,key=value]`` (read by
``ModelSpec.parse``) is taken too.

Two streamed phases:

1. *index*: every pool entry (see :mod:`sampler.pool`) is stat-ed; entries whose size and mtime
   match the store are not read again, the others are read (files or URLs) and hashed to their
   content id in ``max(workers, 2)`` I/O threads. One ``files`` row per entry, one transaction per batch
   of entries. Under torchrun, rank ``r`` of ``N`` indexes the entries ``i % N == r``.
2. *score*: a ``DataLoader`` (``workers`` processes, prefetch) over the distinct image ids of
   this run, sorted by id (so exact duplicates are scored once). Under torchrun, rank ``r`` of
   ``N`` takes the ids with ``bucket(id) % N == r``, so every image is scored by exactly one
   rank. For each image a worker checks the store for what is missing (models without a stored
   label map, (target, competitor) pairs without a distance), decodes the image only if a model
   must run, applies each missing model's preprocessor (once per distinct preprocessor), and
   loads stored label maps of the models that need not run. The main process runs each missing
   model on its sub-batch, takes the mean per-pixel entropy (target only, at its output
   resolution) and the arg-max label map at the working resolution (default: the target's input
   size; a larger output is arg-maxed then resampled nearest-neighbour, a smaller one is
   upsampled bilinearly before the arg-max), computes the distances of the target's map to every
   competitor's map (both metrics, batched confusion matrices, whose margins give the class area
   fractions), encodes the maps as palette PNGs and commits the whole batch in one transaction.

Hence: competitor predictions are reused across target versions (re-scoring a new target runs
only the target and the distances); an interrupted run (Ctrl-C, ``kill -9``) re-run with the same
arguments only does what is missing; memory stays bounded (a few batches in flight, nothing per
pool image is kept). Bad images are recorded (not retried while their bytes are unchanged) and
listed with duplicates and converted images in ``<store>/pool_report.tsv``.

Scale-out: the same call under ``torchrun --nproc-per-node N madseg score ...`` (see
:mod:`sampler.distributed`): each rank writes its own shard; rank 0 merges the shards at the end.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ml_backend.atomic import atomic_write
from ml_backend.errors import ImageReadError, MadsegError, ModelError
from ml_backend.modelspec import ModelSpec

from . import distributed as D
from .metrics import (
    area_fractions_torch,
    distances_from_confusion_torch,
    labels_from_probs_torch,
    mean_entropy_torch,
    prediction_confusion_torch,
)
from .pool import check_sources, content_id, decode_image, iter_pool_entries, read_source, stat_source
from .store import (
    REPORT_NAME,
    SHARD_DIR,
    ScoreStore,
    decode_label_png,
    encode_label_png,
    id_bucket,
    merge_shards,
)

log = logging.getLogger(__name__)

INDEX_BATCH = 64


@dataclass
class ScoreStats:
    """What a ``score_pool`` call did (summed over ranks)."""

    entries: int = 0  # pool entries listed (with repeats)
    paths: int = 0  # distinct paths/URLs
    hashed: int = 0  # entries read and hashed in this run (others: unchanged since last index)
    unreadable: int = 0  # entries that could not be read (missing, empty, download failed)
    images: int = 0  # distinct image contents
    duplicates: int = 0  # paths whose content another path already has
    bad: int = 0  # contents that are not readable images
    converted: int = 0  # images converted to RGB from another mode
    already_done: int = 0  # images with nothing left to compute
    inferred: dict[str, int] = field(default_factory=dict)  # model version -> images run
    distances: int = 0  # (image, competitor) distances computed
    seconds: float = 0.0
    run_id: str = ""
    target_version: str = ""
    competitor_versions: list[str] = field(default_factory=list)
    report: str = ""
    rank_images: list[int] = field(default_factory=list)  # images the target ran on, per rank
    #: wall seconds of the score phase (rank 0): wait_data (for the loader), forward, post
    #: (labels, entropy, distances, areas, PNG), write (SQLite commit)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ models
def resolve_model(model: Any, device: str | None) -> Any:
    """A loaded model from a model object, a ModelSpec, a spec dict or a ``name,key=value`` string
    (the last two read into a ModelSpec here, once)."""
    if hasattr(model, "forward") and hasattr(model, "preprocessor") and hasattr(model, "version"):
        return model
    from ml_backend.zoo import load_model_spec

    if isinstance(model, str):
        model = ModelSpec.parse(model)
    elif isinstance(model, Mapping):
        model = ModelSpec.from_dict(model)
    if not isinstance(model, ModelSpec):
        raise ModelError(f"cannot use {model!r} as a model; give a zoo model, a ModelSpec or a spec dict")
    return load_model_spec(model, device=device)


# ------------------------------------------------------------------------------------------ phase 1
def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _index_known(store: ScoreStore, entry: str) -> tuple | None:
    """The index row of ``entry`` if it needs no reading (unchanged file, missing, empty), else None.

    Rows are ``(path, size, mtime_ns, image_id, error, hashed)``.
    """
    try:
        st = stat_source(entry)
    except ImageReadError as exc:
        return (entry, None, None, None, str(exc), False)
    if st is None:  # URL: always fetched (its content may have changed)
        return None
    size, mtime = st
    if size == 0:
        return (entry, 0, mtime, None, f"{entry}: empty file (0 bytes)", False)
    row = store.lookup_file(entry)
    if row and row.image_id and not row.error and row.size == size and row.mtime_ns == mtime:
        return (entry, size, mtime, row.image_id, None, False)
    return None


def _index_read(entry: str, timeout: float) -> tuple:
    """Read and hash one entry (runs in an I/O thread; hashing releases the GIL)."""
    try:
        st = stat_source(entry)
        data = read_source(entry, timeout)
    except ImageReadError as exc:
        return (entry, None, None, None, str(exc), True)
    size, mtime = st if st is not None else (len(data), None)
    if not data:
        return (entry, size, mtime, None, f"{entry}: empty file (0 bytes)", True)
    return (entry, size, mtime, content_id(data), None, True)


def _iter_index_rows(store: ScoreStore, sources: Sequence[str], rank: int, world: int, threads: int,
                     timeout: float) -> Iterator[tuple]:
    """Index rows of this rank's entries, in order; reading/hashing in ``threads`` I/O threads with
    a bounded number in flight (memory stays constant)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    pending: deque[Future | tuple] = deque()
    limit = max(4 * threads, 16)
    with ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="madseg-index") as pool:
        for i, entry in enumerate(iter_pool_entries(sources)):
            if i % world != rank:
                continue
            known = _index_known(store, entry)
            pending.append(known if known is not None else pool.submit(_index_read, entry, timeout))
            while len(pending) > limit or (pending and isinstance(pending[0], tuple)):
                head = pending.popleft()
                yield head if isinstance(head, tuple) else head.result()
        while pending:
            head = pending.popleft()
            yield head if isinstance(head, tuple) else head.result()


def _list_collate(items: list[Any]) -> list[Any]:
    return items


# ------------------------------------------------------------------------------------------ phase 2
@dataclass(frozen=True)
class _Plan:
    """What the score workers need to know (picklable)."""

    store_root: str
    wal: bool
    run_id: str
    rank: int
    world: int
    target_version: str
    competitor_versions: tuple[str, ...]
    preprocessors: tuple[tuple[str, Any], ...]  # (version, preprocessor) for every model
    timeout: float


class _ScoreDataset(IterableDataset):
    """Image ids of this rank -> work items (see ``_load``)."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan
        wid, nw = _worker_slot()
        store = ScoreStore(plan.store_root, writer_rank=None, wal=plan.wal, check=False)
        try:
            k = 0
            for image_id, path in store.iter_run_ids(plan.run_id):
                if id_bucket(image_id) % plan.world != plan.rank:
                    continue
                k += 1
                if (k - 1) % nw == wid:
                    yield self._load(store, image_id, path)
        finally:
            store.close()

    def _load(self, store: ScoreStore, image_id: str, path: str) -> dict[str, Any]:
        plan = self.plan
        item: dict[str, Any] = {"id": image_id, "path": path}
        if store.bad_reason(image_id) is not None:
            item["kind"] = "known_bad"
            return item
        done = store.done_models(image_id)
        tv = plan.target_version
        if tv in done and not store.has_entropy(tv, image_id):
            done.discard(tv)  # scored before as a competitor (no entropy): run it as the target
        need_models = [v for v, _ in plan.preprocessors if v not in done]
        need_dist = [j for j, cv in enumerate(plan.competitor_versions)
                     if not store.has_distance(tv, cv, image_id)]
        if not need_models and not need_dist:
            item["kind"] = "done"
            return item
        item["kind"] = "image"
        item["need_models"] = need_models
        item["need_dist"] = need_dist
        if need_models:
            try:
                data = read_source(path, plan.timeout)
            except ImageReadError as exc:
                return {**item, "kind": "error", "error": str(exc)}
            if content_id(data) != image_id:
                return {**item, "kind": "error",
                        "error": f"{path}: file changed since it was indexed; run the command again"}
            try:
                rgb, mode = decode_image(data, path)
            except ImageReadError as exc:
                return {**item, "kind": "bad", "error": str(exc)}
            item["size"] = (int(rgb.shape[0]), int(rgb.shape[1]))
            item["mode"] = mode
            preps = dict(plan.preprocessors)
            done_inputs: dict[Any, torch.Tensor] = {}  # models with equal preprocessors share the input
            inputs = {}
            for v in need_models:
                key = _prep_key(preps[v])
                if key not in done_inputs:
                    done_inputs[key] = preps[v](rgb)
                inputs[v] = done_inputs[key]
            item["inputs"] = inputs
        stored = {}
        wanted = set()
        if need_dist:
            wanted.add(tv)
            wanted.update(plan.competitor_versions[j] for j in need_dist)
        for v in wanted - set(need_models):
            data = store.label_png(v, image_id)
            if data is None:  # only if the store was edited by hand
                raise MadsegError(f"{plan.store_root}: label map of {v} for {image_id} vanished; re-run")
            stored[v] = decode_label_png(data)
        item["stored"] = stored
        return item


def _prep_key(prep: Any) -> Any:
    """Preprocessors that compare equal (same size, mean, std) produce the same tensor."""
    try:
        hash(prep)
    except TypeError:
        return id(prep)
    return (type(prep), prep)


def _make_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Group the model inputs of a batch per model version: ``{v: (positions, [b,3,h,w])}``."""
    groups: dict[str, list[int]] = {}
    for pos, it in enumerate(items):
        for v in it.get("inputs", {}):
            groups.setdefault(v, []).append(pos)
    batches = {v: (pos, torch.stack([items[p]["inputs"].pop(v) for p in pos])) for v, pos in groups.items()}
    return {"items": items, "batches": batches}


# ------------------------------------------------------------------------------------------ main
def _norm_sources(pool: Any) -> list[str]:
    if isinstance(pool, (str, os.PathLike)):
        return [str(pool)]
    return [str(p) for p in pool]


def _progress(total: int | None, desc: str, enabled: bool, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


def _loader(dataset: IterableDataset, batch_size: int, workers: int, collate: Any, pin: bool) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=2, persistent_workers=False)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      pin_memory=pin, **kwargs)


def auto_workers(device: str = "cpu") -> int:
    """Default number of DataLoader workers.

    On a GPU, up to 8 (one core left for the main process). On the CPU, only the cores that the
    main process's torch threads leave free: workers decoding on the cores that run the forward
    pass slow it down by more than the decoding costs (measured on 2 cores: the pipeline reached
    0.80-0.92 of the bare forward throughput with 1-2 workers, 0.94-0.98 with 0), so on a machine
    without spare cores images are decoded in the main process between batches.
    """
    cpus = os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, min(8, cpus - 1))
    return max(0, min(8, cpus - torch.get_num_threads()))


def score_pool(
    pool: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    target: Any,
    competitors: Sequence[Any],
    store_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    workers: int | None = None,
    device: str | None = None,
    resolution: tuple[int, int] | None = None,
    progress: bool = True,
    fetch_timeout: float = 30.0,
) -> ScoreStats:
    """Score ``pool`` with ``target`` and ``competitors`` into the store at ``store_dir``.

    Args:
        pool: folder(s), image(s), list file(s) or URL(s) (see :mod:`sampler.pool`).
        target, competitors: models or specs (see the module docstring).
        store_dir: the score store directory (created if missing).
        batch_size: images per inference batch (and per store transaction).
        workers: DataLoader worker processes doing reading, decoding and preprocessing while the
            main process runs the models (and I/O threads for indexing). None = :func:`auto_workers`.
        device: torch device (None: CUDA if available, else CPU; under torchrun ``cuda:LOCAL_RANK``).
        resolution: working resolution (H, W) of stored label maps, areas and distances; default
            the target's input size when the store is created; fixed per store afterwards.
        progress: show tqdm progress bars (rank 0 only).
    Returns:
        :class:`ScoreStats` summed over ranks. Raises :class:`MadsegError` for bad arguments.
    """
    if batch_size < 1:
        raise MadsegError(f"--batch-size must be >= 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise MadsegError(f"--workers must be >= 0, got {workers}")
    t0 = time.perf_counter()
    sources = _norm_sources(pool)
    check_sources(sources)  # MadsegError for a missing or unusable source, before any work
    ctx = D.init_distributed(device)
    try:
        return _score(ctx, sources, target, competitors, Path(store_dir), batch_size, workers,
                      D.rank_device(ctx, device), resolution, progress, fetch_timeout, t0)
    finally:
        D.shutdown(ctx)


def _score(ctx: D.DistContext, sources: list[str], target: Any, competitors: Sequence[Any], root: Path,
           batch_size: int, workers: int, device: str | None, resolution: tuple[int, int] | None,
           progress: bool, timeout: float, t0: float) -> ScoreStats:
    tmodel = resolve_model(target, device)
    cmodels = [resolve_model(c, device) for c in competitors]
    models = [tmodel, *cmodels]
    if workers is None:
        workers = auto_workers(str(getattr(tmodel, "device", "cpu")))
        log.debug("using %d data-loading worker(s)", workers)
    versions = [m.version for m in models]
    if len(set(versions)) != len(versions):
        raise MadsegError(f"the target and competitors must be different model versions, got {versions}")
    for m in cmodels:
        if m.num_classes != tmodel.num_classes:
            raise MadsegError(
                f"competitor {m.name} ({m.version}) has {m.num_classes} classes, the target "
                f"{tmodel.num_classes}; they must predict the same class list"
            )
    wal = ctx.single_host
    store = ScoreStore(root, writer_rank=ctx.rank, wal=wal)
    show = progress and ctx.is_main
    try:
        if ctx.is_main:
            meta = store.ensure_meta(resolution, tmodel.num_classes, tmodel.class_names, tmodel.input_size)
            run_id = uuid.uuid4().hex
        else:
            meta, run_id = None, ""
        run_id = D.broadcast_object(ctx, run_id)
        D.barrier(ctx)
        if meta is None:
            meta = store.ensure_meta(resolution, tmodel.num_classes, tmodel.class_names, tmodel.input_size)
        started = time.time()
        with store.transaction() as conn:
            for m in models:
                store.put_model(conn, m)
            store.put_run(conn, run_id, started, tmodel.version, [m.version for m in cmodels], sources,
                          meta.resolution)
        stats = ScoreStats(run_id=run_id, target_version=tmodel.version,
                           competitor_versions=[m.version for m in cmodels])
        _index_phase(ctx, store, sources, run_id, workers, timeout, show, stats)
        D.barrier(ctx)
        _score_phase(ctx, store, models, meta.resolution, meta.num_classes, run_id, batch_size, workers,
                     timeout, wal, show, stats, device)
    finally:
        store.close()
    D.barrier(ctx)
    all_stats = D.gather_objects(ctx, stats)
    total = _sum_stats(all_stats)
    if ctx.is_main:
        if len(list((root / SHARD_DIR).glob("shard-*.sqlite"))) > 1:
            merge_shards(root, wal=wal)
        with ScoreStore(root, writer_rank=None, wal=wal) as rs:
            _write_report(rs, run_id, total)
        total.report = str(root / "pool_report.tsv")
    total.seconds = time.perf_counter() - t0
    D.barrier(ctx)
    return total


def _sum_stats(parts: list[ScoreStats]) -> ScoreStats:
    out = ScoreStats(run_id=parts[0].run_id, target_version=parts[0].target_version,
                     competitor_versions=list(parts[0].competitor_versions))
    inferred: Counter[str] = Counter()
    for p in parts:
        for f in ("entries", "hashed", "unreadable", "bad", "already_done", "distances"):
            setattr(out, f, getattr(out, f) + getattr(p, f))
        inferred.update(p.inferred)
    out.inferred = dict(inferred)
    out.rank_images = [p.inferred.get(p.target_version, 0) for p in parts]
    out.timings = {k: round(v, 3) for k, v in parts[0].timings.items()}
    return out


def _index_phase(ctx: D.DistContext, store: ScoreStore, sources: list[str], run_id: str, workers: int,
                 timeout: float, show: bool, stats: ScoreStats) -> None:
    bar = _progress(None, "index pool", show, "file")
    rows: list[tuple] = []

    def flush() -> None:
        now = time.time()
        with store.transaction() as conn:
            store.put_files(conn, [(p, s, mt, iid, err, run_id, now) for p, s, mt, iid, err, _ in rows])
        stats.entries += len(rows)
        stats.hashed += sum(1 for r in rows if r[5])
        bar.update(len(rows))
        rows.clear()

    try:
        for row in _iter_index_rows(store, sources, ctx.rank, ctx.world, max(workers, 2), timeout):
            rows.append(row)
            if len(rows) >= INDEX_BATCH:
                flush()
        if rows:
            flush()
    finally:
        bar.close()


def _score_phase(ctx: D.DistContext, store: ScoreStore, models: list[Any], res: tuple[int, int],
                 num_classes: int, run_id: str, batch_size: int, workers: int, timeout: float, wal: bool,
                 show: bool, stats: ScoreStats, device: str | None) -> None:
    tmodel, cmodels = models[0], models[1:]
    by_version = {m.version: m for m in models}
    plan = _Plan(str(store.root), wal, run_id, ctx.rank, ctx.world, tmodel.version,
                 tuple(m.version for m in cmodels), tuple((m.version, m.preprocessor()) for m in models),
                 timeout)
    total = sum(1 for iid, _ in store.iter_run_ids(run_id) if id_bucket(iid) % ctx.world == ctx.rank)
    pin = str(getattr(tmodel, "device", "cpu")).startswith("cuda")
    # Workers deliver chunks of batch_size / workers items, so the first full batch is ready after
    # each worker has loaded one chunk (not after one worker has loaded a whole batch).
    chunk = -(-batch_size // max(workers, 1))
    loader = _loader(_ScoreDataset(plan), chunk, workers, _list_collate, pin)
    bar = _progress(total, "score images", show, "img")
    clock = stats.timings
    buffer: list[dict[str, Any]] = []

    def run(items: list[dict[str, Any]]) -> None:
        _score_batch(store, _make_batch(items), by_version, tmodel.version, plan.competitor_versions, res,
                     num_classes, stats)
        bar.update(len(items))

    try:
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            got = next(it, None)
            clock["wait_data"] = clock.get("wait_data", 0.0) + time.perf_counter() - t0
            if got is None:
                break
            buffer.extend(got)
            while len(buffer) >= batch_size:
                run(buffer[:batch_size])
                del buffer[:batch_size]
        if buffer:
            run(buffer)
    finally:
        bar.close()


def _labels_at(probs: torch.Tensor, res: tuple[int, int]) -> torch.Tensor:
    """Label maps (B, H, W) uint8 at the working resolution ``res`` from probabilities (B, C, h, w).

    At or above the working resolution: arg-max at the model's resolution, then nearest-neighbour
    (pixel-centre) resampling; below it: bilinear upsampling of the probabilities, then arg-max.
    """
    h, w = probs.shape[2:]
    if (h, w) == tuple(res):
        return labels_from_probs_torch(probs)
    if h >= res[0] and w >= res[1]:
        lab = labels_from_probs_torch(probs)
        return F.interpolate(lab[:, None], size=res, mode="nearest-exact")[:, 0]
    up = F.interpolate(probs.float(), size=res, mode="bilinear", align_corners=False)
    return labels_from_probs_torch(up)


def _score_batch(store: ScoreStore, batch: dict[str, Any], by_version: dict[str, Any], tv: str,
                 cvs: tuple[str, ...], res: tuple[int, int], num_classes: int, stats: ScoreStats) -> None:
    """Run the missing models on one batch, compute areas/entropy/distances, commit it at once.

    Label maps: see :func:`_labels_at`; the mean entropy is computed for the target only, at its
    output resolution; areas come from the confusion matrices of the
    distances (row sums: target, column sums: competitor) when there are any, else a bincount.
    """
    items = batch["items"]
    labels: list[dict[str, torch.Tensor]] = [{} for _ in items]
    ran: dict[str, tuple[list[int], torch.Tensor, list[float | None]]] = {}
    npix = res[0] * res[1]
    clock = stats.timings
    t_start = time.perf_counter()
    t_fwd = 0.0
    with torch.inference_mode():
        for v, (positions, x) in batch["batches"].items():
            t0 = time.perf_counter()
            probs = by_version[v].forward(x)
            t_fwd += time.perf_counter() - t0
            if probs.shape[1] != num_classes:
                raise ModelError(f"model {v} returned {probs.shape[1]} classes, the store has {num_classes}")
            ent: list[float | None] = [None] * len(positions)
            if v == tv:
                ent = mean_entropy_torch(probs).tolist()
            lab = _labels_at(probs, res)
            del probs
            for i, pos in enumerate(positions):
                labels[pos][v] = lab[i]
            ran[v] = (positions, lab, ent)
            stats.inferred[v] = stats.inferred.get(v, 0) + len(positions)
        for pos, it in enumerate(items):
            for v, arr in it.get("stored", {}).items():
                labels[pos][v] = torch.from_numpy(arr)
        dist_rows: list[tuple] = []
        areas_of: dict[tuple[str, int], np.ndarray] = {}  # (version, position) -> (C,) float32
        for j, cv in enumerate(cvs):
            positions = [p for p, it in enumerate(items) if it["kind"] == "image" and j in it["need_dist"]]
            if not positions:
                continue
            a = torch.stack([labels[p][tv] for p in positions])
            b = torch.stack([labels[p][cv] for p in positions])
            cm = prediction_confusion_torch(a, b, num_classes)
            d = distances_from_confusion_torch(cm)
            miou, pa = d["miou"].tolist(), d["pixel_accuracy"].tolist()
            dist_rows.extend((tv, cv, items[p]["id"], miou[i], pa[i]) for i, p in enumerate(positions))
            rows_t = (cm.sum(2).double() / npix).float().numpy()
            cols_c = (cm.sum(1).double() / npix).float().numpy()
            for i, p in enumerate(positions):
                areas_of.setdefault((tv, p), rows_t[i])
                areas_of.setdefault((cv, p), cols_c[i])
        area_rows: list[tuple] = []
        map_rows: list[tuple] = []
        for v, (positions, lab, ent) in ran.items():
            missing = [i for i, p in enumerate(positions) if (v, p) not in areas_of]
            if missing:
                extra = area_fractions_torch(lab[missing], num_classes).numpy()
                for k, i in enumerate(missing):
                    areas_of[(v, positions[i])] = extra[k]
            lab_np = lab.numpy()
            for i, p in enumerate(positions):
                iid = items[p]["id"]
                area_rows.append((v, iid, areas_of[(v, p)].astype(np.float32).tobytes(), ent[i]))
                map_rows.append((iid, v, encode_label_png(lab_np[i])))
    image_rows = [(it["id"], it["size"][0], it["size"][1], it["mode"]) for it in items if "size" in it]
    bad_rows = [(it["id"], it["error"]) for it in items if it["kind"] == "bad"]
    t_write = time.perf_counter()
    clock["forward"] = clock.get("forward", 0.0) + t_fwd
    clock["post"] = clock.get("post", 0.0) + (t_write - t_start - t_fwd)
    with store.transaction() as conn:
        conn.executemany("INSERT OR IGNORE INTO images VALUES(?,?,?,?)", image_rows)
        conn.executemany("INSERT OR IGNORE INTO bad VALUES(?,?)", bad_rows)
        conn.executemany(
            "INSERT INTO areas VALUES(?,?,?,?) ON CONFLICT(model_version, image_id) DO UPDATE "
            "SET entropy=excluded.entropy WHERE areas.entropy IS NULL", area_rows)
        conn.executemany("INSERT OR IGNORE INTO maps VALUES(?,?,?)", map_rows)
        conn.executemany("INSERT OR IGNORE INTO distances VALUES(?,?,?,?,?)", dist_rows)
    clock["write"] = clock.get("write", 0.0) + time.perf_counter() - t_write
    stats.distances += len(dist_rows)
    stats.bad += len(bad_rows)
    stats.already_done += sum(1 for it in items if it["kind"] in ("done", "known_bad"))
    for it in items:
        if it["kind"] == "error":
            log.warning("%s", it["error"])


def _write_report(store: ScoreStore, run_id: str, stats: ScoreStats) -> None:
    """``pool_report.tsv``: kind, path, detail — one line per unreadable, bad, converted or duplicate
    entry of this run (streamed to disk, then renamed into place); also fills the pool-level
    counts of ``stats``."""
    stats.unreadable = stats.bad = stats.converted = stats.duplicates = stats.images = 0

    def write(fh: Any) -> None:
        def line(kind: str, path: str, detail: str) -> None:
            fh.write(f"{kind}\t{path}\t{_one_line(detail)}\n".encode())

        fh.write(b"kind\tpath\tdetail\n")
        for path, err in store.iter_run_errors(run_id):
            line("unreadable", path, err)
            stats.unreadable += 1
        last, first_path = None, ""
        for image_id, path in store.iter_run_paths(run_id):
            if image_id == last:
                line("duplicate", path, f"same content as {first_path} (scored once)")
                stats.duplicates += 1
                continue
            last, first_path = image_id, path
            stats.images += 1
            reason = store.bad_reason(image_id)
            if reason is not None:
                line("bad", path, reason)
                stats.bad += 1
                continue
            mode = store.image_mode(image_id)
            if mode and mode != "RGB":
                line("converted", path, f"converted from {mode} to RGB")
                stats.converted += 1

    atomic_write(store.root / REPORT_NAME, write)
    stats.paths = store.count_run_entries(run_id)
    if stats.unreadable or stats.bad or stats.converted or stats.duplicates:
        log.info("pool report: %d unreadable, %d bad, %d converted, %d duplicate entries (%s)",
                 stats.unreadable, stats.bad, stats.converted, stats.duplicates, store.root / REPORT_NAME)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
