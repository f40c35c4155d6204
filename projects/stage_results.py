"""Typed outputs of the round stages: one small frozen dataclass per stage, as ``state.json`` holds it.

Each stage of ``projects.rounds`` returns one of these; ``projects.state.RoundState.mark`` stores its
:meth:`StageOutput.to_dict` under ``stages.<name>.outputs`` and ``RoundState.read(cls)`` gives it back
(:meth:`StageOutput.from_dict`), so readers use attributes, never string keys. The dict is exactly
the one the stages have always written (same keys, same values), so experiment dirs written before
these classes existed load unchanged:

- keys a stage writes only sometimes (the ML backend id, the effort of older states, the gate of a
  ``mad`` round, the LwF variant, the MAD-only facts of ``select``) are left out of the dict when
  the field is None, exactly as before;
- keys these classes do not know (a newer or an older writer's) are kept in ``extra`` and written
  back as they were;
- a missing key reads as the field's default (None, or an empty tuple / mapping), never an error.

Model specs travel as :class:`ml_backend.modelspec.ModelSpec` (the zoo's one vocabulary for a
model; torch-free).

Stages and their outputs::

    score              ScoreOutput        target/competitor versions, images scored
    select             SelectOutput       candidates file, |M|, pool size, bounds rule (MAD only)
    predict            PredictOutput      predictions folder, counts
    projects           ProjectsOutput     rating + segmentation project ids, ML backend id
    push_rating        PushOutput         tasks created / existing
    ratings            RatingsOutput      ratings file, rated, out-of-domain, effort
    choose             ChooseOutput       S(i), T(i) image ids
    push_segmentation  PushOutput
    masks              MasksOutput        labels folder, S/T file stems, effort
    finetune           FinetuneOutput     f(i) (a TrainedModel's fields), gate verdict, LwF variant
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ml_backend.errors import MadsegError
from ml_backend.modelspec import ModelSpec

R = TypeVar("R", bound="Record")


# ----------------------------------------------------------------------------------------------
# the mechanics: dataclass fields <-> the stored dict
# ----------------------------------------------------------------------------------------------


def _opt(decode: Callable[[Any], Any] | None = None, *, keep_null: bool = False, default: Any = None) -> Any:
    """A field read from the key of its own name (``decode`` turns the stored value into the
    field's type). With ``default`` None the key is left out of the dict while the field is None,
    unless ``keep_null`` (the key is always written, as null when None)."""
    return field(default=default, metadata={"decode": decode, "keep_null": keep_null})


def _seq(decode: Callable[[Any], Any] | None = None) -> Any:
    """A sequence field (a tuple; always written, as a list)."""
    return field(default=(), metadata={"decode": decode or _strs, "keep_null": True})


def _map() -> Any:
    """A mapping field (always written)."""
    return field(default_factory=dict, metadata={"decode": _mapping, "keep_null": True})


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in (value or ()))


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _encode(value: Any) -> Any:
    if isinstance(value, Record) or hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    return value


def model_spec(value: Any) -> ModelSpec | None:
    """A stored ``{name, checkpoint, options}`` as a :class:`ml_backend.modelspec.ModelSpec` (None for
    a missing or empty one); a ``ModelSpec`` is returned as it is."""
    if not value:
        return None
    try:
        return ModelSpec.of(value)
    except MadsegError as exc:
        raise MadsegError(f"bad model spec {value!r} ({exc}); fix the file it came from") from None


@dataclass(frozen=True)
class Record:
    """A dataclass stored as a JSON object (see the module docstring). ``extra``: keys the class does
    not know, kept as they were."""

    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """The stored dict: known keys in field order, then ``extra``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and not f.metadata.get("keep_null"):
                continue
            out[f.name] = _encode(value)
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any] | None) -> R:
        """Read a stored dict (missing keys -> defaults, unknown keys -> ``extra``)."""
        data = data or {}
        if not isinstance(data, Mapping):
            raise MadsegError(f"round state: {cls.__name__} expects a JSON object, got {data!r}; "
                              "fix or delete the state file")
        kw: dict[str, Any] = {}
        known = set()
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            known.add(f.name)
            if f.name in data:
                decode = f.metadata.get("decode")
                value = data[f.name]
                kw[f.name] = decode(value) if decode is not None and value is not None else value
        return cls(**kw, extra={k: v for k, v in data.items() if k not in known})


@dataclass(frozen=True)
class StageOutput(Record):
    """The output of one round stage; ``STAGES``: the stage names that write it."""

    STAGES: ClassVar[tuple[str, ...]] = ()


# ----------------------------------------------------------------------------------------------
# shared parts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Effort(Record):
    """Human effort in a Label Studio project (``projects.rounds.annotation_effort``): tasks, finished
    annotations, distinct annotators, summed ``lead_time`` seconds, annotations without one, and
    whether the oracle did the work."""

    tasks: int | None = _opt()
    annotations: int | None = _opt()
    annotators: int | None = _opt()
    lead_time_s: float | None = _opt()
    without_lead_time: int | None = _opt()
    simulated: bool | None = _opt()


