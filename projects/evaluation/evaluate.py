"""Evaluation of an experiment's models: the paper's Table 1, ranking stability, baseline comparison.

Every model (the target of each round f(0), f(1), ... and every competitor) is evaluated on
T(0) and on each T(i) with the dataset-level mIoU of ``ml_backend.metrics`` (the fine-tuning
core's definition). Per (model version, test set) the per-image confusion matrices (N, C, C) are
computed once and cached in ``<cache_dir>/<model version>__<set name>.npz`` (atomic writes, keyed
by the image stems, so a changed test set is recomputed); every number of the report is derived
from them:

- Table 1: ``miou[model][set]`` (standard) and ``gt_miou[model][set]`` (ground-truth-class mIoU,
  :func:`ml_backend.metrics.gt_class_miou`), the per-class IoU, and each fine-tuned target's
  promotion-gate verdict (promoted / rejected with the reason, from the round state);
- "did the round help?" (:func:`round_help`): the gain of each fine-tuned f(i) and of the served
  model over f(0) on the failure-zone test sets T(1..) (minus its training images), with a paired
  bootstrap interval over images, and the human effort spent (ratings, masks, lead time);
- ranking stability (paper Appendix C): :func:`projects.evaluation.ranking.ranking_stability` on the
  stacked confusions of all models over the set's images, in the set's order;
- the baseline comparison (paper Appendix A): the same numbers for f_MAD and f_entropy on the MAD
  test set drawn between them.

Whether a number is an unbiased one is the caller's business: T(i) was drawn from the candidates
of round i (target f(i-1)), so it evaluates f(0..i-1) and the competitors without bias, and f(i)
"after fine-tuning" (S(i) and T(i) are disjoint). :func:`table_rows` flags each cell with
``drawn_against`` so the report can say so.

Only ``ml_backend`` and the experiment layout (``projects.layout``, paths only) are imported at module
level; models are loaded one at a time. Every path comes from the experiment's
:class:`projects.layout.ExperimentLayout`; nothing here knows the round runner.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_backend.atomic import atomic_write_bytes
from ml_backend.errors import MadsegError
from ml_backend.jsonsafe import jsonable
from ml_backend.metrics import gt_class_miou, iou_per_class, miou_from_confusion
from ml_backend.modelspec import ModelSpec

from ..layout import ExperimentLayout, RoundLayout, round_dir
from ..stage_results import PlanRecord

if TYPE_CHECKING:
    from ..experiment import ExperimentConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestSet:
    """A labelled test set: ``pairs`` are (image path, mask path) in the set's order.

    ``name`` e.g. ``"T(0)"``, ``"T(1)"``; ``drawn_round``: the round whose candidates it was drawn
    from (0 for the fixed T(0)); ``note``: free text for the report; ``drawn_against``: key of the
    model the set was drawn against (the round's target; "" = f(drawn_round - 1)).
    """

    name: str
    pairs: tuple[tuple[Path, Path], ...]
    drawn_round: int = 0
    note: str = ""
    drawn_against: str = ""

    @property
    def stems(self) -> list[str]:
        return [Path(img).stem for img, _ in self.pairs]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": len(self.pairs), "drawn_round": self.drawn_round,
                "note": self.note, "images": self.stems, "drawn_against": self.drawn_against or None}


@dataclass(frozen=True)
class ModelEntry:
    """A model to evaluate: ``key`` (row name), zoo ``spec`` (a :class:`ml_backend.modelspec.ModelSpec`;
    a ``{name, checkpoint, options}`` dict given is read once into one), ``role`` ("target",
    "competitor", "baseline", "variant") and ``round`` (f(round); None for competitors)."""

    key: str
    spec: ModelSpec
    role: str = "target"
    round: int | None = None
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", ModelSpec.of(self.spec))

    @property
    def spec_dict(self) -> dict[str, Any]:
        """The spec as ``{name, checkpoint, options}`` (the JSON written to disk)."""
        return self.spec.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "spec": self.spec_dict, "role": self.role, "round": self.round,
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

    def gt_miou(self, model: str, test_set: str) -> float:
        """Ground-truth-class mIoU of the model on the set (a class only predicted adds no term)."""
        return gt_class_miou(self.confusions[(model, test_set)].sum(axis=0))

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


def _spec_key(spec: ModelSpec) -> str:
    """The key of ``versions.json`` (spec -> model version): the spec plus the size and mtime of its
    checkpoint file, so a checkpoint rewritten in place (a fine-tune redone into the same folder)
    is loaded again instead of being taken for the old version."""
    d = spec.to_dict()
    ckpt = d.get("checkpoint")
    if isinstance(ckpt, str) and os.path.isfile(ckpt):
        st = os.stat(ckpt)
        d["_file"] = [st.st_size, st.st_mtime_ns]
    return json.dumps(d, sort_keys=True, default=str)


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
    loader: Callable[[ModelSpec], Any] | None = None,
) -> Evaluation:
    """Evaluate every model on every test set (confusions cached in ``cache_dir``).

    Each model is loaded once (``loader(spec)``, default ``ml_backend.zoo.load_model_spec``) and
    only when one of its (version, set) entries is not cached yet.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if loader is None:
        from ml_backend.zoo import load_model_spec

        def loader(spec: ModelSpec) -> Any:
            return load_model_spec(spec, device=device)

    ev = Evaluation(models=list(models), sets=list(sets))
    keys = [m.key for m in models]
    if len(set(keys)) != len(keys):
        raise MadsegError(f"model keys must be unique for evaluation, got {keys}")
    versions_file = cache / "versions.json"
    known: dict[str, Any] = {}
    if versions_file.exists():
        try:
            known = json.loads(versions_file.read_text())
        except (OSError, ValueError):
            known = {}
    for entry in models:
        spec_key = _spec_key(entry.spec)
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
    "miou": {set: float|None}, "gt_miou": {set: float|None}, "per_class": {set: {class: float|None}},
    "drawn_against": {set: bool}}]}``. ``drawn_against`` is true where the set's candidates were
    drawn against this model (the target of the set's round: ``TestSet.drawn_against``, else
    f(drawn_round - 1)).
    """
    rows = []
    for m in ev.models:
        miou: dict[str, float | None] = {}
        gt_miou: dict[str, float | None] = {}
        per_class: dict[str, dict[str, float | None]] = {}
        drawn: dict[str, bool] = {}
        for ts in ev.sets:
            if (m.key, ts.name) not in ev.confusions:
                miou[ts.name] = None
                gt_miou[ts.name] = None
                continue
            miou[ts.name] = float(ev.miou(m.key, ts.name))
            gt_miou[ts.name] = float(ev.gt_miou(m.key, ts.name))
            pc = ev.per_class(m.key, ts.name)
            per_class[ts.name] = {class_names[k]: _clean(float(pc[k])) for k in range(len(class_names))}
            if ts.drawn_against:
                drawn[ts.name] = ts.drawn_round >= 1 and m.key == ts.drawn_against
            else:
                drawn[ts.name] = (m.role == "target" and m.round is not None and ts.drawn_round >= 1
                                  and m.round == ts.drawn_round - 1)
        rows.append({**m.to_dict(), "version": ev.versions.get(m.key), "miou": miou, "gt_miou": gt_miou,
                     "per_class": per_class, "drawn_against": drawn})
    return {"columns": [ts.to_dict() for ts in ev.sets], "rows": rows}


def ranking_curves(ev: Evaluation) -> dict[str, Any]:
    """Per test set (with >= 1 image) the SRCC curve of all models (``RankingCurve.to_dict()``)."""
    from .ranking import ranking_stability

    out: dict[str, Any] = {}
    for ts in ev.sets:
        keys = [m.key for m in ev.models if (m.key, ts.name) in ev.confusions]
        if not ts.pairs or len(keys) < 2:
            continue
        cms = np.stack([ev.confusions[(k, ts.name)] for k in keys])
        out[ts.name] = ranking_stability(cms, keys).to_dict()
    return out


def round_help(
    ev: Evaluation,
    train_stems: Mapping[str, Collection[str]],
    served: str,
    *,
    reference: str = "f(0)",
    criteria: Any = None,
) -> dict[str, Any]:
    """"Did the round help?": each fine-tuned model vs ``reference`` on the failure-zone test sets.

    The failure zone is every evaluated test set drawn from MAD candidates (``drawn_round >= 1``:
    T(1), T(2), ..., the evaluation pass), pooled image by image; a model's own training images
    (``train_stems[key]``, file stems) are left out of its comparison. Per model: both mIoUs of
    the reference and the model there, the gain in ground-truth-class mIoU with its paired
    bootstrap interval over images (``ml_backend.gate.compare_set``), and the gain on T(0).
    ``served``: key of the model served after the last round (listed even when it is the
    reference). Returns a JSON-able dict (``rows`` in the order of ``train_stems``, then served).
    """
    from ml_backend.gate import GateCriteria, compare_set

    crit = criteria or GateCriteria()
    zone = [ts for ts in ev.sets if ts.drawn_round >= 1 and ts.pairs]
    keys = list(train_stems) + ([served] if served not in train_stems else [])
    rows = []
    for key in keys:
        skip = set(train_stems.get(key, ()))
        ref_parts, parts, used, excluded = [], [], [], 0
        for ts in zone:
            if (key, ts.name) not in ev.confusions or (reference, ts.name) not in ev.confusions:
                continue
            keep = [k for k, stem in enumerate(ts.stems) if stem not in skip]
            excluded += len(ts.stems) - len(keep)
            if keep:
                ref_parts.append(ev.confusions[(reference, ts.name)][keep])
                parts.append(ev.confusions[(key, ts.name)][keep])
                used.append(f"{ts.name} ({len(keep)})")
        row: dict[str, Any] = {"model": key, "served": key == served, "sets": used,
                               "excluded_training_images": excluded}
        if parts:
            cmp = compare_set("failure zone", np.concatenate(ref_parts), np.concatenate(parts), crit)
            row.update(images=cmp.n_images, reference_miou=cmp.parent_miou, miou=cmp.child_miou,
                       reference_gt_miou=cmp.parent_gt_miou, gt_miou=cmp.child_gt_miou,
                       gain=cmp.delta_gt_miou, gain_miou=cmp.child_miou - cmp.parent_miou,
                       ci=None if cmp.ci_low is None else [cmp.ci_low, cmp.ci_high])
        else:
            row.update(images=0, gain=None, ci=None)
        if (key, "T(0)") in ev.confusions and (reference, "T(0)") in ev.confusions:
            row["t0_gain"] = ev.gt_miou(key, "T(0)") - ev.gt_miou(reference, "T(0)")
        rows.append(row)
    return {"reference": reference, "served": served, "confidence": crit.confidence,
            "failure_zone": [ts.name for ts in zone], "rows": rows}


def gate_verdicts(exp_dir: Path, rounds: int) -> dict[str, dict[str, Any]]:
    """The promotion gate's verdict on each fine-tuned f(i) of rounds 1..``rounds`` (from the round
    state): ``{"f(i)": {"status", "reasons", "parent", "metrics"}}``; "not gated" for a state
    written before the gate existed."""
    from ..stage_results import FinetuneOutput, GateVerdict
    from ..state import RoundState

    out: dict[str, dict[str, Any]] = {}
    for i in range(1, rounds + 1):
        st = RoundState.load(exp_dir, i)
        if not st.done("finetune"):
            break
        g = st.read(FinetuneOutput).gate or GateVerdict()
        out[f"f({i})"] = {"status": g.status or "not gated", "reasons": list(g.reasons),
                          "parent": g.parent, "metrics": dict(g.metrics)}
    return out


def experiment_effort(exp_dir: Path, rounds: Sequence[int]) -> dict[str, Any]:
    """Human effort of the experiment's rounds from their state: ratings and masks (finished
    annotations, annotators, summed ``lead_time``) per round and in total."""
    from ..stage_results import Effort, MasksOutput, RatingsOutput
    from ..state import RoundState

    per_round = []
    total = {"ratings": 0, "masks": 0, "lead_time_s": 0.0}
    simulated = False
    for i in rounds:
        st = RoundState.load(exp_dir, i)
        row: dict[str, Any] = {"round": i}
        for what in ("ratings", "masks"):
            if not st.done(what):
                continue
            if what == "ratings":
                eff = st.read(RatingsOutput).effort
                if eff is None:  # state from before effort was recorded: counts only
                    try:
                        raw = json.loads(RoundLayout(round_dir(exp_dir, i)).ratings.read_text())["raw"] or []
                    except (OSError, ValueError, KeyError, TypeError):
                        raw = []
                    eff = Effort(annotations=len(raw))
            else:
                masks = st.read(MasksOutput)
                eff = masks.effort or Effort(annotations=len(masks.S_stems) + len(masks.T_stems))
            row[what] = eff.annotations or 0
            row[f"{what} lead time (s)"] = eff.lead_time_s
            simulated |= bool(eff.simulated)
            total[what] += int(eff.annotations or 0)
            total["lead_time_s"] += float(eff.lead_time_s or 0.0)
        per_round.append(row)
    return {"rounds": per_round, "total": total, "simulated": simulated}


def table_rows(ev: Evaluation) -> list[tuple[str, list[float | None]]]:
    """(model key, mIoU per set in ``ev.sets`` order) for printing."""
    return [(m.key, [float(ev.miou(m.key, ts.name)) if (m.key, ts.name) in ev.confusions else None
                     for ts in ev.sets]) for m in ev.models]


def markdown_table(ev: Evaluation, *, scale: float = 100.0, marks: Mapping[str, str] | None = None) -> str:
    """Table 1 as markdown: "mIoU / gt-class mIoU" x ``scale`` (one decimal; "–" where not
    evaluated); ``marks``: model key -> gate verdict shown after the key (e.g. "rejected")."""
    head = "| model | " + " | ".join(f"{ts.name} (n={len(ts.pairs)})" for ts in ev.sets) + " |"
    sep = "|---|" + "---|" * len(ev.sets)
    lines = [head, sep]
    for m in ev.models:
        cells = [f"{ev.miou(m.key, ts.name) * scale:.1f} / {ev.gt_miou(m.key, ts.name) * scale:.1f}"
                 if (m.key, ts.name) in ev.confusions else "–" for ts in ev.sets]
        mark = f" ({marks[m.key]})" if marks and m.key in marks else ""
        lines.append(f"| {m.key}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def labelled_pairs(
    folder: str | os.PathLike[str], stems: Sequence[str] | None = None
) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a labelled folder (``images/`` + ``masks/`` PNG by stem), in ``stems``
    order when given, else sorted by stem: :class:`ml_backend.datasets.LabelledFolder` (the one
    reader of labelled folders); a missing folder, image or mask -> :class:`MadsegError`."""
    from ml_backend.datasets import LabelledFolder

    if stems is not None and not list(stems):
        return []
    try:
        return LabelledFolder(folder, None if stems is None else list(stems)).pairs
    except MadsegError as exc:
        raise MadsegError(f"{exc}; re-run the round's export stage") from None


