"""The experiment directory, named once: every path a round, the evaluation or the report reads or writes.

::

    <experiment dir>/
        store/                      the score store (sampler.store)
        backend/                    the ML backend's model dir (current.json pointer + versions)
        backend-settings.json       the experiment's settings for the backend (projects.backend_settings)
        experiment.toml, label-studio/, backend.log     what ``madseg demo`` writes
        round-<i>/                  round i (RoundLayout below)
        baseline-entropy/round-1/   the entropy baseline of the paper's Appendix A
        baseline-compare/round-1/   the MAD test set between f_MAD(1) and f_entropy
        eval/                       cached per-image confusion matrices (projects.evaluation.evaluate)
        results.json                the evaluation's numbers (evaluation.evaluate -> evaluation.report)
        report/                     report.html + report.json (projects.evaluation.report)
        report-assets/              gallery masks written for the report

    round-<i>/
        state.json  plan.json  candidates.jsonl  pred/<image id>.png  overlays/  ratings.json  selection.json
        labels/{images,masks}/ + labels/sets.json  train/{images,masks}/  finetune/  finetune-lwf/

Pure paths: nothing here touches the disk. The round folders' names (``round-<i>/state.json``) come
from ``ml_backend.round_dirs``, which the ML backend reads too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ml_backend.round_dirs import ROUND_PREFIX, STATE_FILE, round_dir

__all__ = ["ENTROPY_BASELINE", "MAD_VS_ENTROPY", "RESULTS_FILE", "ROUND_PREFIX", "STATE_FILE",
           "ExperimentLayout", "RoundLayout", "round_dir"]

RESULTS_FILE = "results.json"
ENTROPY_BASELINE = "baseline-entropy"
MAD_VS_ENTROPY = "baseline-compare"


@dataclass(frozen=True)
class RoundLayout:
    """The files of one round folder ``<root>/round-<i>/``."""

    dir: Path

    @property
    def state(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def plan(self) -> Path:
        """What the round ran with (kind, target key, specs, sizes)."""
        return self.dir / "plan.json"

    @property
    def candidates(self) -> Path:
        """M(i), one JSON line per candidate (``sampler.candidates``)."""
        return self.dir / "candidates.jsonl"

    @property
    def pred(self) -> Path:
        """The target's label maps of the candidates at their original size, ``<image id>.png``."""
        return self.dir / "pred"

    @property
    def overlays(self) -> Path:
        """The raters' overlay pictures (photo + prediction) pushed to the rating project."""
        return self.dir / "overlays"

    def pred_mask(self, image_id: str) -> Path:
        return self.pred / f"{image_id}.png"

    @property
    def ratings(self) -> Path:
        return self.dir / "ratings.json"

    @property
    def selection(self) -> Path:
        """S(i), T(i) and the out-of-domain ids."""
        return self.dir / "selection.json"

    @property
    def labels(self) -> Path:
        """Exported masks: a labelled folder (``images/`` + ``masks/``)."""
        return self.dir / "labels"

    @property
    def sets(self) -> Path:
        """Which stems of ``labels/`` are S and which are T."""
        return self.labels / "sets.json"

    @property
    def train(self) -> Path:
        """S(1..i) as one labelled folder of links (the fine-tune's training set)."""
        return self.dir / "train"

    @property
    def finetune(self) -> Path:
        return self.dir / "finetune"

    @property
    def finetune_lwf(self) -> Path:
        return self.dir / "finetune-lwf"


@dataclass(frozen=True)
class ExperimentLayout:
    """Every path of one experiment directory ``root``; ``model_dir``: the ML backend's model dir
    when it is not ``<root>/backend`` (e.g. a test's own)."""

    root: Path
    model_dir_override: Path | None = None

    @classmethod
    def of(cls, root: str | os.PathLike[str],
           model_dir: str | os.PathLike[str] | None = None) -> ExperimentLayout:
        return cls(Path(root), Path(model_dir) if model_dir is not None else None)

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def model_dir(self) -> Path:
        return self.model_dir_override or (self.root / "backend")

    @property
    def backend_settings(self) -> Path:
        return self.root / "backend-settings.json"

    @property
    def config_copy(self) -> Path:
        """The experiment file as the demo ran it (``madseg demo``)."""
        return self.root / "experiment.toml"

    @property
    def label_studio(self) -> Path:
        """The demo's local Label Studio data dir (``credentials.json`` inside)."""
        return self.root / "label-studio"

    @property
    def backend_log(self) -> Path:
        """The demo's ML backend output."""
        return self.root / "backend.log"

    @property
    def entropy_root(self) -> Path:
        """Folder holding the entropy baseline's ``round-1/``."""
        return self.root / ENTROPY_BASELINE

    @property
    def compare_root(self) -> Path:
        """Folder holding the MAD-vs-entropy comparison's ``round-1/``."""
        return self.root / MAD_VS_ENTROPY

    @property
    def eval_cache(self) -> Path:
        return self.root / "eval"

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_assets(self) -> Path:
        return self.root / "report-assets"

    def round(self, i: int) -> RoundLayout:
        """Round ``i`` of the MAD rounds (``round-<i>/``)."""
        return RoundLayout(round_dir(self.root, i))

    def entropy_round(self) -> RoundLayout:
        return RoundLayout(round_dir(self.entropy_root, 1))

    def compare_round(self) -> RoundLayout:
        return RoundLayout(round_dir(self.compare_root, 1))

    def round_roots(self) -> list[tuple[Path, str]]:
        """The folders holding ``round-<i>/`` folders with their labels: MAD rounds, the entropy
        baseline, the comparison."""
        return [(self.root, "round"), (self.entropy_root, "entropy"), (self.compare_root, "compare")]
