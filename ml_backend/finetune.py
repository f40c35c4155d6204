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
import time
from collections.abc import Callable, Sequence
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
from .metrics import gt_class_miou, iou_per_class, miou_from_confusion
from .zoo.base import ModelSpec, SegmentationModel, TorchSegmentationModel, parse_size
from .zoo.checkpoints import sidecar_path

log = logging.getLogger(__name__)

DEFAULT_LR_GRID: tuple[float, ...] = (1e-5, 5e-5, 1e-4)
SIDECAR_FORMAT = "madseg-finetune/1"
CHECKPOINT_NAME = "model.pth"


@dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune` (defaults: the paper's recipe).

    ``lrs``: one rate, or a grid chosen by mIoU on ``val``. ``replay_batch_size``: S(0) images
    mixed into each step (default = ``batch_size``). ``lwf_weight``: weight of the distillation
    term when unlabelled images are given. ``freeze_bn``: keep BatchNorm statistics fixed (a batch
    of 2 + 2 images gives noisy statistics); BN affine parameters are still trained.
    ``crop_size``: training crop (default: the model's input size).
    """

    epochs: int = 80
    batch_size: int = 2
    replay_batch_size: int | None = None
    lrs: tuple[float, ...] = DEFAULT_LR_GRID
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    crop_size: tuple[int, int] | None = None
    lwf_weight: float = 1.0
    lwf_temperature: float = 2.0
    lwf_batch_size: int | None = None
    freeze_bn: bool = True
    seed: int = 0
    num_workers: int | None = None
    eval_batch_size: int = 8

    def validate(self) -> None:
        """Raise :class:`MadsegError` for impossible values."""
        if self.epochs < 1 or self.batch_size < 1:
            raise MadsegError(
                f"finetune: epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1"
            )
        if not self.lrs or any(not (lr > 0) for lr in self.lrs):
            raise MadsegError(f"finetune: learning rates must be positive, got {self.lrs}")
        lo, hi = self.scale_range
        if not (0 < lo <= hi):
            raise MadsegError(f"finetune: scale_range {self.scale_range} must satisfy 0 < min <= max")
        if self.lwf_temperature <= 0 or self.lwf_weight < 0:
            raise MadsegError("finetune: lwf_temperature must be > 0 and lwf_weight >= 0")


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
    """Item ``step`` -> (images [B, 3, h, w], masks [B, h, w] int64, unlabelled [U, 3, h, w] | None)."""

    def __init__(
        self,
        train: SegmentationTrainSet,
        replay: SegmentationTrainSet | None,
        unlabelled: UnlabelledTrainSet | None,
        plan: list[dict[str, np.ndarray]],
    ) -> None:
        self.train, self.replay, self.unlabelled, self.plan = train, replay, unlabelled, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        p = self.plan[step]
        items = [
            self.train.sample(int(i), np.random.default_rng(int(s)))
            for i, s in zip(p["train"], p["train_seed"], strict=True)
        ]
        if self.replay is not None:
            items += [
                self.replay.sample(int(i), np.random.default_rng(int(s)))
                for i, s in zip(p["replay"], p["replay_seed"], strict=True)
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


def epoch_plan(
    n_train: int, n_replay: int, n_unl: int, cfg: FinetuneConfig, epoch: int
) -> list[dict[str, np.ndarray]]:
    """Per step of ``epoch``: indices and augmentation seeds of the new, replay and unlabelled samples.

    The new pairs are visited once per epoch in a random order (batches of ``batch_size``, the
    last one possibly smaller); replay and unlabelled samples are drawn with replacement.
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(n_train)
    steps = math.ceil(n_train / cfg.batch_size)
    rbs = cfg.replay_batch_size if cfg.replay_batch_size is not None else cfg.batch_size
    ubs = cfg.lwf_batch_size if cfg.lwf_batch_size is not None else cfg.batch_size
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
    ) -> None:
        self.model, self.train, self.replay, self.unl = model, train, replay, unlabelled
        self.cfg, self.progress, self.on_epoch_end = cfg, progress, on_epoch_end
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        if cfg.num_workers is not None:
            self.num_workers = cfg.num_workers
        else:
            self.num_workers = 0 if model.device.type == "cpu" else min(4, os.cpu_count() or 1)

    def run(self, k: int, lr: float, run_dir: Path) -> tuple[Path, list[float]]:
        """Train one learning rate (resuming from ``run_dir/state.pt``); return (weights, epoch losses)."""
        cfg, model = self.cfg, self.model
        dev = model.device
        student = copy.deepcopy(model.module)
        assert student is not None
        student.to(dev)
        params = [p for p in student.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        state_file = run_dir / "state.pt"
        start, losses = 0, []
        if state_file.is_file():
            state = torch.load(state_file, map_location=dev, weights_only=True)
            student.load_state_dict(state["module"])
            opt.load_state_dict(state["optimizer"])
            start, losses = int(state["epoch"]), [float(v) for v in state["losses"]]
            log.info("lr %g: resuming after epoch %d/%d", lr, start, cfg.epochs)
        teacher = model.module if self.unl is not None and cfg.lwf_weight > 0 else None
        total = cfg.epochs * self.steps_per_epoch
        bar = tqdm(total=total, initial=start * self.steps_per_epoch, unit="step",
                   desc=f"finetune lr={lr:g}", disable=not self.progress)
        try:
            for epoch in range(start, cfg.epochs):
                n_replay = len(self.replay) if self.replay is not None else 0
                n_unl = len(self.unl) if self.unl is not None else 0
                plan = epoch_plan(len(self.train), n_replay, n_unl, cfg, epoch)
                loader = DataLoader(
                    _StepBatches(self.train, self.replay, self.unl, plan),
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
                        g["lr"] = cur_lr
                    loss = self._step(student, teacher, opt, images, masks, unl)
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
                })
                if self.on_epoch_end is not None:
                    self.on_epoch_end(EpochInfo(lr, epoch + 1, cfg.epochs, losses[-1], run_dir))
        finally:
            bar.close()
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
    ) -> float:
        model, dev = self.model, self.model.device
        masks = masks.to(dev, non_blocking=True)
        x = images if unl is None or teacher is None else torch.cat([images, unl])
        x = model.prepare_input(x)
        with model.autocast():
            logits = student(x)
        n = images.shape[0]
        loss = segmentation_loss(logits[:n], masks)
        if teacher is not None and unl is not None:
            with torch.no_grad(), model.autocast():
                t_logits = teacher(model.prepare_input(unl))
            kd = distillation_loss(logits[n:], t_logits, self.cfg.lwf_temperature)
            loss = loss + self.cfg.lwf_weight * kd
        if not torch.isfinite(loss):
            raise MadsegError(
                f"finetune: the loss became {loss.detach().item()}; "
                "lower the learning rate or check the masks"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
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
    config: FinetuneConfig | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[EpochInfo], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``train`` (new pairs), write the chosen weights to ``out_dir``.

    ``replay`` = S(0) (a batch mixed into every step), ``val`` = T(0) (chooses among ``config.lrs``;
    required for more than one rate), ``unlabelled`` = images (folder or files) for LwF
    distillation. The model passed in is not modified. Re-running the same call resumes; a
    finished job returns its result at once. See the module docstring for the files written.
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
    crop = parse_size(cfg.crop_size) if cfg.crop_size is not None else model.input_size
    c = model.num_classes
    for name, data in (("train", train), ("replay", replay), ("val", val)):
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
    trainer = _Trainer(model, train_set, replay_set, unl_set, cfg, progress, on_epoch_end)

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
