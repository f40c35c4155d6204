"""Evaluation of an experiment's models: the paper's Table 1, ranking stability, baseline comparison.

Every model (the target of each round f(0), f(1), ... and every competitor) is evaluated on
T(0) and on each T(i) with the dataset-level mIoU of ``ml_backend.metrics`` (the fine-tuning
core's definition). Per (model version, test set) the per-image confusion matrices (N, C, C) are
computed once and cached in ``<cache_dir>/<model version>__<set name>.npz`` (atomic writes, keyed
by the image stems, so a changed test set is recomputed); every number of the report is derived
from them:

- Table 1: ``miou[model][set]`` and the per-class IoU;
- ranking stability (paper Appendix C): :func:`projects.ranking.ranking_stability` on the
  stacked confusions of all models over the set's images, in the set's order;
- the baseline comparison (paper Appendix A): the same numbers for f_MAD and f_entropy on the MAD
  test set drawn between them.

Whether a number is an unbiased one is the caller's business: T(i) was drawn from the candidates
of round i (target f(i-1)), so it evaluates f(0..i-1) and the competitors without bias, and f(i)
"after fine-tuning" (S(i) and T(i) are disjoint). :func:`table_rows` flags each cell with
``drawn_against`` so the report can say so.

Only ``ml_backend`` is imported at module level; models are loaded one at a time.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.atomic import atomic_write_bytes
from ml_backend.errors import MadsegError
from ml_backend.metrics import iou_per_class, miou_from_confusion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestSet:
    """A labelled test set: ``pairs`` are (image path, mask path) in the set's order.

    ``name`` e.g. ``"T(0)"``, ``"T(1)"``; ``drawn_round``: the round whose candidates it was drawn
    from (0 for the fixed T(0)); ``note``: free text for the report.
    """

    name: str
    pairs: tuple[tuple[Path, Path], ...]
    drawn_round: int = 0
    note: str = ""

    @property
    def stems(self) -> list[str]:
        return [Path(img).stem for img, _ in self.pairs]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": len(self.pairs), "drawn_round": self.drawn_round,
                "note": self.note, "images": self.stems}


@dataclass(frozen=True)
class ModelEntry:
    """A model to evaluate: ``key`` (row name), zoo ``spec`` ({name, checkpoint, options}),
    ``role`` ("target", "competitor", "baseline", "variant") and ``round`` (f(round); None for
    competitors)."""

    key: str
    spec: Mapping[str, Any]
    role: str = "target"
    round: int | None = None
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "spec": dict(self.spec), "role": self.role, "round": self.round,
                "label": self.label or self.key}


@dataclass
class Evaluation:
    """Per-model, per-set confusions (M entries of (N, C, C)) and the numbers derived from them."""

    models: list[ModelEntry]
    sets: list[TestSet]
    versions: dict[str, str] = field(default_factory=dict)
    confusions: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def miou(self, model: str, test_set: str) -> float:
        cm = self.confusions[(model, test_set)].sum(axis=0)
        return miou_from_confusion(cm)

    def per_class(self, model: str, test_set: str) -> np.ndarray:
        """(C,) IoU per class on the set (NaN where the class is absent in GT and prediction)."""
        return iou_per_class(self.confusions[(model, test_set)].sum(axis=0))

    def per_image_miou(self, model: str, test_set: str) -> np.ndarray:
        """(N,) per-image mIoU of the model on the set's images."""
        return np.array([miou_from_confusion(c) for c in self.confusions[(model, test_set)]])


