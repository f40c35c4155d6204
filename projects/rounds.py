"""Round orchestration: drive round i of an experiment stage by stage, resumably.

A round (1-based, ``<exp_dir>/round-<i>/``) of a MAD experiment::

    score      the pool with the round's target f(i-1) and the competitors (only what the score
               store does not hold yet; competitors are scored once for the whole experiment)
    select     M(i) = the MAD candidates -> candidates.jsonl, by the sampler's entry point
               (``sampler.candidates.mad_candidates``): size bounds by ``[selection] bounds``
               (default: S(0) per class where it has enough masks, else the models' predictions
               on the pool), M in the raters' order (``sampler.order``), cut at
               ``[selection] rating_budget``; the bounds' sources and counts go into the state
    predict    f(i-1)'s label map of every candidate at its original size -> pred/<id>.png
               (overlays for the raters, what the oracle compares, segmentation pre-annotations)
    projects   the round's rating + segmentation projects in Label Studio (+ local storage, ML backend)
    push_rating    M(i) into the rating project with overlays of f(i-1)'s prediction (idempotent)
    ratings    wait until every task has its ratings (the oracle plays the raters when enabled;
               a tqdm bar counts completed tasks) -> ratings.json
    choose     S(i) = the n4 lowest mean opinion scores (out-of-domain excluded; ties: earlier in
               M's order); T(i) chosen from
               M(i) minus S(1..i) by projects.evaluation.testset -> selection.json
    push_segmentation  S(i) and T(i) for pixel labels with f(i-1)'s pre-annotations (idempotent)
    masks      wait for the masks (the oracle annotator when enabled), export -> labels/
    finetune   f(i) on S(1..i) with S(0) replayed (LR chosen on T(0) by ground-truth-class mIoU); the
               promotion gate (``ml_backend.gate``) compares f(i) with its parent (the round's
               target) on T(0) and on the failure test sets T(1..i) minus training images; only a
               promoted f(i) moves the ML backend's current-version pointer and becomes the next
               round's target. A rejected f(i) is kept (``versions/round-<i>/`` in the model dir,
               listed with the reason) and the next round goes on with the parent.

Every stage records its outputs in ``round-<i>/state.json`` (``projects.state``), so re-running
``madseg round`` skips finished stages; the Label Studio pushes are idempotent by image id and
the fine-tune is a stage of its own, so a crash (even ``kill -9``) never duplicates tasks or
repeats a finished fine-tune. ``MADSEG_TEST_CRASH_AFTER=<stage>`` (or ``round<i>.<stage>``)
kills the process with SIGKILL right after that stage is recorded (used by the end-to-end test).

Other kinds of "rounds" reuse the same stages (see :class:`RoundPlan`): the evaluation pass after
the last round (draws T(r+1) to evaluate f(r); no S, no fine-tune), the entropy baseline of the
paper's Appendix A (entropy instead of MAD, the same budget n4, its own fine-tune f_entropy) and
the comparison round (a MAD test set drawn between f_MAD(1) and f_entropy).

The evaluation and the report after the rounds are not this module's business: ``projects.pipeline``
runs the rounds, then ``projects.evaluation.evaluate``, then ``projects.evaluation.report``; all
paths come from ``projects.layout``.

Fine-tuning runs in-process (``ml_backend.finetune``) so rounds are deterministic and resumable;
the demo starts its ML backend with ``MADSEG_TRAIN_ON_ANNOTATION=0`` so the backend serves
predictions but does not train on the oracle's annotations.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_backend.atomic import atomic_write_json
from ml_backend.errors import MadsegError
from ml_backend.jsonsafe import jsonable
from ml_backend.modelspec import ModelSpec
from sampler.candidates import Candidate, read_candidates

from .experiment import ExperimentConfig
from .layout import ExperimentLayout, RoundLayout, round_dir
from .mos import choose_lowest as lowest_mos  # S(i): the n4 lowest MOS (one function, projects.mos)
from .stage_results import (
    ChooseOutput,
    Effort,
    FinetuneOutput,
    GateVerdict,
    MasksOutput,
    PlanRecord,
    PredictOutput,
    ProjectsOutput,
    PushOutput,
    RatingsOutput,
    ScoreOutput,
    SelectOutput,
    TrainedModel,
    model_spec,
)
from .state import RoundState, served_round

if TYPE_CHECKING:
    from ml_backend.labelstudio.export import ExportImagePolicy

log = logging.getLogger(__name__)

MAD_STAGES: tuple[str, ...] = (
    "score", "select", "predict", "projects", "push_rating", "ratings", "choose",
    "push_segmentation", "masks", "finetune",
)
EVAL_STAGES: tuple[str, ...] = MAD_STAGES[:-1]
CRASH_ENV = "MADSEG_TEST_CRASH_AFTER"


# ==============================================================================================
# plans and small pure helpers
# ==============================================================================================


@dataclass(frozen=True)
class RoundPlan:
    """What one round does.

    ``kind``: ``"mad"`` (a normal round), ``"eval"`` (the evaluation pass: MAD candidates, T only),
    ``"entropy"`` (Appendix-A baseline: the top entropy images of ``target`` get the n4 labels) or
    ``"compare"`` (a MAD test set between ``target`` and ``competitors``; T only).
    ``root``: folder holding ``round-<number>/``; ``target``/``competitors``: the models, as
    ``ml_backend.modelspec.ModelSpec`` (competitors by key; a ``{name, checkpoint, options}`` dict given
    here is read by ``ModelSpec.from_dict``);
    ``n4``: images for S (0 = none); ``test_size``: |T| (0 = none); ``finetune``: train f after;
    ``used``: image ids that may not go into T (used for fine-tuning anywhere);
    ``title``: the Label Studio project title prefix.
    """

    kind: str
    number: int
    root: Path
    target_key: str
    target: ModelSpec
    competitors: Mapping[str, ModelSpec]
    n4: int
    test_size: int
    finetune: bool
    title: str
    used: frozenset[str] = frozenset()
    lwf_variant: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _spec(self.target, "target"))
        object.__setattr__(self, "competitors",
                           {k: _spec(v, f"competitor {k}") for k, v in self.competitors.items()})

    @property
    def stages(self) -> tuple[str, ...]:
        return MAD_STAGES if self.finetune else EVAL_STAGES

    @property
    def dir(self) -> Path:
        return round_dir(self.root, self.number)

    @property
    def files(self) -> RoundLayout:
        """The round folder's files (``projects.layout.RoundLayout``)."""
        return RoundLayout(self.dir)