# ==============================================================================================
# a whole experiment: results.json for projects.evaluation.report
# ==============================================================================================


def experiment_test_sets(exp: ExperimentConfig, layout: ExperimentLayout, rounds: int, *,
                         final_eval: bool) -> list[TestSet]:
    """T(0) and T(1..rounds[+1]) that exist (labels exported), in order."""
    from ..stage_results import MasksOutput
    from ..state import RoundState

    sets = [TestSet("T(0)", tuple(exp.t0.open().pairs), 0, "fixed test set (voc_samples half)")]
    last = rounds + (1 if final_eval else 0)
    for i in range(1, last + 1):
        st = RoundState.load(layout.root, i)
        if not st.done("masks"):
            continue
        stems = list(st.read(MasksOutput).T_stems)
        against = _plan_target_key(layout.round(i)) or f"f({i - 1})"
        note = f"drawn from M({i}) (target {against})"
        if i == rounds + 1:
            note += f"; evaluation pass after the last round, to evaluate f({rounds}) too"
        if stems:
            sets.append(TestSet(f"T({i})", tuple(labelled_pairs(layout.round(i).labels, stems)), i,
                                note, against))
    cmp_st = RoundState.load(layout.compare_root, 1)
    cmp_stems = list(cmp_st.read(MasksOutput).T_stems) if cmp_st.done("masks") else []
    if cmp_stems:
        pairs = tuple(labelled_pairs(layout.compare_round().labels, cmp_stems))
        sets.append(TestSet("T(MAD vs entropy)", pairs, 0,
                            "MAD test set drawn between f_MAD(1) and f_entropy"))
    return sets