def confusions_for(
    predict: Callable[[list[np.ndarray]], list[np.ndarray]],
    pairs: Sequence[tuple[Path, Path]],
    num_classes: int,
    *,
    batch_size: int = 4,
    desc: str = "evaluate",
) -> np.ndarray:
    """Per-image confusion matrices (N, C, C) int64 of ``predict`` on ``pairs``.

    ``predict`` maps a list of (H, W, 3) uint8 images to (H, W) label maps at the original size
    (e.g. ``SegmentationModel.predict``). Images are read and predicted ``batch_size`` at a time.
    """
    from tqdm import tqdm

    from ml_backend.imageio import read_mask, read_rgb
    from ml_backend.metrics import confusion_matrix

    out = np.zeros((len(pairs), num_classes, num_classes), dtype=np.int64)
    with tqdm(total=len(pairs), desc=desc, unit="img", leave=False) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            images = [read_rgb(img) for img, _ in chunk]
            preds = predict(images)
            for j, ((_, mask_path), pred) in enumerate(zip(chunk, preds, strict=True)):
                gt = read_mask(mask_path, num_classes)
                if pred.shape != gt.shape:
                    raise MadsegError(f"{mask_path}: mask size {gt.shape} differs from its image's "
                                      f"{pred.shape}; fix the labelled folder")
                out[start + j] = confusion_matrix(pred, gt, num_classes)
            bar.update(len(chunk))
    return out


def _cache_name(version: str, set_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in f"{version}__{set_name}")
    return f"{safe}.npz"


def _load_cached(path: Path, stems: list[str], num_classes: int) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if list(z["stems"].tolist()) != stems or z["cm"].shape[1:] != (num_classes, num_classes):
                return None
            return z["cm"].astype(np.int64)
    except (OSError, ValueError, KeyError):
        return None


def _save_cached(path: Path, stems: list[str], cm: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, stems=np.array(stems, dtype=str), cm=cm)
    atomic_write_bytes(path, buf.getvalue())