def _spec(value: Any, what: str) -> ModelSpec:
    spec = model_spec(value)
    if spec is None:
        raise MadsegError(f"round plan: the {what} needs a model spec with a name, got {value!r}")
    return spec


def top_by_score(scores: Mapping[str, float], n: int, exclude: Sequence[str] = ()) -> list[str]:
    """The ``n`` ids with the largest score (ties: smaller id first), minus ``exclude``."""
    ex = set(exclude)
    return [k for _, k in sorted((-v, k) for k, v in scores.items() if k not in ex)[:n]]


def crash_point(stage: str, plan: RoundPlan) -> bool:
    """Whether ``MADSEG_TEST_CRASH_AFTER`` names this stage (``stage``, ``round<i>.<stage>`` or
    ``<kind><i>.<stage>``)."""
    want = os.environ.get(CRASH_ENV, "").strip()
    if not want:
        return False
    return want in (stage, f"round{plan.number}.{stage}", f"{plan.kind}{plan.number}.{stage}")


# ==============================================================================================
# the runner
# ==============================================================================================


@dataclass
class RunOptions:
    """How to run: ``oracle`` (None = the config's ``[oracle] enabled``), polling interval and
    maximum wait for people (``wait_timeout_s``, None = forever), torch ``device``, ``progress``."""

    oracle: bool | None = None
    poll_s: float = 5.0
    wait_timeout_s: float | None = None
    device: str | None = None
    progress: bool = True
    backend_url: str | None = None
    model_dir: Path | None = None
    lwf_variant: bool = False
    #: ``ml_backend.gate.GateCriteria`` fields overriding the gate's defaults (e.g. in tests)
    gate_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundRunner:
    """Runs the stages of rounds of one experiment (see the module docstring)."""

    exp: ExperimentConfig
    options: RunOptions = field(default_factory=RunOptions)
    _services: Any = None

    # -- paths ----------------------------------------------------------------------------------
    @property
    def layout(self) -> ExperimentLayout:
        """Every path of the experiment dir (``projects.layout``)."""
        return ExperimentLayout.of(self.exp.dir, self.options.model_dir)

    @property
    def exp_dir(self) -> Path:
        return self.exp.dir

    @property
    def store_dir(self) -> Path:
        return self.layout.store

    @property
    def model_dir(self) -> Path:
        """The ML backend's model dir (``current.json`` pointer + versions)."""
        return self.layout.model_dir

    @property
    def use_oracle(self) -> bool:
        return self.exp.oracle.enabled if self.options.oracle is None else bool(self.options.oracle)

    @property
    def services(self) -> Any:
        if self._services is None:
            self._services = Services(self.exp, self.options, self.store_dir, self.model_dir)
        return self._services

    # -- models of the experiment ----------------------------------------------------------------
    def served_round(self, i: int) -> int:
        """The round whose model is served after round ``i``: ``i`` when the promotion gate promoted
        f(i), else the last promoted round before it (0 = the configured target f(0))."""
        return served_round(self.exp_dir, i)

    def finetuned_spec(self, i: int) -> ModelSpec:
        """The zoo spec of round i's fine-tuned f(i), promoted or not (f(0) for i = 0)."""
        if i == 0:
            return self.exp.target.model_spec()
        self.served_round(i)  # raises when round i has not finished fine-tuning
        return _finetuned(RoundState.load(self.exp_dir, i), f"round {i}")

    def target_spec(self, i: int) -> ModelSpec:
        """The zoo spec of the model served after round i (round i+1's target): f(i) when the gate
        promoted it, else its parent's."""
        return self.finetuned_spec(self.served_round(i))

    def target_key(self, i: int) -> str:
        """The name of the model served after round i, e.g. ``f(1)``, or ``f(0)`` when f(1) was rejected."""
        return f"f({self.served_round(i)})"

    def competitor_specs(self) -> dict[str, ModelSpec]:
        return {c.key: c.model_spec() for c in self.exp.competitors}

    def used_ids(self, upto: int) -> set[str]:
        """Image ids in S(1..upto) (from the finished ``choose`` stages)."""
        used: set[str] = set()
        for j in range(1, upto + 1):
            st = RoundState.load(self.exp_dir, j)
            if st.done("choose"):
                used.update(st.read(ChooseOutput).S)
        return used

    def mad_plan(self, i: int, *, final_eval: bool = False) -> RoundPlan:
        """Round i (1-based) of the experiment; ``final_eval``: the evaluation pass (T only)."""
        if i < 1:
            raise MadsegError(f"rounds are numbered from 1, got {i}")
        return RoundPlan(
            kind="eval" if final_eval else "mad", number=i, root=self.exp_dir,
            target_key=self.target_key(i - 1), target=self.target_spec(i - 1),
            competitors=self.competitor_specs(), n4=0 if final_eval else self.exp.selection.n4,
            test_size=self.exp.selection.test_size, finetune=not final_eval,
            title=f"{self.exp.name} round {i}" + (" (evaluation)" if final_eval else ""),
            used=frozenset(self.used_ids(i - 1)), lwf_variant=self.options.lwf_variant and i == 1,
        )

    def entropy_plan(self) -> RoundPlan:
        """The Appendix-A baseline: round 1's budget n4 spent on the target's top-entropy images."""
        return RoundPlan(
            kind="entropy", number=1, root=self.layout.entropy_root, target_key=self.target_key(0),
            target=self.target_spec(0), competitors=self.competitor_specs(), n4=self.exp.selection.n4,
            test_size=0, finetune=True, title=f"{self.exp.name} entropy baseline",
        )

    def compare_plan(self) -> RoundPlan:
        """A MAD test set between f_MAD(1) (target) and f_entropy (competitor)."""
        ent = RoundState.load(self.layout.entropy_root, 1)
        if not ent.done("finetune"):
            raise MadsegError("the entropy baseline has not been fine-tuned yet; run it first")
        used = self.used_ids(1) | set(ent.read(ChooseOutput).S)
        return RoundPlan(
            kind="compare", number=1, root=self.layout.compare_root, target_key="f_MAD(1)",
            target=self.finetuned_spec(1), competitors={"f_entropy": _finetuned(ent, "the entropy baseline")},
            n4=0, test_size=self.exp.selection.test_size, finetune=False,
            title=f"{self.exp.name} MAD vs entropy test", used=frozenset(used),
        )

    # -- running ---------------------------------------------------------------------------------
    def run(self, plan: RoundPlan, *, until: str | None = None) -> RoundState:
        """Run every unfinished stage of ``plan`` in order (up to and including ``until``)."""
        st = RoundState.load(plan.root, plan.number)
        plan.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan.files.plan, _plan_json(plan))
        for stage in plan.stages:
            if st.done(stage):
                log.info("%s %d: %s already done", plan.kind, plan.number, stage)
            else:
                log.info("%s %d: %s ...", plan.kind, plan.number, stage)
                st.begin(stage)
                t0 = time.monotonic()
                st.mark(stage, getattr(self, f"_stage_{stage}")(plan, st))
                log.info("%s %d: %s done in %.1f s", plan.kind, plan.number, stage, time.monotonic() - t0)
                if crash_point(stage, plan):
                    log.warning("%s=%s: killing this process (test hook)", CRASH_ENV, stage)
                    os.kill(os.getpid(), signal.SIGKILL)
            if stage == until:
                break
        return st

    # -- stages ----------------------------------------------------------------------------------
    def _stage_score(self, plan: RoundPlan, st: RoundState) -> ScoreOutput:
        return self.services.score(plan)

    def _stage_select(self, plan: RoundPlan, st: RoundState) -> SelectOutput:
        scored = st.read(ScoreOutput)
        if plan.kind == "entropy":
            return self.services.select_entropy(plan, scored, n=_entropy_pool_size(plan.n4))
        return self.services.select_mad(plan, scored)

    def _stage_predict(self, plan: RoundPlan, st: RoundState) -> PredictOutput:
        cands = read_candidates(plan.files.candidates)
        return self.services.predict_candidates(plan, cands, plan.files.pred)

    def _stage_projects(self, plan: RoundPlan, st: RoundState) -> ProjectsOutput:
        return self.services.ensure_projects(plan)

    def _stage_push_rating(self, plan: RoundPlan, st: RoundState) -> PushOutput:
        cands = read_candidates(plan.files.candidates)
        pid = _project_id(st, "rating")
        return self.services.push_rating(plan, pid, cands, plan.files.pred)

    def _stage_ratings(self, plan: RoundPlan, st: RoundState) -> RatingsOutput:
        cands = read_candidates(plan.files.candidates)
        pid = _project_id(st, "rating")
        ratings = self.services.wait_ratings(plan, pid, cands, plan.files.pred, oracle=self.use_oracle)
        atomic_write_json(plan.files.ratings, ratings)
        return RatingsOutput(ratings=plan.files.ratings.name, n_rated=len(ratings["mos"]),
                             n_ood=sum(1 for v in ratings["ood"].values() if v),
                             effort=self.services.effort(pid, simulated=self.use_oracle))

    def _stage_choose(self, plan: RoundPlan, st: RoundState) -> ChooseOutput:
        ratings = json.loads(plan.files.ratings.read_text())
        cands = read_candidates(plan.files.candidates)
        mos = {k: (float("inf") if v is None else float(v)) for k, v in ratings["mos"].items()}
        ood = sorted(k for k, v in ratings["ood"].items() if v)
        if plan.kind == "entropy":
            ent = {c.id: float(c.entropy or 0.0) for c in cands}
            s_ids = top_by_score(ent, plan.n4, exclude=[*ood, *plan.used])
        else:
            s_ids = lowest_mos(mos, plan.n4, exclude=sorted(plan.used), order=[c.id for c in cands]) \
                if plan.n4 else []
        t_info: dict[str, Any] = {"ids": []}
        if plan.test_size:
            t_info = self.services.choose_test(plan, cands, ood=ood, used=set(plan.used) | set(s_ids))
        out = {"S": s_ids, "T": list(t_info["ids"]), "ood": ood, "test": t_info}
        atomic_write_json(plan.files.selection, out)
        return ChooseOutput(S=tuple(s_ids), T=tuple(t_info["ids"]), n_ood=len(ood))

    def _stage_push_segmentation(self, plan: RoundPlan, st: RoundState) -> PushOutput:
        ch = st.read(ChooseOutput)
        cands = {c.id: c for c in read_candidates(plan.files.candidates)}
        ids = list(dict.fromkeys([*ch.S, *ch.T]))
        pid = _project_id(st, "segmentation")
        version = st.read(ScoreOutput).target_version
        return self.services.push_segmentation(plan, pid, [cands[k] for k in ids], plan.files.pred,
                                               f"{plan.target_key} {version}")

    def _stage_masks(self, plan: RoundPlan, st: RoundState) -> MasksOutput:
        ch = st.read(ChooseOutput)
        cands = {c.id: c for c in read_candidates(plan.files.candidates)}
        ids = list(dict.fromkeys([*ch.S, *ch.T]))
        pid = _project_id(st, "segmentation")
        exported = self.services.wait_masks(plan, pid, [cands[k] for k in ids], plan.files.labels,
                                            oracle=self.use_oracle)
        # exported: image id -> file stem in labels/
        stems = {"S": [exported[k] for k in ch.S if k in exported],
                 "T": [exported[k] for k in ch.T if k in exported]}
        missing = [k for k in ids if k not in exported]
        if missing:
            raise MadsegError(f"segmentation project {pid}: no finished mask for {len(missing)} image(s) "
                              f"(e.g. {missing[:3]}); finish them in Label Studio and re-run")
        atomic_write_json(plan.files.sets, stems)
        effort = self.services.effort(pid, simulated=self.use_oracle)
        return MasksOutput(labels=plan.files.labels.name, S_stems=tuple(stems["S"]),
                           T_stems=tuple(stems["T"]), effort=effort)

    def _stage_finetune(self, plan: RoundPlan, st: RoundState) -> FinetuneOutput:
        train_dir = plan.files.train
        n_train = self._build_train_folder(plan, train_dir)
        if n_train == 0:
            raise MadsegError(f"{plan.kind} round {plan.number}: no image to fine-tune on (every candidate "
                              "was rated out of domain or no mask was exported); check the rating project or "
                              "enlarge the pool / n3, then re-run")
        model = self.services.finetune(plan, train_dir, plan.files.finetune, lwf=False)
        out = FinetuneOutput.of(model)
        if plan.kind == "mad":
            train_stems = {p.stem for p in (train_dir / "masks").glob("*.png")}
            gate = self.services.gate(plan, model.spec, train_stems)
            out = dataclasses.replace(out, gate=gate, promoted=bool(gate.promoted))
            self.services.publish(plan, out, n_train=n_train)
            log.info("round %d: f(%d) %s by the promotion gate: %s", plan.number, plan.number,
                     gate.status, "; ".join(gate.reasons))
        if plan.lwf_variant:
            out = dataclasses.replace(
                out, lwf=self.services.finetune(plan, train_dir, plan.files.finetune_lwf, lwf=True))
        return dataclasses.replace(out, n_train=n_train)

    def _build_train_folder(self, plan: RoundPlan, train_dir: Path) -> int:
        """S(1..i) as one labelled folder of hard links (copies across file systems)."""
        sources: list[tuple[Path, str]] = []
        if plan.kind == "mad":
            for j in range(1, plan.number + 1):
                rd = RoundLayout(round_dir(plan.root, j))
                sets = json.loads(rd.sets.read_text())
                sources += [(rd.labels, s) for s in sets["S"]]
        else:
            sets = json.loads(plan.files.sets.read_text())
            sources += [(plan.files.labels, s) for s in sets["S"]]
        if train_dir.exists():
            shutil.rmtree(train_dir)
        for sub in ("images", "masks"):
            (train_dir / sub).mkdir(parents=True, exist_ok=True)
        for folder, stem in sources:
            imgs = [p for p in (folder / "images").glob(f"{stem}.*")]
            if not imgs:
                raise MadsegError(f"{folder}/images: no image for {stem}; re-run the masks stage")
            _link(imgs[0], train_dir / "images" / imgs[0].name)
            _link(folder / "masks" / f"{stem}.png", train_dir / "masks" / f"{stem}.png")
        return len(sources)