def _train_stems(rd: RoundLayout) -> list[str]:
    """File stems of a round's training folder (``<round>/train/masks``)."""
    return sorted(p.stem for p in (rd.train / "masks").glob("*.png"))


def _plan_target_key(rd: RoundLayout) -> str:
    """The target key a round ran with (its ``plan.json``), "" when unknown."""
    try:
        return PlanRecord.read(rd.plan).target_key
    except MadsegError:
        return ""


def experiment_models(exp: ExperimentConfig, layout: ExperimentLayout, rounds: int) -> list[ModelEntry]:
    """f(0..rounds), the competitors, and (when present) the LwF variant and f_entropy."""
    from ..stage_results import FinetuneOutput
    from ..state import RoundState

    def spec(st: RoundState, model: Any, what: str) -> ModelSpec:
        if model.spec is None:
            raise MadsegError(f"{st.path}: the fine-tune stage recorded no model spec for {what}; fix or "
                              "delete the state file")
        return model.spec

    out = [ModelEntry("f(0)", exp.target.model_spec(), "target", 0, f"f(0) = {exp.target.key}")]
    lwf = " + LwF on unlabelled candidates" if exp.finetune.lwf_weight > 0 else ""
    for i in range(1, rounds + 1):
        st = RoundState.load(layout.root, i)
        if not st.done("finetune"):
            break
        ft = st.read(FinetuneOutput)
        out.append(ModelEntry(f"f({i})", spec(st, ft, f"f({i})"), "target", i,
                              f"f({i}) fine-tuned, S(0) replay{lwf}"))
        if i == 1 and ft.lwf is not None:
            out.append(ModelEntry("f(1) LwF", spec(st, ft.lwf, "f(1) LwF"), "variant", 1,
                                  "f(1) fine-tuned with LwF, no replay"))
    ent = RoundState.load(layout.entropy_root, 1)
    if ent.done("finetune"):
        out.append(ModelEntry("f_entropy", spec(ent, ent.read(FinetuneOutput), "f_entropy"), "baseline", 1,
                              "fine-tuned on the top-entropy images (same budget)"))
    for c in exp.competitors:
        out.append(ModelEntry(c.key, c.model_spec(), "competitor", None, c.key))
    return out


