"""Choosing the unbiased test set T(i+1) from the MAD candidates M(i+1) (pure: numpy only).

Rules (issue 5, after the paper):

1. Drop every candidate a rater flagged out of domain, and every image ever used for
   fine-tuning (S(0), S(1), ..., passed as ``used``).
2. Bucket the rest by their *main foreground class*: the non-background class with the largest
   area in the target's prediction (ties: the smaller class index). An image whose prediction
   has no foreground pixel goes into the ``background`` bucket (index 0). That bucket is kept
   (a missed object is a failure worth testing) and capped like any class.
3. At most ``max_per_class`` images per bucket (default 4), ``size`` images in all (default 30).

Algorithm (deterministic for a given seed, and independent of the order the candidates come in):
inside bucket k the image ids are sorted and then shuffled with ``numpy.random.default_rng([seed,
k])``; the buckets are visited in an order shuffled once with ``default_rng([seed, 2**20])``.
Images are taken round-robin — pass 1 takes the first image of every bucket in that order,
pass 2 the second one, ... — until ``size`` images are taken or every bucket is exhausted or at
its cap. The returned order is the order of taking, so the first k images of T cover as many
classes as possible (used by the ranking-stability curve).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml_backend.classes import VOC_CLASSES

#: Name of the bucket of images whose prediction has no foreground pixel.
BACKGROUND_BUCKET = "background"
_ORDER_STREAM = 2**20


def main_classes(areas: np.ndarray) -> np.ndarray:
    """Main foreground class per image from predicted area fractions.

    ``areas``: (N, C) fractions (or pixel counts) of each class in the target's prediction;
    column 0 is background. Returns (N,) int64: the argmax over columns 1..C-1 (ties: smaller
    index) and 0 where no foreground class has a positive area.
    """
    areas = np.asarray(areas, dtype=np.float64)
    if areas.ndim != 2 or areas.shape[1] < 2:
        raise ValueError(f"areas must have shape (N, C) with C >= 2, got {areas.shape}")
    fg = areas[:, 1:]
    best = fg.argmax(axis=1) + 1
    has_fg = (fg > 0).any(axis=1)
    return np.where(has_fg, best, 0).astype(np.int64)


@dataclass(frozen=True)
class TestSetChoice:
    """The chosen test set and how it came about.

    ``ids``: chosen image ids in taking order; ``main_class``: id -> main class index of every
    eligible candidate; ``per_class``: class name -> number chosen (only non-zero, in class order);
    ``available``: class name -> eligible candidates in that bucket; ``dropped_ood`` /
    ``dropped_used``: candidates left out by rule 1; ``requested``: the asked size.
    """

    ids: list[str]
    main_class: dict[str, int]
    per_class: dict[str, int]
    available: dict[str, int]
    dropped_ood: list[str] = field(default_factory=list)
    dropped_used: list[str] = field(default_factory=list)
    requested: int = 30

    @property
    def shortfall(self) -> int:
        """How many images short of ``requested`` (not enough eligible candidates / caps)."""
        return max(0, self.requested - len(self.ids))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ids": list(self.ids), "per_class": dict(self.per_class), "available": dict(self.available),
            "main_class": dict(self.main_class), "dropped_ood": list(self.dropped_ood),
            "dropped_used": list(self.dropped_used), "requested": self.requested, "shortfall": self.shortfall,
        }


def choose_test_set(
    candidates: Sequence[str],
    main_class: Mapping[str, int] | Sequence[int] | np.ndarray,
    *,
    ood: Collection[str] = (),
    used: Collection[str] = (),
    size: int = 30,
    max_per_class: int = 4,
    seed: int = 0,
    class_names: Sequence[str] = VOC_CLASSES,
) -> TestSetChoice:
    """Choose T(i+1) from the candidate ids (see the module docstring for rules and algorithm).

    ``main_class``: per candidate its main foreground class index (0 = no foreground), either a
    mapping id -> index or a sequence aligned with ``candidates`` (e.g. from :func:`main_classes`).
    ``ood``: ids rated out of domain; ``used``: ids used for fine-tuning in any round.
    Duplicate candidate ids count once.
    """
    if size < 1 or max_per_class < 1:
        raise ValueError(f"size and max_per_class must be >= 1, got {size} and {max_per_class}")
    if isinstance(main_class, Mapping):
        missing = [c for c in candidates if c not in main_class]
        if missing:
            raise ValueError(f"main_class has no entry for candidate(s) {missing[:5]}")
        mc = {c: int(main_class[c]) for c in candidates}
    else:
        seq = list(np.asarray(main_class).reshape(-1).tolist())
        if len(seq) != len(candidates):
            raise ValueError(f"main_class has {len(seq)} entries for {len(candidates)} candidates")
        mc = {}
        for c, k in zip(candidates, seq, strict=True):
            mc.setdefault(c, int(k))
    num_classes = len(class_names)
    bad = sorted({k for k in mc.values() if not 0 <= k < num_classes})
    if bad:
        raise ValueError(f"main class indices {bad} outside 0..{num_classes - 1}")

    ood_set, used_set = set(ood), set(used)
    unique = list(dict.fromkeys(candidates))
    dropped_ood = [c for c in unique if c in ood_set]
    dropped_used = [c for c in unique if c not in ood_set and c in used_set]
    eligible = [c for c in unique if c not in ood_set and c not in used_set]

    buckets: dict[int, list[str]] = {}
    for c in sorted(eligible):
        buckets.setdefault(mc[c], []).append(c)
    for k, ids in buckets.items():
        perm = np.random.default_rng([seed, k]).permutation(len(ids))
        buckets[k] = [ids[j] for j in perm][:max_per_class]
    keys = sorted(buckets)
    order = [keys[j] for j in np.random.default_rng([seed, _ORDER_STREAM]).permutation(len(keys))]

    chosen: list[str] = []
    for rank in range(max_per_class):
        for k in order:
            if len(chosen) >= size:
                break
            if rank < len(buckets[k]):
                chosen.append(buckets[k][rank])

    def name(k: int) -> str:
        return BACKGROUND_BUCKET if k == 0 else class_names[k]

    n_avail = Counter(mc[c] for c in eligible)
    n_chosen = Counter(mc[c] for c in chosen)
    available = {name(k): n_avail[k] for k in sorted(n_avail)}
    per_class = {name(k): n_chosen[k] for k in sorted(n_chosen)}
    return TestSetChoice(
        ids=chosen, main_class={c: mc[c] for c in eligible}, per_class=per_class, available=available,
        dropped_ood=dropped_ood, dropped_used=dropped_used, requested=size,
    )