def labelled_stems(plan: RoundPlan) -> set[str]:
    """File stems of every image labelled up to round ``plan.number`` (the training sets S and the
    test sets T of rounds 1..i of a MAD plan; the plan's own S and T otherwise), from each round's
    ``sets.json`` (written by the masks stage)."""
    files = ([RoundLayout(round_dir(plan.root, j)).sets for j in range(1, plan.number + 1)]
             if plan.kind == "mad" else [plan.files.sets])
    out: set[str] = set()
    for f in files:
        if f.exists():
            sets = json.loads(f.read_text())
            out.update(sets.get("S", []))
            out.update(sets.get("T", []))
    return out


def unlabelled_candidates(candidates: Sequence[Candidate], labelled: Collection[str]) -> list[str]:
    """Paths of the candidates (in file order) that no one labelled: neither their id nor their
    file stem is in ``labelled``."""
    seen = set(labelled)
    return [c.path for c in candidates if c.id not in seen and Path(c.path).stem not in seen]


def _project_id(st: RoundState, which: str) -> int:
    """The id of the round's ``which`` ("rating" / "segmentation") Label Studio project."""
    pid = getattr(st.read(ProjectsOutput), which)
    if pid is None:
        raise MadsegError(f"{st.path}: the projects stage recorded no {which} project; fix or delete "
                          "the state file (deleting re-runs the round)")
    return int(pid)