def _write_store_maps(store_dir: Path, version: str, ids: Sequence[str], out: Path) -> dict[str, str]:
    """Competitor label maps (working resolution) from the score store as PNGs for the gallery."""
    from ml_backend.imageio import write_mask
    from sampler.store import read_label_map

    res = {}
    for iid in ids:
        p = out / f"{iid}.png"
        if not p.exists():
            try:
                write_mask(p, read_label_map(store_dir, version, iid))
            except MadsegError:
                continue
        res[iid] = str(p)
    return res


def _predict_to(model_spec: ModelSpec, pairs: Sequence[tuple[Path, Path]], out: Path,
                device: str | None) -> list[Path]:
    from ml_backend.imageio import read_rgb, write_mask

    paths = [out / f"{Path(img).stem}.png" for img, _ in pairs]
    todo = [(img, p) for (img, _), p in zip(pairs, paths, strict=True) if not p.exists()]
    if todo:
        from ml_backend.zoo import load_model_spec

        model = load_model_spec(model_spec, device=device)
        for img, p in todo:
            write_mask(p, model.predict([read_rgb(img)])[0])
    return paths


def _galleries(layout: ExperimentLayout, models: list[ModelEntry], sets: list[TestSet],
               device: str | None, n: int = 8) -> dict[str, Any]:
    from sampler.candidates import read_candidates

    from ..stage_results import ChooseOutput, ScoreOutput
    from ..state import RoundState, served_round

    out: dict[str, Any] = {"candidates": [], "lowest_rated": [], "before_after": []}
    st1 = RoundState.load(layout.root, 1)
    rd = layout.round(1)
    if st1.done("predict"):
        cands = read_candidates(rd.candidates)[:n]
        score = st1.read(ScoreOutput)
        comp_maps = {key: _write_store_maps(layout.store, v, [c.id for c in cands],
                                            layout.report_assets / key)
                     for key, v in score.competitor_versions.items()}
        for c in cands:
            sel = c.selections[0].to_dict() if c.selections else {}
            panels = [{"title": "photo", "mask": None},
                      {"title": "target f(0)", "mask": str(rd.pred_mask(c.id))}]
            panels += [{"title": key, "mask": maps.get(c.id)} for key, maps in comp_maps.items()]
            out["candidates"].append({
                "image": c.path, "image_id": c.id,
                "caption": f"{sel.get('class', '')} vs {sel.get('competitor', '')} "
                           f"(d = {sel.get('distance', 0):.2f})", "panels": panels})
    if st1.done("choose"):
        ratings = json.loads(rd.ratings.read_text())
        cands = {c.id: c for c in read_candidates(rd.candidates)}
        for iid in st1.read(ChooseOutput).S[:n]:
            mos = ratings["mos"].get(iid)
            out["lowest_rated"].append({
                "image": cands[iid].path, "image_id": iid, "caption": f"MOS {mos:.2f}" if mos else "",
                "panels": [{"title": "photo", "mask": None},
                           {"title": "target f(0)", "mask": str(rd.pred_mask(iid))}]})
    targets = [m for m in models if m.role == "target"]
    t_sets = [ts for ts in sets if ts.drawn_round >= 1]
    if len(targets) >= 2 and t_sets:
        ts = t_sets[-1]
        pairs = list(ts.pairs)[:n]
        tag = ts.name.strip("()T")
        cols = before_after_columns(targets, served_round(layout.root, targets[-1].round or 0))
        preds = [_predict_to(m.spec, pairs, layout.report_assets / folder / tag, device)
                 for _, m, folder in cols]
        for k, (img, mask) in enumerate(pairs):
            out["before_after"].append({
                "image": str(img), "image_id": Path(img).stem, "caption": f"{ts.name}",
                "panels": [{"title": "ground truth", "mask": str(mask)}]
                + [{"title": title, "mask": str(p[k])}
                   for (title, _, _), p in zip(cols, preds, strict=True)]})
    return out