@dataclass(frozen=True)
class TrainedModel(Record):
    """One fine-tuned model: its zoo ``spec`` (reloads it), ``version``, chosen ``lr``, T(0) mIoU at
    the LR choice (``val_miou``, None with one LR) and ``checkpoint`` file."""

    spec: ModelSpec | None = _opt(model_spec)
    version: str | None = _opt()
    lr: float | None = _opt()
    val_miou: float | None = _opt(keep_null=True)
    checkpoint: str | None = _opt()


@dataclass(frozen=True)
class GateVerdict(Record):
    """The promotion gate's verdict on f(i) (``ml_backend.gate.GateDecision.to_json()``: ``format``,
    ``promoted``, ``status``, ``reasons``, ``metrics`` per set, ``criteria``) plus the round's
    ``parent`` key and spec, the failure sets used (``{"name", "images"}``) and the training images
    left out of them."""

    format: Any = _opt()
    promoted: bool | None = _opt()
    status: str | None = _opt()
    reasons: tuple[str, ...] = _seq()
    metrics: Mapping[str, Any] = _map()
    criteria: Mapping[str, Any] | None = _opt(_mapping)
    parent: str | None = _opt()
    parent_spec: ModelSpec | None = _opt(model_spec)
    failure_sets: tuple[Mapping[str, Any], ...] | None = _opt(lambda v: tuple(dict(x) for x in v))
    excluded_training_images: int | None = _opt()

    @classmethod
    def of(cls, decision: Any, *, parent: str, parent_spec: ModelSpec,
           failure_sets: list[dict[str, Any]], excluded: int) -> GateVerdict:
        """From an ``ml_backend.gate.GateDecision`` and the round's facts."""
        return cls.from_dict({**decision.to_json(), "parent": parent, "parent_spec": parent_spec,
                              "failure_sets": failure_sets, "excluded_training_images": excluded})


# ----------------------------------------------------------------------------------------------
# the stages
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreOutput(StageOutput):
    """Stage ``score``: the store's version of the round's target and of each competitor (by key),
    images scored, unreadable/bad ones, duplicates, and what the scorer inferred (e.g. sizes)."""

    STAGES: ClassVar[tuple[str, ...]] = ("score",)
    target_version: str | None = _opt(keep_null=True)
    competitor_versions: Mapping[str, str] = _map()
    n_images: int | None = _opt(keep_null=True)
    bad: int | None = _opt(keep_null=True)
    duplicates: int | None = _opt(keep_null=True)
    inferred: Mapping[str, Any] = _map()


@dataclass(frozen=True)
class SelectOutput(StageOutput):
    """Stage ``select``: the candidates file name and |M| (``n_candidates``), the pool size, and for
    MAD (``sampler.candidates.MadSelection.info``) M before the rating budget (``m_size``), the
    selection records, the raters' order, the budget, n3 and the size-bound rule's report."""

    STAGES: ClassVar[tuple[str, ...]] = ("select",)
    candidates: str | None = _opt(keep_null=True)
    n_candidates: int | None = _opt(keep_null=True)
    m_size: int | None = _opt()
    pool_size: int | None = _opt(keep_null=True)
    n_records: int | None = _opt()
    order: str | None = _opt()
    rating_budget: int | None = _opt()
    n3: int | None = _opt()
    bounds_rule: Mapping[str, Any] | None = _opt(_mapping)


@dataclass(frozen=True)
class PredictOutput(StageOutput):
    """Stage ``predict``: the predictions folder name, candidates, label maps computed now."""

    STAGES: ClassVar[tuple[str, ...]] = ("predict",)
    predictions: str | None = _opt(keep_null=True)
    n: int | None = _opt(keep_null=True)
    computed: int | None = _opt(keep_null=True)


@dataclass(frozen=True)
class ProjectsOutput(StageOutput):
    """Stage ``projects``: the round's Label Studio project ids (``ml_backend``: the connected ML
    backend's id, when one was connected)."""

    STAGES: ClassVar[tuple[str, ...]] = ("projects",)
    rating: int | None = _opt(keep_null=True)
    segmentation: int | None = _opt(keep_null=True)
    ml_backend: int | None = _opt()


@dataclass(frozen=True)
class PushOutput(StageOutput):
    """Stages ``push_rating`` / ``push_segmentation``: tasks created now, already there, in all."""

    STAGES: ClassVar[tuple[str, ...]] = ("push_rating", "push_segmentation")
    created: int | None = _opt(keep_null=True)
    existing: int | None = _opt(keep_null=True)
    tasks: int | None = _opt(keep_null=True)