def _finetuned(st: RoundState, what: str) -> ModelSpec:
    """The spec of the model ``st``'s fine-tune stage trained."""
    spec = st.read(FinetuneOutput).spec
    if spec is None:
        raise MadsegError(f"{st.path}: {what}'s fine-tune stage recorded no model spec; fix or delete "
                          "the file")
    return spec


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _entropy_pool_size(n4: int) -> int:
    """How many top-entropy images go to rating for the entropy baseline: 3 x n4, so that n4 remain
    after the raters' out-of-domain flags (the same rating step MAD's S gets)."""
    return 3 * n4


def _plan_json(plan: RoundPlan) -> dict[str, Any]:
    return PlanRecord(
        kind=plan.kind, number=plan.number, target_key=plan.target_key, target=plan.target,
        competitors=dict(plan.competitors), n4=plan.n4, test_size=plan.test_size, finetune=plan.finetune,
        title=plan.title, used=tuple(sorted(plan.used)), lwf_variant=plan.lwf_variant,
    ).to_dict()


# ==============================================================================================
# whole experiments
# ==============================================================================================


def completed_rounds(exp_dir: Path) -> list[int]:
    """Rounds whose fine-tune finished, ascending."""
    out = []
    i = 1
    while RoundState.load(exp_dir, i).done("finetune"):
        out.append(i)
        i += 1
    return out