def before_after_columns(targets: Sequence[ModelEntry], served: int) -> list[tuple[str, ModelEntry, str]]:
    """The prediction columns of the before/after gallery as (title, model, asset folder).

    ``targets`` are f(0), f(1), ... in round order; ``served`` is the round whose model is served
    at the end (:func:`projects.state.served_round`; 0 = f(0), nothing promoted). "before" is f(0);
    "after" is the served model, so the gallery never shows a rejected version as the result; when
    the last fine-tuned version was rejected by the promotion gate, it is shown as well, marked so.
    """
    first, last = targets[0], targets[-1]
    by_round = {m.round: m for m in targets}
    after = by_round.get(served, first)
    if after is first:
        cols = [(f"{first.key}: served (no fine-tuned version passed the gate)", first, "before")]
    else:
        cols = [(f"before: {first.key}", first, "before"), (f"after: {after.key} (served)", after, "after")]
    if last is not after:
        cols.append((f"{last.key}: rejected by the gate, not served", last, "rejected"))
    return cols


def evaluate_experiment(
    exp: ExperimentConfig, layout: ExperimentLayout, rounds: int, *, final_eval: bool = True,
    baseline: bool = True, device: str | None = None, simulated_raters: bool = False,
) -> dict[str, Any]:
    """Evaluate every model on every test set of the experiment in ``layout`` and write
    ``results.json`` (the structure :mod:`projects.evaluation.report` renders). ``device``: torch device of
    the evaluation; ``simulated_raters``: the oracle played the raters (shown in the settings).
    Returns the results dict."""
    from ml_backend.atomic import atomic_write_json
    from ml_backend.gate import GateCriteria
    from sampler.candidates import read_candidates

    from ..stage_results import ChooseOutput, FinetuneOutput, RatingsOutput, SelectOutput
    from ..state import RoundState, served_round
    from .report import count_failures, stage_times

    sets = experiment_test_sets(exp, layout, rounds, final_eval=final_eval)
    models = experiment_models(exp, layout, rounds)
    ev = evaluate_models(models, sets, exp.num_classes, layout.eval_cache, device=device)

    round_rows = []
    image_classes: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {}
    for root, label in layout.round_roots():
        i = 1
        while RoundLayout(round_dir(root, i)).state.exists():
            st = RoundState.load(root, i)
            rl = RoundLayout(round_dir(root, i))
            row: dict[str, Any] = {"round": f"{label} {i}"}
            plan_file = rl.plan
            if plan_file.exists():
                plan = PlanRecord.read(plan_file)
                row["kind"] = plan.kind
                row["target"] = plan.target_key
            if st.done("select"):
                so = st.read(SelectOutput)
                row["|M|"] = so.n_candidates
                row["pool"] = so.pool_size
                rule = so.bounds_rule
                if rule:  # where each class's size bounds came from (sampler.bounds.class_bounds)
                    row["size bounds (S(0)/pool/none)"] = (
                        f"{rule['counts'].get('s0', 0) + rule['counts'].get('s0_pooled', 0)}/"
                        f"{rule['counts'].get('pool', 0)}/{rule['counts'].get('none', 0)}")
                if so.rating_budget:
                    row["rated of M"] = f"{so.n_candidates} of {so.m_size}"
                if label == "round":
                    cands = read_candidates(rl.candidates)
                    for c in cands:
                        image_classes.setdefault(c.id, sorted({s.cls for s in c.selections}))
                    groups[f"M({i})"] = [c.id for c in cands]
            if st.done("ratings"):
                row["OOD"] = st.read(RatingsOutput).n_ood
            if st.done("choose"):
                ch = st.read(ChooseOutput)
                row["|S|"], row["|T|"] = len(ch.S), len(ch.T)
                if label == "round" and ch.S:
                    groups[f"S({i})"] = list(ch.S)
            if st.done("finetune"):
                ft = st.read(FinetuneOutput)
                row["LR"] = ft.lr
                row["T(0) mIoU at LR choice"] = ft.val_miou
                if label == "round":
                    row["gate"] = (ft.gate.status if ft.gate else None) or "not gated"
            row["stages done"] = len(st.done_stages())
            round_rows.append(row)
            i += 1

    gates = gate_verdicts(layout.root, rounds)
    t1 = table1(ev, exp.classes)
    for row in t1["rows"]:
        if row["key"] in gates:
            row["gate"] = gates[row["key"]]
        elif row["key"] == "f(0)":
            row["gate"] = {"status": "start", "reasons": ["the configured target, served before any round"]}
    finished = [i for i in range(1, rounds + 1) if RoundState.load(layout.root, i).done("finetune")]
    served = f"f({served_round(layout.root, finished[-1])})" if finished else "f(0)"
    train_stems = {f"f({i})": _train_stems(layout.round(i)) for i in finished}
    help_panel = round_help(ev, train_stems, served, criteria=GateCriteria(seed=exp.seed))
    help_panel["effort"] = experiment_effort(layout.root, range(1, rounds + 2))
    help_panel["gates"] = gates
    results: dict[str, Any] = {
        "experiment": exp.name,
        "classes": list(exp.classes),
        "settings": {
            "target": exp.target.key, "competitors": ", ".join(c.key for c in exp.competitors),
            "rounds": rounds, "n3": exp.selection.n3, "n4": exp.selection.n4,
            "|T| requested": exp.selection.test_size, "max per class in T": exp.selection.max_per_class,
            "size bounds": f"{exp.selection.bounds} ({exp.selection.bounds_method}, min_count "
                           f"{exp.selection.min_count})", "rating order": exp.selection.order,
            "rating budget": exp.selection.rating_budget or "all of M", "distance": exp.selection.metric,
            "fine-tune preset": exp.finetune.preset,
            "schedule": (f"{exp.finetune.steps} SGD steps" if exp.finetune.steps
                         else f"{exp.finetune.epochs} epochs"),
            "learning rate(s)": ", ".join(f"{v:g}" for v in exp.finetune.lrs),
            "S(0) replay": exp.finetune.replay,
            "LwF towards f(0)": (f"weight {exp.finetune.lwf_weight:g}, on the round's unlabelled candidates"
                                 if exp.finetune.lwf_weight > 0 else "no"),
            "raters": "simulated (oracle)" if simulated_raters else "people",
            "evaluation pass": (f"T({rounds + 1}) is drawn from M({rounds + 1}) after the last round to "
                                f"evaluate f({rounds}) as well; it trains nothing") if final_eval else "no",
        },
        "rounds": round_rows,
        "table1": t1,
        "help": help_panel,
        "failures": count_failures(image_classes, groups) if groups else None,
        "srcc": ranking_curves(ev),
        "stages": stage_times(layout.root),
    }
    keys = {m.key for m in models}
    if baseline and "f_entropy" in keys and "f(1)" in keys:
        cols = [ts.name for ts in sets if ts.name in ("T(MAD vs entropy)", "T(0)")]
        rows = []
        for method, key in (("MAD", "f(1)"), ("entropy", "f_entropy"), ("none (before fine-tuning)", "f(0)")):
            rows.append({"method": method, "model": key,
                         "values": {c: float(ev.miou(key, c)) for c in cols if (key, c) in ev.confusions}})
        ent = RoundState.load(layout.entropy_root, 1)
        n_ent = len(ent.read(ChooseOutput).S) if ent.done("choose") else None
        results["baseline"] = {
            "test_set": "T(MAD vs entropy): MAD candidates between f_MAD(1) and f_entropy, test-set rules",
            "budget": exp.selection.n4, "columns": cols, "rows": rows,
            "note": f"entropy: the {n_ent} highest-entropy in-domain images of f(0) got pixel labels "
                    "(the raters' out-of-domain flags were applied to both methods)",
        }
    try:
        results["galleries"] = _galleries(layout, models, sets, device)
    except MadsegError as exc:
        log.warning("galleries skipped: %s", exc)
    results["markdown_table1"] = markdown_table(ev, marks={k: g["status"] for k, g in gates.items()})
    atomic_write_json(layout.results, jsonable(results))
    return results
