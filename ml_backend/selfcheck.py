"""Self-check of the model zoo: predict the shared labelled sets with every shared model.

For each shared model (every ESPNetv2 and DiCENet checkpoint, every .tflite file) and each
labelled set (``coco_voc``, ``voc_samples``) the dataset-level mIoU is computed with
:func:`ml_backend.evaluate.evaluate`. Results are written (atomically, after each model) to a
JSON file; a rerun reuses the rows whose model version and image list are unchanged, so an
interrupted self-check continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .datasets import LabelledFolder
from .errors import MadsegError
from .evaluate import evaluate
from .shared import shared_dir
from .zoo import ModelSpec, load_model_spec, shared_model_specs

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("coco_voc", "voc_samples")


def model_label(spec: ModelSpec) -> str:
    """A short name for a spec: the checkpoint's file stem, else the model name."""
    return Path(spec.checkpoint).stem if spec.checkpoint else spec.name


def select_specs(specs: Sequence[ModelSpec], patterns: Sequence[str] | None) -> list[ModelSpec]:
    """Specs whose label or name contains any of ``patterns`` (all when None/empty)."""
    if not patterns:
        return list(specs)
    pats = [p.strip().lower() for p in patterns if p.strip()]
    chosen = [s for s in specs if any(p in model_label(s).lower() or p in s.name.lower() for p in pats)]
    if not chosen:
        raise MadsegError(
            f"selfcheck: --models {','.join(patterns)} matches none of "
            f"{', '.join(model_label(s) for s in specs)}"
        )
    return chosen


def open_dataset(name: str, limit: int | None = None) -> LabelledFolder:
    """The shared labelled set ``data/<name>`` (first ``limit`` stems when given)."""
    root = shared_dir() / "data" / name
    folder = LabelledFolder(root)
    if limit is not None and limit < len(folder):
        folder = LabelledFolder(root, subset=list(folder.stems[: max(1, int(limit))]))
    return folder


def _stems_hash(folder: LabelledFolder) -> str:
    return hashlib.sha256("\n".join(folder.stems).encode()).hexdigest()[:16]


def _read_previous(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rows = data.get("results") if isinstance(data, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def run_selfcheck(
    specs: Sequence[ModelSpec] | None = None,
    datasets: Sequence[str] = DATASETS,
    *,
    device: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    out: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate every spec on every dataset; one row per (model, dataset).

    Row keys: ``model``, ``name``, ``checkpoint``, ``version``, ``dataset``, ``n_images``,
    ``miou``, ``per_class`` (IoU or None per class), ``seconds``, ``images_per_s``.
    With ``out`` the rows are written there (JSON) after each model and reused on a rerun.
    """
    specs = list(specs) if specs is not None else shared_model_specs()
    if not specs:
        raise MadsegError(f"selfcheck: no shared models found under {shared_dir() / 'models'}")
    folders = {name: open_dataset(name, limit) for name in datasets}
    out_path = Path(out) if out is not None else None
    previous = [] if fresh or out_path is None else _read_previous(out_path)
    rows: list[dict[str, Any]] = []
    for spec in specs:
        label = model_label(spec)
        model = load_model_spec(spec, device=device)
        for ds_name, folder in folders.items():
            key = (model.version, ds_name, _stems_hash(folder))
            old = next((r for r in previous if (r.get("version"), r.get("dataset"), r.get("stems")) == key),
                       None)
            if old is not None:
                log.info("selfcheck: %s on %s reused from %s", label, ds_name, out_path)
                rows.append(old)
                continue
            t0 = time.perf_counter()
            miou, per_class = evaluate(model, folder, batch_size, progress=progress,
                                       desc=f"{label} on {ds_name}")
            dt = time.perf_counter() - t0
            rows.append({
                "model": label,
                "name": spec.name,
                "checkpoint": spec.checkpoint,
                "version": model.version,
                "dataset": ds_name,
                "stems": key[2],
                "n_images": len(folder),
                "miou": miou,
                "per_class": {n: (None if v != v else float(v)) for n, v in zip(model.class_names, per_class,
                                                                               strict=True)},
                "seconds": round(dt, 2),
                "images_per_s": round(len(folder) / dt, 2) if dt > 0 else None,
                "device": str(model.device),
            })
        if out_path is not None:
            atomic_write_json(out_path, {"datasets": list(datasets), "limit": limit, "results": rows})
        del model
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one line per model, one mIoU column per dataset, best first."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["dataset"]): r for r in rows}

    def score(m: str) -> float:
        vals = [cell[(m, d)]["miou"] for d in datasets if (m, d) in cell]
        return vals[-1] if vals else 0.0

    head = ["model", "version", *(f"{d} mIoU (n)" for d in datasets), "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m in sorted(models, key=score, reverse=True):
        first = next(cell[(m, d)] for d in datasets if (m, d) in cell)
        vals = []
        for d in datasets:
            r = cell.get((m, d))
            vals.append(f"{r['miou']:.3f} ({r['n_images']})" if r else "-")
        speeds = [r["images_per_s"] for d in datasets if (r := cell.get((m, d))) and r["images_per_s"]]
        speed = f"{sum(speeds) / len(speeds):.1f}" if speeds else "-"
        lines.append(f"| {m} | {first['version']} | " + " | ".join(vals) + f" | {speed} |")
    return "\n".join(lines)