# ==============================================================================================
# services: the I/O behind the stages (score store, models, Label Studio, oracle, fine-tuning)
# ==============================================================================================


class Services:
    """What the stages do outside this module; one object per runner (models and the Label Studio
    client are created lazily)."""

    def __init__(self, exp: ExperimentConfig, options: RunOptions, store_dir: Path, model_dir: Path) -> None:
        self.exp = exp
        self.options = options
        self.store_dir = store_dir
        self.model_dir = model_dir
        self._s0_fractions: Any = None

    # -- scoring and selection -------------------------------------------------------------------
    def score(self, plan: RoundPlan) -> ScoreOutput:
        """Score the pool with ``plan.target`` and the competitors (cached in the store)."""
        from sampler.score import score_pool

        sources = [*map(str, self.exp.pool.folders), *map(str, self.exp.pool.lists)]
        stats = score_pool(
            sources, plan.target, list(plan.competitors.values()), self.store_dir,
            resolution=self.exp.selection.working_size, device=self.options.device,
            progress=self.options.progress, workers=min(2, os.cpu_count() or 1),
        )
        return ScoreOutput(
            target_version=stats.target_version,
            competitor_versions=dict(zip(plan.competitors, stats.competitor_versions, strict=True)),
            n_images=int(stats.images), bad=int(stats.bad), duplicates=int(stats.duplicates),
            inferred=dict(stats.inferred))

    def s0_fractions(self) -> Any:
        """(M, C) class area fractions of the S(0) masks (for the size bounds), read once."""
        if self._s0_fractions is None:
            from sampler.candidates import mask_area_fractions

            self._s0_fractions = mask_area_fractions((m for _, m in self.exp.s0.open().pairs),
                                                     self.exp.num_classes)
        return self._s0_fractions

    def _selection_inputs(self, scored: ScoreOutput) -> Any:
        """The sampler's selection arrays for the round's target and competitors (by version)."""
        from sampler.candidates import load_selection_inputs

        return load_selection_inputs(self.store_dir, scored.target_version,
                                     list(scored.competitor_versions.values()), self.exp.selection.metric)

    def select_mad(self, plan: RoundPlan, scored: ScoreOutput) -> SelectOutput:
        """M = MAD candidates of ``plan.target`` vs the competitors (minus ``plan.used``) ->
        candidates.jsonl, by the sampler's entry point (the same file ``madseg select`` writes)."""
        from sampler.candidates import mad_candidates, write_candidates

        se = self.exp.selection
        sel = mad_candidates(self.store_dir, self._selection_inputs(scored), n3=se.n3, bounds=se.bounds,
                             s0_fractions=self.s0_fractions(), bounds_method=se.bounds_method,
                             min_count=se.min_count, order=se.order, rating_budget=se.rating_budget,
                             exclude=plan.used, competitor_names=list(scored.competitor_versions))
        write_candidates(plan.files.candidates, sel.candidates)
        return SelectOutput.from_dict({"candidates": plan.files.candidates.name, **sel.info()})

    def select_entropy(self, plan: RoundPlan, scored: ScoreOutput, n: int) -> SelectOutput:
        """The ``n`` images with the largest mean entropy of ``plan.target`` (minus ``plan.used``)
        -> candidates.jsonl."""
        from sampler.candidates import entropy_candidates, write_candidates

        inp = self._selection_inputs(scored).without(plan.used)
        cands = entropy_candidates(self.store_dir, n, inputs=inp)
        write_candidates(plan.files.candidates, cands)
        return SelectOutput(candidates=plan.files.candidates.name, n_candidates=len(cands),
                            pool_size=int(inp.ids.size))

    def choose_test(self, plan: RoundPlan, cands: Sequence[Candidate], *, ood: Sequence[str],
                    used: set[str]) -> dict[str, Any]:
        """T from the candidates by ``projects.evaluation.testset`` (main class from the target's areas)."""
        import numpy as np

        from .evaluation.testset import choose_test_set, main_classes

        ids = [c.id for c in cands]
        areas = np.array([c.target_areas for c in cands], dtype=np.float64).reshape(len(cands), -1)
        mc = main_classes(areas) if len(cands) else np.zeros(0, np.int64)
        choice = choose_test_set(ids, mc, ood=ood, used=used, size=plan.test_size,
                                 max_per_class=self.exp.selection.max_per_class,
                                 seed=self.exp.seed + 1000 * plan.number, class_names=self.exp.classes)
        return choice.to_dict()

    # -- predictions of the round's target on the candidates -------------------------------------
    def predict_candidates(self, plan: RoundPlan, cands: Sequence[Candidate],
                           out: Path) -> PredictOutput:
        """f's label map of each candidate at its original size -> ``out/<id>.png`` (skips done)."""
        from tqdm import tqdm

        from ml_backend.imageio import read_rgb, write_mask
        from ml_backend.zoo import load_model_spec

        todo = [c for c in cands if not (out / f"{c.id}.png").exists()]
        if todo:
            model = load_model_spec(plan.target, device=self.options.device)
            bs = 4
            for start in tqdm(range(0, len(todo), bs), desc=f"predict {plan.target_key}", unit="batch",
                              disable=not self.options.progress):
                chunk = todo[start:start + bs]
                preds = model.predict([read_rgb(c.path) for c in chunk], batch_size=bs)
                for c, p in zip(chunk, preds, strict=True):
                    write_mask(out / f"{c.id}.png", p)
        return PredictOutput(predictions=plan.files.pred.name, n=len(cands), computed=len(todo))

    # -- Label Studio ----------------------------------------------------------------------------
    def client(self) -> Any:
        """The Label Studio client (``ml_backend.labelstudio.client.connect``) for the config's URL, key."""
        if getattr(self, "_client", None) is None:
            from ml_backend.labelstudio.client import connect

            ls = self.exp.label_studio
            self._client = connect(ls.url, ls.api_key())
        return self._client

    def _title_name(self, plan: RoundPlan) -> str:
        """The experiment name used in the project titles (``<name> round <i>: rating``)."""
        suffix = {"mad": "", "eval": "", "entropy": " entropy", "compare": " mad-vs-entropy"}[plan.kind]
        return f"{self.exp.name}{suffix}"

    def ensure_projects(self, plan: RoundPlan) -> ProjectsOutput:
        """The round's rating + segmentation projects (found again by title, so a crash between
        creating them and recording them creates nothing twice); the ML backend is connected to the
        segmentation project when a backend URL is configured."""
        from ml_backend.labelstudio.connect import connect_ml_backend

        from .round_projects import create_round_projects

        ls = self.exp.label_studio
        client = self.client()
        pids = create_round_projects(client, self._title_name(plan), plan.number,
                                     classes=list(self.exp.classes), raters_per_task=ls.raters_per_task,
                                     document_root=self.exp.document_root())
        backend: int | None = None
        url = self.options.backend_url or ls.backend_url
        if url:
            try:
                backend = int(connect_ml_backend(client, pids.segmentation, url))
            except MadsegError as exc:  # the loop works without it (no interactive pre-fill)
                log.warning("ML backend %s not connected to project %d: %s", url, pids.segmentation, exc)
        return ProjectsOutput(rating=pids.rating, segmentation=pids.segmentation, ml_backend=backend)

    def push_rating(self, plan: RoundPlan, pid: int, cands: Sequence[Candidate],
                    pred_dir: Path) -> PushOutput:
        from .rating import push_rating_tasks

        res = push_rating_tasks(self.client(), pid, [c.to_dict() for c in cands], predictions=pred_dir,
                                overlay_dir=plan.files.overlays, document_root=self.exp.document_root(),
                                num_classes=self.exp.num_classes, progress=self.options.progress)
        return PushOutput.from_dict(res.to_dict())

    def _oracle_images(self, cands: Sequence[Candidate], pred_dir: Path) -> dict[str, Any]:
        from ml_backend.imageio import read_mask

        from .simulation.oracle import OracleImage

        c = self.exp.num_classes

        def loader(p: Path) -> Callable[[], Any]:
            return lambda: read_mask(p, c)

        return {x.id: OracleImage(x.id, x.path, loader(pred_dir / f"{x.id}.png")) for x in cands}

    def _wait(self, what: str, progress: Callable[[], tuple[int, int]]) -> None:
        """Poll ``progress() -> (done, total)`` with a tqdm bar until done == total."""
        from tqdm import tqdm

        done, total = progress()
        if done >= total:
            return
        t0 = time.monotonic()
        log.info("waiting for %s in Label Studio (%s); re-running resumes", what,
                 self.exp.label_studio.url)
        limit = self.options.wait_timeout_s
        quiet = not self.options.progress
        with tqdm(total=total, initial=done, desc=what, unit="task", disable=quiet) as bar:
            while done < total:
                if limit is not None and time.monotonic() - t0 > limit:
                    raise MadsegError(f"gave up waiting for {what} after {limit:.0f} s "
                                      f"({done}/{total} tasks done); re-run to keep waiting")
                time.sleep(self.options.poll_s)
                new, total = progress()
                bar.total = total
                bar.update(max(0, new - done))
                done = new

    def wait_ratings(self, plan: RoundPlan, pid: int, cands: Sequence[Candidate], pred_dir: Path,
                     *, oracle: bool) -> dict[str, Any]:
        """Ratings of every task (the oracle rates first when enabled) -> MOS with the OOD veto."""
        from .mos import mean_opinion_scores
        from .rating import collect_ratings, rating_progress

        ls = self.exp.label_studio
        if oracle:
            from .simulation.oracle import GroundTruth, play_raters

            o = self.exp.oracle
            play_raters(ls.url, ls.api_key(), pid, self._oracle_images(cands, pred_dir),
                        GroundTruth(o.gt, self.exp.num_classes), n_raters=ls.raters_per_task,
                        noise=o.noise, thresholds=o.thresholds, seed=o.seed, class_names=self.exp.classes,
                        progress=self.options.progress)
        client = self.client()
        self._wait("ratings", lambda: rating_progress(client, pid, ls.raters_per_task))
        raw = collect_ratings(client, pid)
        mos = mean_opinion_scores(raw)
        return {"project": pid, "raw": jsonable(raw),
                "mos": {k: (None if v == float("inf") else v) for k, v in mos.items()},
                "ood": {k: v == float("inf") for k, v in mos.items()}}

    def effort(self, pid: int, *, simulated: bool) -> Effort:
        """:func:`annotation_effort` of Label Studio project ``pid`` (one export request)."""
        from ml_backend.labelstudio.export import export_tasks

        return Effort.from_dict(annotation_effort(export_tasks(self.client(), pid), simulated=simulated))

    def push_segmentation(self, plan: RoundPlan, pid: int, cands: Sequence[Candidate],
                          pred_dir: Path, model_version: str) -> PushOutput:
        from .segmentation import push_segmentation_tasks

        res = push_segmentation_tasks(self.client(), pid, [c.to_dict() for c in cands], predictions=pred_dir,
                                      model_version=model_version, classes=list(self.exp.classes),
                                      document_root=self.exp.document_root(), progress=self.options.progress)
        return PushOutput.from_dict(res.to_dict())

    def wait_masks(self, plan: RoundPlan, pid: int, cands: Sequence[Candidate], out: Path, *,
                   oracle: bool) -> dict[str, str]:
        """Masks of every task (the oracle annotator first when enabled), exported to ``out``;
        returns image id -> file stem in ``out``."""
        from ml_backend.labelstudio.export import export_masks

        from .segmentation import segmentation_progress

        ls = self.exp.label_studio
        if oracle:
            from .simulation.oracle import GroundTruth, play_annotator

            o = self.exp.oracle
            play_annotator(ls.url, ls.api_key(), pid, self._oracle_images(cands, plan.files.pred),
                           GroundTruth(o.gt, self.exp.num_classes), class_names=self.exp.classes,
                           ignore=o.ignore, progress=self.options.progress)
        client = self.client()
        self._wait("masks", lambda: segmentation_progress(client, pid))
        return export_masks(client, pid, out, classes=list(self.exp.classes), images=self.export_images())

    def export_images(self) -> ExportImagePolicy:
        """Where the round's mask export may read task images from: the experiment's pool folders under
        its document root, never its ground-truth mask folders (``projects.backend_settings``)."""
        from ml_backend.labelstudio.export import ExportImagePolicy

        from .backend_settings import backend_settings

        s = backend_settings(self.exp)
        return ExportImagePolicy.for_folders(s.document_root or self.exp.document_root(), s.pool_dirs,
                                             s.ground_truth)

    # -- fine-tuning -----------------------------------------------------------------------------
    def finetune(self, plan: RoundPlan, train_dir: Path, out_dir: Path, *, lwf: bool) -> TrainedModel:
        """Fine-tune the experiment's f(0) on ``train_dir`` (S(1..i)); LR chosen on T(0) (by
        ground-truth-class mIoU) when the settings give several.

        Default: S(0) replayed in every step (``[finetune] replay``). ``lwf``: the Learning-without-
        Forgetting variant instead — no replay, distillation towards f(0) on the round's candidate
        images (unlabelled). Every f(i) starts from f(0) (the cumulative S(1..i) is the training
        set), so rounds do not compound training on the same masks. A finished fine-tune in
        ``out_dir`` is returned at once (``ml_backend.finetune`` resumes / reuses it).
        """
        from ml_backend.datasets import LabelledFolder
        from ml_backend.finetune import finetune
        from ml_backend.zoo import load_model_spec

        ft = self.exp.finetune
        model = load_model_spec(self.exp.target.model_spec(), device=self.options.device)
        # the preset's whole recipe (ml_backend.finetune PRESETS) with the [finetune] keys applied
        cfg = ft.to_config(seed=self.exp.seed, lwf=lwf)
        unlabelled = None
        replay = self.exp.s0.open() if ft.replay else None
        if lwf:
            replay = None
            unlabelled = [c.path for c in read_candidates(plan.files.candidates)]
        elif ft.lwf_weight > 0:
            # distillation towards f(0) on the unlabelled candidates only: never on an
            # image it is trained on, nor on a test image the promotion gate judges it by
            cands = read_candidates(plan.files.candidates)
            unlabelled = unlabelled_candidates(cands, labelled_stems(plan)) or None
        # T(0) chooses among several LRs; with one LR it would only be evaluated for the record,
        # which the promotion gate does anyway (cached for the report)
        val = self.exp.t0.open() if len(cfg.lrs) > 1 else None
        res = finetune(model, LabelledFolder(train_dir), out_dir, replay=replay, val=val,
                       unlabelled=unlabelled, config=cfg, progress=self.options.progress)
        return TrainedModel(spec=res.spec, version=str(res.version), lr=float(res.lr),
                            val_miou=None if res.val_miou is None else float(res.val_miou),
                            checkpoint=str(res.checkpoint))

    def gate(self, plan: RoundPlan, child_spec: ModelSpec, train_stems: set[str]) -> GateVerdict:
        """The promotion gate (``ml_backend.gate.decide``) of round ``plan.number``'s f(i) against its
        parent ``plan.target``: on T(0) and on the failure test sets T(1..i) (labelled, drawn from
        the MAD candidates) minus every image in ``train_stems`` (file stems of the training set).

        Per-image confusions come from ``projects.evaluation.evaluate.evaluate_models`` with the report's
        cache (``<exp_dir>/eval``, same set names), so Table 1 reuses them. Returns the decision
        with the parent, ``failure_sets`` (names and sizes used) and ``excluded_training_images``.
        """
        import numpy as np

        from ml_backend.gate import GateCriteria, decide

        from .evaluation.evaluate import ModelEntry, TestSet, evaluate_models, labelled_pairs

        exp = self.exp
        sets = [TestSet("T(0)", tuple(exp.t0.open().pairs), 0)]
        for j in range(1, plan.number + 1):
            st = RoundState.load(plan.root, j)
            stems = list(st.read(MasksOutput).T_stems) if st.done("masks") else None
            if stems:
                pairs = labelled_pairs(RoundLayout(round_dir(plan.root, j)).labels, stems)
                sets.append(TestSet(f"T({j})", tuple(pairs), j))
        parent, child = ModelEntry("parent", plan.target), ModelEntry("child", child_spec)
        anchor = ModelEntry("anchor", exp.target.model_spec())  # f(0): bounds the forgetting over all rounds
        ev = evaluate_models([parent, child, anchor], sets, exp.num_classes,
                             ExperimentLayout.of(exp.dir).eval_cache, device=self.options.device)
        fz_p, fz_c, used, excluded = [], [], [], 0
        for ts in sets[1:]:
            keep = [k for k, stem in enumerate(ts.stems) if stem not in train_stems]
            excluded += len(ts.stems) - len(keep)
            if keep:
                fz_p.append(ev.confusions[("parent", ts.name)][keep])
                fz_c.append(ev.confusions[("child", ts.name)][keep])
                used.append({"name": ts.name, "images": len(keep)})
        c = exp.num_classes
        crit = GateCriteria.from_dict({"seed": exp.seed, **self.options.gate_options})
        name = f"T(1..{plan.number}) failures" if plan.number > 1 else "T(1) failures"
        decision = decide(ev.confusions[("parent", "T(0)")], ev.confusions[("child", "T(0)")],
                          np.concatenate(fz_p) if fz_p else np.zeros((0, c, c), np.int64),
                          np.concatenate(fz_c) if fz_c else np.zeros((0, c, c), np.int64),
                          crit, t0_anchor=ev.confusions[("anchor", "T(0)")], anchor_name="f(0)",
                          failures_name=name)
        return GateVerdict.of(decision, parent=plan.target_key, parent_spec=plan.target, failure_sets=used,
                              excluded=excluded)

    def publish(self, plan: RoundPlan, out: FinetuneOutput, *, n_train: int) -> None:
        """Record f(i) in the ML backend's model dir (``versions/round-<i>/``, with the gate's
        decision); only a promoted f(i) becomes the current version (atomic pointer). A rejected one
        is kept and listed, and the pointer stays on the parent."""
        from ml_backend.versions import new_record, record_version, write_pointer

        spec = out.spec
        if spec is None or out.version is None:
            raise MadsegError(f"{plan.kind} round {plan.number}: the fine-tune gave no model to publish")
        record = new_record(
            version=out.version, name=spec.name, checkpoint=spec.checkpoint, options=spec.options,
            job_id=f"round-{plan.number}", projects=(), n_train=n_train,
            gate=None if out.gate is None else out.gate.to_dict())
        if record.status == "promoted":
            write_pointer(self.model_dir, record)
        else:
            record_version(self.model_dir, record)


def annotation_effort(tasks: Sequence[Mapping[str, Any]], *, simulated: bool) -> dict[str, Any]:
    """Human effort in exported Label Studio tasks: finished annotations, distinct annotators, and the
    sum of the annotations' ``lead_time`` (seconds Label Studio measured in the editor; annotations
    without one are counted in ``without_lead_time``). ``simulated``: the oracle did the work (its
    lead times are not human time)."""
    from ml_backend.labelstudio.export import is_finished

    n, seconds, missing, people = 0, 0.0, 0, set()
    for task in tasks:
        for ann in task.get("annotations") or []:
            if not is_finished(ann):
                continue
            n += 1
            people.add(ann.get("completed_by") if not isinstance(ann.get("completed_by"), dict)
                       else ann["completed_by"].get("id"))
            lt = ann.get("lead_time")
            if isinstance(lt, (int, float)) and not isinstance(lt, bool) and lt >= 0:
                seconds += float(lt)
            else:
                missing += 1
    return {"tasks": len(tasks), "annotations": n, "annotators": len(people - {None}),
            "lead_time_s": round(seconds, 1), "without_lead_time": missing, "simulated": bool(simulated)}
