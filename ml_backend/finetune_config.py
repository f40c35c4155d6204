"""Hyper-parameters of fine-tuning and the presets (torch-free, so experiment files can read them).

:mod:`ml_backend.finetune` re-exports everything here; ``PRESETS`` is the one source of truth for
``madseg finetune --preset`` and the experiment's ``[finetune] preset``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import MadsegError

DEFAULT_LR_GRID: tuple[float, ...] = (1e-5, 5e-5, 1e-4)
SAMPLING_MODES = ("uniform", "balanced")


@dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune`.

    The defaults are the recipe chosen on DEV splits by ``benchmarks/efficacy_finetune.py --dev``:
    one LR 3e-5, all layers, uniform sampling of the new pairs, global-norm clip 10, 40 steps in the
    ``demo`` preset. Round 1: LR 1e-4 with all layers, with a 0.1 encoder LR or with L2-SP did more
    harm to T(0). Round 2 first chose class-balanced sampling on ONE dev seed (failure-zone
    differences <= 0.006, below the seed spread; not confirmed on the test seeds). The choice was then
    redone on 3 dev seeds (0, 1, 2; each its own split, training failures and dev sets; never a test
    set) with the rule fixed in the script before seeds 1 and 2 were run: the round-2 rule applied to
    the MEAN dev gains, and a replacement of uniform sampling must beat its mean dev failure-zone gain
    by more than 0.001 AND by more than the standard error of the paired per-seed difference.
    Balanced sampling no longer qualifies (mean dev T(0) -0.013 < -0.01; failure zone -0.006 +- 0.038),
    so ``sampling`` is back to ``"uniform"``. The rule picks LwF (distil f(0) on the rated-but-
    unlabelled images, weight 1, with S(0) replay; the only method qualifying on the means: dev
    failure zone +0.001 vs -0.002, random +0.002 vs -0.013, T(0) -0.005 vs -0.017; paired failure-zone
    difference +0.003, SE 0.002). In :func:`finetune` LwF is on whenever ``unlabelled`` images are
    given (``lwf_weight`` = 1.0 below); it is not a config-only switch: the caller passes the images
    (``madseg finetune --unlabelled``; the rounds' ``demo`` preset passes the round's unlabelled
    candidates, ``[finetune] lwf_weight = 0`` switches it off). The README has the
    numbers. The scale range 0.75-1.25 of the inference scale was not benchmarked here: the issue
    measured that 0.5-2.0 hurts. ``PRESETS["paper"]`` is the
    paper's recipe. ``lrs``: one rate, or a grid chosen on ``val``. ``replay_batch_size``: S(0) images
    mixed into each step (default = ``batch_size``). ``lwf_weight``: weight of the distillation term
    when unlabelled images are given. ``freeze_bn``: keep BatchNorm statistics fixed (a batch of 2 + 2
    images gives noisy statistics); BN affine parameters are still trained. ``crop_size``: training
    crop (default: the model's input size).

    ``steps``: when set, the number of SGD steps; it replaces ``epochs`` (epochs = ceil(steps /
    steps per epoch), so a few labelled images get as many updates as many do).

    Stability: ``clip_grad_norm`` clips the global gradient norm of each step (None = off); a
    non-finite loss or gradient stops the run with :class:`MadsegError` and writes no checkpoint.

    Ways to learn more from few labels (all off by default; LwF, the dev choice, acts only when
    unlabelled images are given):
    ``encoder_lr_mult`` multiplies the LR of the encoder (``base_net``/``backbone``) parameters
    (0 = encoder frozen, only the decoder/classifier trains); ``sampling = "balanced"`` draws the
    new pairs with probability inversely proportional to the frequency of their rarest ground-truth
    class (instead of each pair once per epoch); ``l2sp_weight`` replaces weight decay towards 0 by
    decay towards the parent's weights (L2-SP, Li et al. 2018); ``ema_decay`` > 0 keeps an
    exponential moving average of the weights and saves it as the result; ``pseudo_weight`` weighs
    the loss on pseudo-labelled pairs (``finetune(pseudo=...)``, e.g. pixels where the competitors
    agree, 255 elsewhere), ``pseudo_batch_size`` of them per step.
    """

    epochs: int = 5
    steps: int | None = None
    batch_size: int = 2
    replay_batch_size: int | None = None
    lrs: tuple[float, ...] = (3e-5,)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    scale_range: tuple[float, float] = (0.75, 1.25)
    flip: bool = True
    crop_size: tuple[int, int] | None = None
    lwf_weight: float = 1.0
    lwf_temperature: float = 2.0
    lwf_batch_size: int | None = None
    freeze_bn: bool = True
    clip_grad_norm: float | None = 10.0
    encoder_lr_mult: float = 1.0
    sampling: str = "uniform"
    l2sp_weight: float = 0.0
    ema_decay: float = 0.0
    pseudo_weight: float = 0.5
    pseudo_batch_size: int | None = None
    seed: int = 0
    num_workers: int | None = None
    eval_batch_size: int = 8

    def validate(self) -> None:
        """Raise :class:`MadsegError` for impossible values."""
        if self.steps is not None and self.steps < 1:
            raise MadsegError(f"finetune: steps must be >= 1 (or unset), got {self.steps}")
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
        if self.clip_grad_norm is not None and not (self.clip_grad_norm > 0):
            raise MadsegError(
                f"finetune: clip_grad_norm must be > 0 or None (off), got {self.clip_grad_norm}"
            )
        if not (self.encoder_lr_mult >= 0):
            raise MadsegError(f"finetune: encoder_lr_mult must be >= 0, got {self.encoder_lr_mult}")
        if self.sampling not in SAMPLING_MODES:
            raise MadsegError(
                f"finetune: sampling {self.sampling!r} unknown; use one of {list(SAMPLING_MODES)}"
            )
        if not (self.l2sp_weight >= 0) or not (0 <= self.ema_decay < 1) or not (self.pseudo_weight >= 0):
            raise MadsegError(
                "finetune: l2sp_weight and pseudo_weight must be >= 0 and ema_decay in [0, 1), got "
                f"{self.l2sp_weight}, {self.pseudo_weight}, {self.ema_decay}"
            )


#: The fine-tune presets (one source of truth: ``madseg finetune --preset`` and the experiment's
#: ``[finetune] preset`` both read them). ``paper``: the paper's recipe (80 epochs, LR grid
#: {1, 5, 10}e-5, scale 0.5-2.0, uniform sampling) plus the stability guards; ``demo``: the defaults of
#: :class:`FinetuneConfig` (chosen on a dev split by ``benchmarks/efficacy_finetune.py``) with the
#: benchmark's schedule of 40 SGD steps whatever the number of labelled images.
PRESETS: dict[str, FinetuneConfig] = {
    "paper": FinetuneConfig(epochs=80, lrs=DEFAULT_LR_GRID, scale_range=(0.5, 2.0), sampling="uniform"),
    "demo": FinetuneConfig(steps=40),
}


def preset_config(name: str, **overrides: Any) -> FinetuneConfig:
    """A copy of ``PRESETS[name]`` with ``overrides`` (FinetuneConfig field names) applied."""
    if name not in PRESETS:
        raise MadsegError(f"finetune: preset {name!r} unknown; use one of {sorted(PRESETS)}")
    fields = set(asdict(PRESETS[name]))
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise MadsegError(f"finetune: unknown setting(s) {unknown}; known: {sorted(fields)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)