@dataclass(frozen=True)
class RatingsOutput(StageOutput):
    """Stage ``ratings``: the ratings file name, images rated, out-of-domain ones, the raters' effort
    (absent in states written before it was recorded)."""

    STAGES: ClassVar[tuple[str, ...]] = ("ratings",)
    ratings: str | None = _opt(keep_null=True)
    n_rated: int | None = _opt(keep_null=True)
    n_ood: int | None = _opt(keep_null=True)
    effort: Effort | None = _opt(Effort.from_dict)


@dataclass(frozen=True)
class ChooseOutput(StageOutput):
    """Stage ``choose``: S(i) (images to pixel-label for fine-tuning) and T(i) (the unbiased test
    set), as image ids, and the number of out-of-domain images."""

    STAGES: ClassVar[tuple[str, ...]] = ("choose",)
    S: tuple[str, ...] = _seq()
    T: tuple[str, ...] = _seq()
    n_ood: int | None = _opt(keep_null=True)


@dataclass(frozen=True)
class MasksOutput(StageOutput):
    """Stage ``masks``: the labels folder name, the file stems of S(i) and T(i) in it, the
    annotator's effort (absent in older states)."""

    STAGES: ClassVar[tuple[str, ...]] = ("masks",)
    labels: str | None = _opt(keep_null=True)
    S_stems: tuple[str, ...] = _seq()
    T_stems: tuple[str, ...] = _seq()
    effort: Effort | None = _opt(Effort.from_dict)


@dataclass(frozen=True)
class FinetuneOutput(StageOutput):
    """Stage ``finetune``: f(i) (the fields of :class:`TrainedModel`), the gate's verdict and
    ``promoted`` (``mad`` rounds; absent in states from before the gate), the LwF variant (round 1
    with ``--lwf``), and the number of training images."""

    STAGES: ClassVar[tuple[str, ...]] = ("finetune",)
    spec: ModelSpec | None = _opt(model_spec)
    version: str | None = _opt()
    lr: float | None = _opt()
    val_miou: float | None = _opt(keep_null=True)
    checkpoint: str | None = _opt()
    gate: GateVerdict | None = _opt(GateVerdict.from_dict)
    promoted: bool | None = _opt()
    lwf: TrainedModel | None = _opt(TrainedModel.from_dict)
    n_train: int | None = _opt()

    @classmethod
    def of(cls, model: TrainedModel, **changes: Any) -> FinetuneOutput:
        """The stage output of a fine-tuned ``model`` with ``changes`` (gate, promoted, lwf, n_train)."""
        fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(TrainedModel)}
        return cls(**{**fields, **changes})

    @property
    def model(self) -> TrainedModel:
        """f(i) itself."""
        return TrainedModel(spec=self.spec, version=self.version, lr=self.lr, val_miou=self.val_miou,
                            checkpoint=self.checkpoint)

    @property
    def is_promoted(self) -> bool:
        """Whether f(i) is served: the gate promoted it (a state from before the gate: yes)."""
        return True if self.promoted is None else bool(self.promoted)


#: stage name -> its output class
STAGE_OUTPUTS: dict[str, type[StageOutput]] = {
    stage: cls
    for cls in (ScoreOutput, SelectOutput, PredictOutput, ProjectsOutput, PushOutput, RatingsOutput,
                ChooseOutput, MasksOutput, FinetuneOutput)
    for stage in cls.STAGES
}


# ----------------------------------------------------------------------------------------------
# the round's plan (plan.json)
# ----------------------------------------------------------------------------------------------


def _specs(value: Any) -> dict[str, ModelSpec | None]:
    return {str(k): model_spec(v) for k, v in _mapping(value).items()}


@dataclass(frozen=True)
class PlanRecord(Record):
    """A round's ``plan.json`` (written by ``projects.rounds`` when the round starts): what the round
    ran with — ``kind`` ("mad", "eval", "entropy", "compare"), ``number``, the target's key and spec,
    the competitors' specs by key, n4, the test-set size, whether it fine-tunes, its title, the image
    ids used by earlier rounds and whether it trains the LwF variant."""

    kind: str = ""
    number: int = 0
    target_key: str = ""
    target: ModelSpec | None = _opt(model_spec, keep_null=True)
    competitors: Mapping[str, ModelSpec | None] = field(
        default_factory=dict, metadata={"decode": _specs, "keep_null": True})
    n4: int = 0
    test_size: int = 0
    finetune: bool = False
    title: str = ""
    used: tuple[str, ...] = _seq()
    lwf_variant: bool = False

    @classmethod
    def read(cls, path: Any) -> PlanRecord:
        """The plan stored at ``path``; raises :class:`MadsegError` naming the file when it cannot be
        read."""
        import json
        from pathlib import Path

        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise MadsegError(f"{path}: cannot read the round's plan ({exc}); delete it to re-plan the "
                              "round") from None