def evaluate_models(
    models: Sequence[ModelEntry],
    sets: Sequence[TestSet],
    num_classes: int,
    cache_dir: str | os.PathLike[str],
    *,
    device: str | None = None,
    batch_size: int = 4,
    loader: Callable[[Mapping[str, Any]], Any] | None = None,
) -> Evaluation:
    """Evaluate every model on every test set (confusions cached in ``cache_dir``).

    Each model is loaded once (``loader(spec)``, default ``ml_backend.zoo.load_model_spec``) and
    only when one of its (version, set) entries is not cached yet.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if loader is None:
        from ml_backend.zoo import load_model_spec

        def loader(spec: Mapping[str, Any]) -> Any:
            return load_model_spec(dict(spec), device=device)

    ev = Evaluation(models=list(models), sets=list(sets))
    keys = [m.key for m in models]
    if len(set(keys)) != len(keys):
        raise MadsegError(f"model keys must be unique for evaluation, got {keys}")
    versions_file = cache / "versions.json"
    import json

    known: dict[str, Any] = {}
    if versions_file.exists():
        try:
            known = json.loads(versions_file.read_text())
        except (OSError, ValueError):
            known = {}
    for entry in models:
        spec_key = json.dumps(dict(entry.spec), sort_keys=True, default=str)
        version = known.get(spec_key)
        model = None
        for ts in sets:
            if not ts.pairs:
                continue
            cm = None
            if version is not None:
                cm = _load_cached(cache / _cache_name(version, ts.name), ts.stems, num_classes)
            if cm is None:
                if model is None:
                    model = loader(entry.spec)
                    version = str(model.version)
                    known[spec_key] = version
                    from ml_backend.atomic import atomic_write_json

                    atomic_write_json(versions_file, known)
                    cm = _load_cached(cache / _cache_name(version, ts.name), ts.stems, num_classes)
                if cm is None:
                    m = model

                    def predict(images: list[np.ndarray], _m: Any = m) -> list[np.ndarray]:
                        return _m.predict(images, batch_size=batch_size)

                    cm = confusions_for(predict, list(ts.pairs), num_classes, batch_size=batch_size,
                                        desc=f"{entry.key} on {ts.name}")
                    _save_cached(cache / _cache_name(version, ts.name), ts.stems, cm)
            ev.confusions[(entry.key, ts.name)] = cm
        ev.versions[entry.key] = str(version)
        del model
    return ev


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def table1(ev: Evaluation, class_names: Sequence[str]) -> dict[str, Any]:
    """The Table-1 analogue: rows = models, columns = test sets; mIoU, per-class IoU and sizes.

    Returns ``{"columns": [set dicts], "rows": [{"model", "role", "round", "label", "version",
    "miou": {set: float|None}, "per_class": {set: {class: float|None}}, "drawn_against": {set: bool}}]}``.
    ``drawn_against`` is true where the set's candidates were drawn against this model (the
    target of the set's round, f(drawn_round - 1)).
    """
    rows = []
    for m in ev.models:
        miou: dict[str, float | None] = {}
        per_class: dict[str, dict[str, float | None]] = {}
        drawn: dict[str, bool] = {}
        for ts in ev.sets:
            if (m.key, ts.name) not in ev.confusions:
                miou[ts.name] = None
                continue
            miou[ts.name] = float(ev.miou(m.key, ts.name))
            pc = ev.per_class(m.key, ts.name)
            per_class[ts.name] = {class_names[k]: _clean(float(pc[k])) for k in range(len(class_names))}
            drawn[ts.name] = (m.role == "target" and m.round is not None and ts.drawn_round >= 1
                              and m.round == ts.drawn_round - 1)
        rows.append({**m.to_dict(), "version": ev.versions.get(m.key), "miou": miou,
                     "per_class": per_class, "drawn_against": drawn})
    return {"columns": [ts.to_dict() for ts in ev.sets], "rows": rows}


def ranking_curves(ev: Evaluation) -> dict[str, Any]:
    """Per test set (with >= 1 image) the SRCC curve of all models (``RankingCurve.to_dict()``)."""
    from projects.ranking import ranking_stability

    out: dict[str, Any] = {}
    for ts in ev.sets:
        keys = [m.key for m in ev.models if (m.key, ts.name) in ev.confusions]
        if not ts.pairs or len(keys) < 2:
            continue
        cms = np.stack([ev.confusions[(k, ts.name)] for k in keys])
        out[ts.name] = ranking_stability(cms, keys).to_dict()
    return out


def table_rows(ev: Evaluation) -> list[tuple[str, list[float | None]]]:
    """(model key, mIoU per set in ``ev.sets`` order) for printing."""
    return [(m.key, [float(ev.miou(m.key, ts.name)) if (m.key, ts.name) in ev.confusions else None
                     for ts in ev.sets]) for m in ev.models]


def markdown_table(ev: Evaluation, *, scale: float = 100.0) -> str:
    """Table 1 as markdown (mIoU x ``scale``, one decimal; "–" where not evaluated)."""
    head = "| model | " + " | ".join(f"{ts.name} (n={len(ts.pairs)})" for ts in ev.sets) + " |"
    sep = "|---|" + "---|" * len(ev.sets)
    lines = [head, sep]
    for key, vals in table_rows(ev):
        cells = ["–" if v is None else f"{v * scale:.1f}" for v in vals]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def labelled_pairs(
    folder: str | os.PathLike[str], stems: Sequence[str] | None = None
) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a labelled folder (``images/`` + ``masks/`` PNG by stem), in ``stems``
    order when given (missing stems -> :class:`MadsegError`), else sorted by stem."""
    from ml_backend.imageio import list_images

    root = Path(folder)
    images = {p.stem: p for p in list_images(root / "images")} if (root / "images").is_dir() else {}
    masks_dir = root / "masks"
    order = list(stems) if stems is not None else sorted(images)
    pairs = []
    missing = []
    for s in order:
        img = images.get(s)
        mask = masks_dir / f"{s}.png"
        if img is None or not mask.exists():
            missing.append(s)
            continue
        pairs.append((img, mask))
    if missing:
        raise MadsegError(f"{root}: no image+mask for {len(missing)} test image(s), e.g. {missing[:3]}; "
                          "re-run the round's export stage")
    return pairs
