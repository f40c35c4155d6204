"""The promotion gate: a fine-tuned version is served only if it does not regress against its parent.

Pure logic (no I/O): the caller evaluates the parent (the version served now) and the child (the
fresh fine-tune) on the same images and passes per-image confusion matrices; :func:`decide`
returns a :class:`GateDecision` (promoted or not, the reasons, the numbers).

Criteria (all must hold; defaults in :class:`GateCriteria`):

1. **T(0), no forgetting.** On the fixed test set T(0) the child's ground-truth-class mIoU
   (:func:`ml_backend.metrics.gt_class_miou`: a spurious predicted class absent from T(0) adds
   no zero-IoU term, so one stray blob on a 7-image set cannot swing it) may fall by at most
   ``t0_tolerance`` (0.01) below the parent's. The drop is the point estimate on the whole set.
   With an *anchor* (the original model, e.g. f(0)), the child must also be within
   ``t0_tolerance`` of the anchor, so small drops cannot add up over many promotions.
2. **The failure images, the fix.** On the labelled failure images the child was not trained
   on (in a round: the unbiased test sets T(1..i) of the MAD candidates, minus any training
   image), the child's ground-truth-class mIoU must not be below the parent's by more than
   ``failure_tolerance`` (default 0.0: not worse at all). With ``require_failure_gain`` the
   lower end of the paired-bootstrap interval of the gain must be above 0 (a gain that the
   image sample cannot explain away).
3. **Gate data.** A criterion without images cannot be checked. No T(0) images -> rejected.
   No failure images -> rejected when ``require_failures`` (the round's default), else the
   decision rests on T(0) alone and says so (the backend's webhook path: every finished mask
   of the project is training data, so it has no held-out failure images).

The spread of every difference is reported as a paired bootstrap over images (``n_boot``
resamples of the image indices, the same resample for parent and child, ``confidence``
two-sided percentile interval); it decides only criterion 2 with ``require_failure_gain``.
Both the standard mIoU and the ground-truth-class mIoU are reported for each set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .metrics import gt_class_miou, miou_from_confusion

GATE_FORMAT = "madseg-gate/1"


@dataclass(frozen=True)
class GateCriteria:
    """Thresholds of the gate (see the module docstring). Values are on the 0..1 mIoU scale."""

    t0_tolerance: float = 0.01
    failure_tolerance: float = 0.0
    require_failures: bool = True
    require_failure_gain: bool = False
    n_boot: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.t0_tolerance >= 0 and self.failure_tolerance >= 0):
            raise ValueError("gate tolerances must be >= 0")
        if self.n_boot < 0 or not (0 < self.confidence < 1):
            raise ValueError("gate n_boot must be >= 0 and confidence in (0, 1)")

    @classmethod
    def from_dict(cls, obj: dict[str, Any] | None) -> GateCriteria:
        """Criteria from a JSON object of field names; unknown keys -> ValueError naming them."""
        obj = dict(obj or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"unknown gate setting(s) {unknown}; known: {sorted(known)}")
        return cls(**obj)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SetComparison:
    """Parent vs child on one image set (per-image confusions (N, C, C) of each)."""

    name: str
    n_images: int
    parent_miou: float
    child_miou: float
    parent_gt_miou: float
    child_gt_miou: float
    delta_gt_miou: float
    ci_low: float | None
    ci_high: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    """``promoted``: serve the child; ``reasons``: one line per criterion (failed ones first when
    rejected); ``metrics``: the :class:`SetComparison` of each set, by name."""

    promoted: bool
    reasons: list[str]
    metrics: dict[str, SetComparison] = field(default_factory=dict)
    criteria: GateCriteria = field(default_factory=GateCriteria)

    @property
    def status(self) -> str:
        return "promoted" if self.promoted else "rejected"

    @property
    def reason(self) -> str:
        """All reasons as one line (for logs, ``/versions`` and the report)."""
        return "; ".join(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"format": GATE_FORMAT, "promoted": self.promoted, "status": self.status,
                "reasons": list(self.reasons), "metrics": {k: v.to_json() for k, v in self.metrics.items()},
                "criteria": self.criteria.to_json()}


def bootstrap_delta(
    parent: np.ndarray, child: np.ndarray, n_boot: int, confidence: float, seed: int = 0
) -> tuple[float, float] | None:
    """Paired-bootstrap interval of ``gt_class_miou(child) - gt_class_miou(parent)``.

    ``parent``/``child``: per-image confusions (N, C, C) of the same N images. Each resample draws
    N image indices with replacement and sums both models' confusions over them. Returns the
    two-sided ``confidence`` percentile interval, or None for N < 2 or ``n_boot`` = 0.
    """
    n = int(parent.shape[0])
    if n < 2 or n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (B, N)
    c = parent.shape[1]
    p = counts @ parent.reshape(n, c * c).astype(np.float64)  # (B, C*C)
    q = counts @ child.reshape(n, c * c).astype(np.float64)
    deltas = np.array([gt_class_miou(q[b].reshape(c, c)) - gt_class_miou(p[b].reshape(c, c))
                       for b in range(n_boot)])
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(deltas, alpha)), float(np.quantile(deltas, 1.0 - alpha))


def compare_set(name: str, parent: np.ndarray, child: np.ndarray, criteria: GateCriteria) -> SetComparison:
    """Both mIoU definitions of parent and child on one set, the gain and its bootstrap interval.

    ``parent``/``child``: (N, C, C) int confusions of the same images in the same order.
    """
    parent = np.asarray(parent)
    child = np.asarray(child)
    if parent.shape != child.shape or parent.ndim != 3:
        raise ValueError(f"{name}: parent confusions {parent.shape} and child confusions {child.shape} "
                         "must both be (N, C, C) over the same images")
    pc, cc = parent.sum(axis=0), child.sum(axis=0)
    pg, cg = gt_class_miou(pc), gt_class_miou(cc)
    ci = bootstrap_delta(parent, child, criteria.n_boot, criteria.confidence, criteria.seed)
    return SetComparison(
        name=name, n_images=int(parent.shape[0]),
        parent_miou=miou_from_confusion(pc), child_miou=miou_from_confusion(cc),
        parent_gt_miou=pg, child_gt_miou=cg, delta_gt_miou=cg - pg,
        ci_low=None if ci is None else ci[0], ci_high=None if ci is None else ci[1],
    )


def _fmt(cmp: SetComparison) -> str:
    ci = "" if cmp.ci_low is None else f", {cmp.ci_low:+.3f}..{cmp.ci_high:+.3f}"
    return (f"gt-class mIoU {cmp.parent_gt_miou:.3f} -> {cmp.child_gt_miou:.3f} "
            f"({cmp.delta_gt_miou:+.3f}{ci}, {cmp.n_images} images)")


def decide(
    t0_parent: np.ndarray | None,
    t0_child: np.ndarray | None,
    failures_parent: np.ndarray | None = None,
    failures_child: np.ndarray | None = None,
    criteria: GateCriteria | None = None,
    *,
    t0_anchor: np.ndarray | None = None,
    anchor_name: str = "f(0)",
    t0_name: str = "T(0)",
    failures_name: str = "failure images",
) -> GateDecision:
    """Apply the gate (module docstring) to per-image confusions (N, C, C) of parent and child.

    ``t0_*``: on T(0); ``failures_*``: on the labelled failure images the child was not trained on
    (None or N = 0 = none available); ``t0_anchor``: the original model ``anchor_name`` on T(0)
    (same images; None = no cumulative check).
    """
    crit = criteria or GateCriteria()
    failed: list[str] = []
    passed: list[str] = []
    metrics: dict[str, SetComparison] = {}

    if t0_parent is None or t0_child is None or len(t0_parent) == 0:
        failed.append(f"{t0_name}: no images to check forgetting on; configure a T(0) (labelled "
                      "folder) to let the gate promote")
    else:
        t0 = compare_set(t0_name, t0_parent, t0_child, crit)
        metrics[t0_name] = t0
        if t0.delta_gt_miou < -crit.t0_tolerance:
            failed.append(f"{t0_name}: forgetting, {_fmt(t0)}, drop larger than the tolerance "
                          f"{crit.t0_tolerance:.3f}")
        else:
            passed.append(f"{t0_name}: ok, {_fmt(t0)}, within tolerance {crit.t0_tolerance:.3f}")
        if t0_anchor is not None and len(t0_anchor) == len(t0_child):
            anchor = compare_set(f"{t0_name} vs {anchor_name}", t0_anchor, t0_child, crit)
            metrics[anchor.name] = anchor
            if anchor.delta_gt_miou < -crit.t0_tolerance:
                failed.append(f"{t0_name}: forgetting against {anchor_name}, {_fmt(anchor)}, drop larger "
                              f"than the tolerance {crit.t0_tolerance:.3f}")
            else:
                passed.append(f"{t0_name} vs {anchor_name}: ok, {_fmt(anchor)}")

    if failures_parent is None or failures_child is None or len(failures_parent) == 0:
        if crit.require_failures:
            failed.append(f"{failures_name}: no held-out labelled failure images to check the fix on")
        else:
            passed.append(f"{failures_name}: none held out; decided on {t0_name} alone")
    else:
        fz = compare_set(failures_name, failures_parent, failures_child, crit)
        metrics[failures_name] = fz
        if fz.delta_gt_miou < -crit.failure_tolerance:
            failed.append(f"{failures_name}: worse, {_fmt(fz)}")
        elif crit.require_failure_gain and not (fz.ci_low is not None and fz.ci_low > 0):
            failed.append(f"{failures_name}: no clear gain, {_fmt(fz)}; the {crit.confidence:.0%} "
                          "interval must lie above 0")
        else:
            passed.append(f"{failures_name}: ok, {_fmt(fz)}")

    promoted = not failed
    return GateDecision(promoted=promoted, reasons=passed if promoted else failed + passed,
                        metrics=metrics, criteria=crit)
