"""Fine-tuning a torch zoo model on new labelled pairs, with protection against forgetting.

Recipe (the paper's): SGD (momentum 0.9, weight decay 5e-4), poly learning-rate decay (power
0.9) per step, batch size 2, random scale/crop/flip. Every step mixes a batch drawn from the
original training set S(0) (``replay``) into the batch of new pairs. Without S(0), Learning
without Forgetting adds ``lwf_weight * T^2 * KL(teacher || student)`` on unlabelled images, the
teacher being the frozen original model at temperature T. With several learning rates (default
grid {1e-5, 5e-5, 1e-4}) one run per rate is trained and the best mIoU on ``val`` (T(0)) wins.

Layout of ``out_dir`` (every file written atomically)::

    job.json                   what this fine-tune is (model, data, config); a rerun must match
    runs/lr<k>_<lr>/state.pt   resumable state after the last finished epoch (deleted when done)
    runs/lr<k>_<lr>/model.pth  weights after the last epoch; result.json: val mIoU, losses
    model.pth.json, model.pth  the chosen weights and their sidecar (parent, data, hyper-parameters,
                               metrics, chosen lr); load with load_model(name, checkpoint=..., **options)

A crash leaves at most a stale ``state.pt``; re-running the same call resumes after the last
finished epoch. A loader never sees a partial ``model.pth``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .atomic import atomic_write, atomic_write_bytes, atomic_write_json
from .classes import IGNORE_INDEX
from .datasets import LabelledFolder, SegmentationTrainSet, UnlabelledTrainSet, read_pair, unlabelled_images
from .errors import MadsegError
from .evaluate import evaluate_confusion
from .finetune_config import (  # noqa: F401 - re-exported
    DEFAULT_LR_GRID,
    PRESETS,
    SAMPLING_MODES,
    FinetuneConfig,
    preset_config,
)
from .metrics import gt_class_miou, iou_per_class, miou_from_confusion
from .zoo.base import ModelSpec, SegmentationModel, TorchSegmentationModel, parse_size
from .zoo.checkpoints import sidecar_path

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "madseg-finetune/1"
CHECKPOINT_NAME = "model.pth"


#: Parameter-name pattern of a model's encoder (ESPNetv2/DiCENet ``base_net``, torchvision ``backbone``).
ENCODER_PATTERN = re.compile(r"(^|\.)(base_net|backbone|encoder)\.")


@dataclass
class EpochInfo:
    """Passed to ``on_epoch_end`` after each finished (and saved) epoch."""

    lr: float
    epoch: int  # 1-based number of the finished epoch
    epochs: int
    loss: float
    run_dir: Path


@dataclass
class FinetuneResult:
    """The chosen fine-tuned weights (``checkpoint``, JSON sidecar at ``sidecar``)."""

    checkpoint: Path
    sidecar: Path
    version: str
    lr: float
    val_miou: float | None
    spec: ModelSpec
    runs: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# data plan: which samples each step uses (deterministic per epoch, so resuming is exact)
# ----------------------------------------------------------------------------------------------


class _StepBatches(Dataset):
    """Item ``step`` -> (images [B, 3, h, w], masks [B, h, w] int64, unlabelled [U, 3, h, w] | None).

    The B rows are the new pairs, then the replay pairs, then the pseudo-labelled pairs (the
    trainer splits them again by the counts in the plan).
    """

    def __init__(
        self,
        train: SegmentationTrainSet,
        replay: SegmentationTrainSet | None,
        unlabelled: UnlabelledTrainSet | None,
        plan: list[dict[str, np.ndarray]],
        pseudo: SegmentationTrainSet | None = None,
    ) -> None:
        self.train, self.replay, self.unlabelled, self.plan = train, replay, unlabelled, plan
        self.pseudo = pseudo

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        p = self.plan[step]
        items = [
            self.train.sample(int(i), np.random.default_rng(int(s)))
            for i, s in zip(p["train"], p["train_seed"], strict=True)
        ]
        for key, data in (("replay", self.replay), ("pseudo", self.pseudo)):
            if data is not None and key in p:
                items += [
                    data.sample(int(i), np.random.default_rng(int(s)))
                    for i, s in zip(p[key], p[key + "_seed"], strict=True)
                ]
        images = torch.stack([x for x, _ in items])
        masks = torch.stack([m for _, m in items])
        unl = None
        if self.unlabelled is not None:
            unl = torch.stack([
                self.unlabelled.sample(int(i), np.random.default_rng(int(s)))
                for i, s in zip(p["unl"], p["unl_seed"], strict=True)
            ])
        return images, masks, unl


def balanced_weights(class_sets: Sequence[Collection[int]]) -> np.ndarray:
    """Sampling probabilities (N,) for pairs whose ground truth holds ``class_sets[i]``.

    A pair's weight is ``1 / count`` of its rarest foreground class (count = pairs holding that
    class); a pair with only background gets the weight of the commonest class. Sums to 1.
    """
    counts: dict[int, int] = {}
    for cs in class_sets:
        for k in set(cs):
            counts[k] = counts.get(k, 0) + 1
    fg_counts = [v for k, v in counts.items() if k != 0]
    common = max(fg_counts) if fg_counts else 1
    w = np.array([
        1.0 / min((counts[k] for k in set(cs) if k != 0), default=common) for cs in class_sets
    ], dtype=np.float64)
    return w / w.sum()


def epoch_plan(
    n_train: int,
    n_replay: int,
    n_unl: int,
    cfg: FinetuneConfig,
    epoch: int,
    *,
    weights: np.ndarray | None = None,
    n_pseudo: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Per step of ``epoch``: indices and augmentation seeds of new, replay, pseudo, unlabelled samples.

    The new pairs are visited once per epoch in a random order (batches of ``batch_size``, the
    last one possibly smaller), or, with ``weights`` (N,) (``sampling = "balanced"``), drawn with
    replacement with those probabilities (same number of steps). Replay, pseudo-labelled and
    unlabelled samples are drawn with replacement.
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    if weights is not None:
        order = rng.choice(n_train, size=n_train, replace=True, p=weights)
    else:
        order = rng.permutation(n_train)
    steps = math.ceil(n_train / cfg.batch_size)
    rbs = cfg.replay_batch_size if cfg.replay_batch_size is not None else cfg.batch_size
    ubs = cfg.lwf_batch_size if cfg.lwf_batch_size is not None else cfg.batch_size
    pbs = cfg.pseudo_batch_size if cfg.pseudo_batch_size is not None else cfg.batch_size
    plan = []
    for s in range(steps):
        idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        step: dict[str, np.ndarray] = {"train": idx, "train_seed": rng.integers(0, 2**62, len(idx))}
        if n_replay:
            step["replay"] = rng.integers(0, n_replay, rbs)
            step["replay_seed"] = rng.integers(0, 2**62, rbs)
        if n_unl:
            step["unl"] = rng.integers(0, n_unl, ubs)
            step["unl_seed"] = rng.integers(0, 2**62, ubs)
        if n_pseudo:
            step["pseudo"] = rng.integers(0, n_pseudo, pbs)
            step["pseudo_seed"] = rng.integers(0, 2**62, pbs)
        plan.append(step)
    return plan


def _collate_one(batch: Any) -> Any:
    return batch


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [B, C, h, w] vs [B, h, w] averaged over non-ignored pixels (0 if none)."""
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (masks != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` per pixel, averaged; logits [U, C, h, w]."""
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
    return kl.mean() * (t * t)


@torch.no_grad()
def training_loss(model: SegmentationModel, labelled: LabelledFolder | Sequence[tuple[Path, Path]]) -> float:
    """Mean cross-entropy of ``model`` on labelled pairs at its input size (no augmentation).

    Masks are resized (nearest) to the input size; pixels with 255 are ignored.
    """
    if not isinstance(model, TorchSegmentationModel) or model.module is None:
        raise MadsegError(f"{model.name}: training_loss needs a torch model")
    pairs = labelled.pairs if isinstance(labelled, LabelledFolder) else list(labelled)
    prep = model.preprocessor()
    total, count = 0.0, 0
    for img_path, mask_path in pairs:
        image, mask = read_pair(img_path, mask_path, model.num_classes)
        x = prep(image)[None].to(model.device)
        m = torch.from_numpy(mask.astype(np.int64))[None, None].float()
        m = F.interpolate(m, size=model.input_size, mode="nearest")[0].long().to(model.device)
        with torch.inference_mode():
            logits = model._logits(x).float()
        total += float(F.cross_entropy(logits, m, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((m != IGNORE_INDEX).sum())
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------
# the fine-tune job
# ----------------------------------------------------------------------------------------------


def _describe(data: LabelledFolder | Sequence[Path] | None) -> Any:
    if data is None:
        return None
    if isinstance(data, LabelledFolder):
        return data.describe()
    paths = sorted(str(Path(p).resolve()) for p in data)
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    return {"count": len(paths), "first": paths[:3], "paths_sha256": digest}


def _lr_tag(k: int, lr: float) -> str:
    return f"lr{k}_{lr:g}"


def _save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _set_train_mode(module: nn.Module, freeze_bn: bool) -> None:
    module.train()
    if freeze_bn:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _reload_spec(model: TorchSegmentationModel) -> ModelSpec:
    opts = {k: v for k, v in model.spec.options.items() if k not in ("weights", "seed")}
    return ModelSpec(model.spec.name, None, opts)


def _load_result(spec: ModelSpec, checkpoint: Path, device: torch.device) -> SegmentationModel:
    from .zoo import load_model

    return load_model(spec.name, str(checkpoint), device=device, **dict(spec.options))


class NonFiniteLossError(MadsegError):
    """Training produced a non-finite loss or gradient; the run stopped and wrote no checkpoint."""


def _param_groups(
    student: nn.Module, lr: float, encoder_lr_mult: float
) -> tuple[list[dict[str, Any]], list[tuple[str, nn.Parameter]]]:
    """SGD parameter groups (encoder at ``lr * encoder_lr_mult``, the rest at ``lr``) and the trained
    (name, parameter) list. With ``encoder_lr_mult == 0`` the encoder is frozen (no gradients)."""
    enc: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    named: list[tuple[str, nn.Parameter]] = []
    for name, prm in student.named_parameters():
        if ENCODER_PATTERN.search(name):
            if encoder_lr_mult == 0:
                prm.requires_grad_(False)
                continue
            enc.append(prm)
        else:
            rest.append(prm)
        prm.requires_grad_(True)
        named.append((name, prm))
    if not rest and not enc:
        raise MadsegError("finetune: no trainable parameters (encoder_lr_mult = 0 and no decoder?)")
    groups = [{"params": rest, "lr": lr, "lr_mult": 1.0}]
    if enc:
        groups.append({"params": enc, "lr": lr * encoder_lr_mult, "lr_mult": float(encoder_lr_mult)})
    return [g for g in groups if g["params"]], named


class _Trainer:
    def __init__(
        self,
        model: TorchSegmentationModel,
        train: SegmentationTrainSet,
        replay: SegmentationTrainSet | None,
        unlabelled: UnlabelledTrainSet | None,
        cfg: FinetuneConfig,
        progress: bool,
        on_epoch_end: Callable[[EpochInfo], None] | None,
        *,
        pseudo: SegmentationTrainSet | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        self.model, self.train, self.replay, self.unl = model, train, replay, unlabelled
        self.pseudo, self.weights = pseudo, weights
        self.cfg, self.progress, self.on_epoch_end = cfg, progress, on_epoch_end
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        if cfg.num_workers is not None:
            self.num_workers = cfg.num_workers
        else:
            self.num_workers = 0 if model.device.type == "cpu" else min(4, os.cpu_count() or 1)
        self.where = ""

    def run(self, k: int, lr: float, run_dir: Path) -> tuple[Path, list[float]]:
        """Train one learning rate (resuming from ``run_dir/state.pt``); return (weights, epoch losses).

        Raises :class:`NonFiniteLossError` (nothing written for the failing epoch, no ``model.pth``)
        when a loss or gradient becomes NaN/inf.
        """
        cfg, model = self.cfg, self.model
        dev = model.device
        student = copy.deepcopy(model.module)
        assert student is not None
        student.to(dev)
        groups, named = _param_groups(student, lr, cfg.encoder_lr_mult)
        params = [prm for _, prm in named]
        # L2-SP: decay towards the parent's weights instead of towards zero.
        anchor = [prm.detach().clone() for prm in params] if cfg.l2sp_weight > 0 else None
        wd = 0.0 if anchor is not None else cfg.weight_decay
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=wd)
        ema = None
        if cfg.ema_decay > 0:
            ema = {n: v.detach().clone().float() for n, v in student.state_dict().items()
                   if v.is_floating_point()}
        state_file = run_dir / "state.pt"
        start, losses = 0, []
        if state_file.is_file():
            state = torch.load(state_file, map_location=dev, weights_only=True)
            student.load_state_dict(state["module"])
            opt.load_state_dict(state["optimizer"])
            if ema is not None and state.get("ema") is not None:
                ema = {n: v.to(dev) for n, v in state["ema"].items()}
            start, losses = int(state["epoch"]), [float(v) for v in state["losses"]]
            log.info("lr %g: resuming after epoch %d/%d", lr, start, cfg.epochs)
        teacher = model.module if self.unl is not None and cfg.lwf_weight > 0 else None
        if teacher is not None:
            teacher.eval()
        total = cfg.epochs * self.steps_per_epoch
        bar = tqdm(total=total, initial=start * self.steps_per_epoch, unit="step",
                   desc=f"finetune lr={lr:g}", disable=not self.progress)
        try:
            for epoch in range(start, cfg.epochs):
                n_replay = len(self.replay) if self.replay is not None else 0
                n_unl = len(self.unl) if self.unl is not None else 0
                n_pseudo = len(self.pseudo) if self.pseudo is not None else 0
                plan = epoch_plan(len(self.train), n_replay, n_unl, cfg, epoch, weights=self.weights,
                                  n_pseudo=n_pseudo)
                loader = DataLoader(
                    _StepBatches(self.train, self.replay, self.unl, plan, self.pseudo),
                    batch_size=None,
                    shuffle=False,
                    num_workers=self.num_workers,
                    collate_fn=_collate_one,
                    pin_memory=dev.type == "cuda",
                )
                _set_train_mode(student, cfg.freeze_bn)
                run_loss, n = 0.0, 0
                for s, (images, masks, unl) in enumerate(loader):
                    it = epoch * self.steps_per_epoch + s
                    cur_lr = lr * (1.0 - it / total) ** cfg.poly_power
                    for g in opt.param_groups:
                        g["lr"] = cur_lr * g.get("lr_mult", 1.0)
                    self.where = (f"run {run_dir.name} (lr {lr:g}), epoch {epoch + 1}/{cfg.epochs}, "
                                  f"step {s + 1}")
                    n_new = len(plan[s]["train"])
                    n_pseudo_step = len(plan[s].get("pseudo", ()))
                    loss = self._step(student, teacher, opt, images, masks, unl, n_new, n_pseudo_step,
                                      params, anchor)
                    if ema is not None:
                        with torch.no_grad():
                            for name, v in student.state_dict().items():
                                if name in ema:
                                    ema[name].mul_(cfg.ema_decay).add_(v.float(), alpha=1 - cfg.ema_decay)
                    run_loss += loss
                    n += 1
                    bar.update(1)
                    bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss:.4f}", lr=f"{cur_lr:.2e}")
                losses.append(run_loss / max(n, 1))
                _save_torch(state_file, {
                    "epoch": epoch + 1,
                    "module": student.state_dict(),
                    "optimizer": opt.state_dict(),
                    "losses": losses,
                    "ema": ema,
                })
                if self.on_epoch_end is not None:
                    self.on_epoch_end(EpochInfo(lr, epoch + 1, cfg.epochs, losses[-1], run_dir))
        finally:
            bar.close()
        if ema is not None:
            sd = student.state_dict()
            student.load_state_dict({n: (ema[n].to(v.dtype) if n in ema else v) for n, v in sd.items()})
        weights = run_dir / CHECKPOINT_NAME
        _save_torch(weights, model.checkpoint_state(student))
        return weights, losses

    def _step(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        opt: torch.optim.Optimizer,
        images: torch.Tensor,
        masks: torch.Tensor,
        unl: torch.Tensor | None,
        n_new: int,
        n_pseudo: int,
        params: list[nn.Parameter],
        anchor: list[torch.Tensor] | None,
    ) -> float:
        """One SGD step; returns the loss. Labelled rows: ``n_new`` new pairs, then replay, then
        ``n_pseudo`` pseudo-labelled pairs (weighted by ``pseudo_weight``)."""
        model, dev, cfg = self.model, self.model.device, self.cfg
        masks = masks.to(dev, non_blocking=True)
        x = images if unl is None or teacher is None else torch.cat([images, unl])
        x = model.prepare_input(x)
        with model.autocast():
            logits = student(x)
        n = images.shape[0]
        n_real = n - n_pseudo
        loss = segmentation_loss(logits[:n_real], masks[:n_real])
        if n_pseudo:
            loss = loss + cfg.pseudo_weight * segmentation_loss(logits[n_real:n], masks[n_real:])
        if teacher is not None and unl is not None:
            with torch.no_grad(), model.autocast():
                t_logits = teacher(model.prepare_input(unl))
            kd = distillation_loss(logits[n:], t_logits, cfg.lwf_temperature)
            loss = loss + cfg.lwf_weight * kd
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"finetune: the loss became {loss.detach().item()} in {self.where}; the run stopped "
                "and wrote no checkpoint. Lower the learning rate (or clip_grad_norm) and use a new "
                "output folder, or check the masks"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"finetune: the gradient norm became {float(grad_norm)} in {self.where}; the run "
                "stopped and wrote no checkpoint. Lower the learning rate and use a new output folder"
            )
        if anchor is not None:  # L2-SP, applied after clipping like SGD's own weight decay
            with torch.no_grad():
                for prm, p0 in zip(params, anchor, strict=True):
                    if prm.grad is not None:
                        prm.grad.add_(prm.detach() - p0, alpha=cfg.l2sp_weight)
        opt.step()
        return float(loss.detach())


def finetune(
    model: SegmentationModel,
    train: LabelledFolder,
    out_dir: str | os.PathLike[str],
    *,
    replay: LabelledFolder | None = None,
    val: LabelledFolder | None = None,
    unlabelled: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    pseudo: LabelledFolder | None = None,
    config: FinetuneConfig | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[EpochInfo], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``train`` (new pairs), write the chosen weights to ``out_dir``.

    ``replay`` = S(0) (a batch mixed into every step), ``val`` = T(0) (chooses among ``config.lrs``;
    required for more than one rate), ``unlabelled`` = images (folder or files) for LwF
    distillation, ``pseudo`` = pseudo-labelled pairs (255 = ignore; e.g. from
    :mod:`ml_backend.pseudolabels`), weighted by ``config.pseudo_weight``. The model passed in is not
    modified. Re-running the same call resumes; a finished job returns its result at once. See the
    module docstring for the files written.
    """
    cfg = copy.deepcopy(config) if config is not None else FinetuneConfig()
    cfg.lrs = tuple(float(v) for v in cfg.lrs)
    cfg.validate()
    if not isinstance(model, TorchSegmentationModel) or not model.trainable or model.module is None:
        raise MadsegError(
            f"finetune: model {model.name} cannot be fine-tuned (only espnetv2, dicenet and torchvision:* "
            "models have a trainable architecture)"
        )
    if len(cfg.lrs) > 1 and val is None:
        raise MadsegError(
            f"finetune: choosing among learning rates {list(cfg.lrs)} needs a validation set (val=); "
            "pass one, or a single learning rate"
        )
    if cfg.steps is not None:
        cfg.epochs = max(1, math.ceil(cfg.steps / max(1, math.ceil(len(train) / cfg.batch_size))))
    crop = parse_size(cfg.crop_size) if cfg.crop_size is not None else model.input_size
    c = model.num_classes
    for name, data in (("train", train), ("replay", replay), ("val", val), ("pseudo", pseudo)):
        if data is not None:
            if len(data) == 0:
                raise MadsegError(f"finetune: the {name} set {data.root} selects no images")
            data.check(c)
    unl_paths = unlabelled_images(unlabelled) if unlabelled is not None else None
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    spec = _reload_spec(model)
    job = {
        "format": SIDECAR_FORMAT,
        "model": spec.to_dict(),
        "parent": {
            "version": model.version,
            "checkpoint": str(model.checkpoint) if model.checkpoint else None,
        },
        "data": {
            "train": _describe(train),
            "replay": _describe(replay),
            "val": _describe(val),
            "unlabelled": _describe(unl_paths),
            "pseudo": _describe(pseudo),
        },
        "hyperparameters": {**_jsonable_config(cfg), "crop_size": list(crop)},
    }
    job_file = out / "job.json"
    if job_file.is_file():
        try:
            old = json.loads(job_file.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old != json.loads(json.dumps(job)):
            raise MadsegError(
                f"finetune: {out} holds a different fine-tune (its job.json differs: model, data or "
                "hyper-parameters); use a new output folder or delete that one"
            )
    else:
        atomic_write_json(job_file, job)

    mean, std = model.mean, model.std
    train_set = SegmentationTrainSet(train.pairs, crop, mean, std, num_classes=c,
                                     scale_range=cfg.scale_range, flip=cfg.flip, seed=cfg.seed)
    replay_set = None
    if replay is not None:
        replay_set = SegmentationTrainSet(replay.pairs, crop, mean, std, num_classes=c,
                                          scale_range=cfg.scale_range, flip=cfg.flip, seed=cfg.seed)
    unl_set = None
    if unl_paths is not None and cfg.lwf_weight > 0:
        unl_set = UnlabelledTrainSet(unl_paths, crop, mean, std, scale_range=cfg.scale_range,
                                     flip=cfg.flip, seed=cfg.seed)
    pseudo_set = None
    if pseudo is not None and cfg.pseudo_weight > 0:
        pseudo_set = SegmentationTrainSet(pseudo.pairs, crop, mean, std, num_classes=c,
                                          scale_range=cfg.scale_range, flip=cfg.flip, seed=cfg.seed)
    weights = None
    if cfg.sampling == "balanced":
        weights = balanced_weights([
            [k for k in np.unique(read_pair(i, m, c)[1]).tolist() if k != IGNORE_INDEX]
            for i, m in train.pairs
        ])
    trainer = _Trainer(model, train_set, replay_set, unl_set, cfg, progress, on_epoch_end,
                       pseudo=pseudo_set, weights=weights)

    runs: list[dict[str, Any]] = []
    for k, lr in enumerate(cfg.lrs):
        run_dir = out / "runs" / _lr_tag(k, lr)
        result_file = run_dir / "result.json"
        if result_file.is_file() and (run_dir / CHECKPOINT_NAME).is_file():
            runs.append(json.loads(result_file.read_text(encoding="utf-8")))
            continue
        t0 = time.time()
        weights, losses = trainer.run(k, lr, run_dir)
        run: dict[str, Any] = {"lr": lr, "epochs": cfg.epochs, "train_loss": losses,
                               "checkpoint": str(weights), "seconds": round(time.time() - t0, 1)}
        if val is not None:
            tuned = _load_result(spec, weights, model.device)
            cm = evaluate_confusion(tuned, val, cfg.eval_batch_size, progress=progress, desc=f"val lr={lr:g}")
            per_class = iou_per_class(cm)
            run.update(val_miou=miou_from_confusion(cm), val_gt_miou=gt_class_miou(cm),
                       val_per_class=[None if np.isnan(v) else float(v) for v in per_class])
        atomic_write_json(result_file, run)
        (run_dir / "state.pt").unlink(missing_ok=True)
        runs.append(run)

    best = max(runs, key=lr_choice_score) if val is not None else runs[0]
    final = out / CHECKPOINT_NAME
    chosen = Path(best["checkpoint"])
    tuned = _load_result(spec, chosen, model.device)
    sidecar = {
        **job,
        "model": {"name": spec.name, "options": dict(spec.options)},
        "version": tuned.version,
        "lr": best["lr"],
        "metrics": {
            "val_miou": best.get("val_miou"),
            "val_gt_miou": best.get("val_gt_miou"),
            "val_per_class": best.get("val_per_class"),
            "train_loss": best["train_loss"],
            "runs": [{"lr": r["lr"], "val_miou": r.get("val_miou"), "val_gt_miou": r.get("val_gt_miou"),
                      "final_train_loss": r["train_loss"][-1]}
                     for r in runs],
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # The sidecar goes first: whenever model.pth exists, its sidecar does too.
    atomic_write_json(sidecar_path(final), sidecar)
    atomic_write_bytes(final, chosen.read_bytes())
    version = _load_result(spec, final, model.device).version
    return FinetuneResult(
        checkpoint=final,
        sidecar=sidecar_path(final),
        version=version,
        lr=float(best["lr"]),
        val_miou=best.get("val_miou"),
        spec=ModelSpec(spec.name, str(final), dict(spec.options)),
        runs=runs,
    )


def lr_choice_score(run: dict[str, Any]) -> float:
    """How a learning rate's run is ranked on ``val`` (T(0)): its ground-truth-class mIoU
    (:func:`ml_backend.metrics.gt_class_miou`), which one spurious predicted class on a small T(0)
    cannot swing; runs recorded before that metric existed fall back to their standard mIoU."""
    score = run.get("val_gt_miou", run.get("val_miou"))
    return -1.0 if score is None else float(score)


def _jsonable_config(cfg: FinetuneConfig) -> dict[str, Any]:
    d = asdict(cfg)
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    d.pop("num_workers", None)  # how, not what: a resume may use other workers
    d.pop("eval_batch_size", None)
    return d
