"""The experiment config: one TOML file that describes a MAD experiment.

An experiment is a sequence of rounds (see ``docs/architecture.md`` and ``projects.state``). The
file names the pool, the target model and its competitors, the labelled seed sets S(0) and T(0),
the selection and fine-tuning settings, the Label Studio connection and (for demos and tests
only) the simulated annotators. Example: ``projects/templates/demo.toml``.

Sections and keys (defaults in brackets)::

    [experiment]  name, dir, classes [VOC], seed [0]
    [pool]        folders [[]], lists [[]]            (at least one folder or list file)
    [target]      key, name, checkpoint, options [{}]
    [[competitors]] key, name, checkpoint, options    (at least one)
                  (name: a zoo name, ``onnx:<file>`` / ``hf:<folder>``, or a model file; options are
                  type-checked; ``options.class_map``: a shipped map or a map file, see
                  ml_backend/zoo/classmaps/README.md)
    [s0] / [t0]   root, subset ["half0" / "half1"]    (folders with images/ and masks/)
    [selection]   n3, n4, test_size [30], max_per_class [4], bounds ["auto"],
                  bounds_method ["quartiles"], min_count [5], order ["failures"],
                  rating_budget [0 = all of M], metric ["miou"], working_size [model input size],
                  baseline ["entropy"]
    [finetune]    preset ["demo"], epochs, steps, batch_size, lrs, replay, lwf_weight, scale_range,
                  clip_grad_norm, encoder_lr_mult, sampling, l2sp_weight, ema_decay
    [label_studio] url, api_key_env ["LABEL_STUDIO_API_KEY"], document_root, raters_per_task [3],
                  backend_url
    [oracle]      enabled [false], gt [[]], noise [0.1], thresholds [[0.2, 0.4, 0.6, 0.8]],
                  ignore ["unlabeled"], seed [experiment seed]

Paths are resolved against the config file's folder. In every path (and in URLs), ``{shared}``
is the shared data folder (``ml_backend.shared.shared_dir()``, i.e. ``$MADSEG_SHARED`` or
``../shared``), ``{cwd}`` the current directory, ``{config_dir}`` the config file's folder, and
``${NAME}`` / ``$NAME`` an environment variable (``${MADSEG_SHARED}`` falls back to
``shared_dir()`` when unset; any other unset variable is an error). ``~`` is the home folder.

Fine-tune presets (``ml_backend.finetune.PRESETS``, shared with ``madseg finetune --preset``):
``paper`` (80 epochs, batch 2, LR grid {1, 5, 10}e-5, scale 0.5-2.0, replay of S(0)) and ``demo``
(40 SGD steps, batch 2, one LR 3e-5, scale 0.75-1.25, replay; chosen on a dev split by
``benchmarks/efficacy_finetune.py``). ``[finetune]`` keys are ``FinetuneConfig`` field names
(``lrs``: one learning rate or a grid chosen on T(0); ``steps`` = 0 means use ``epochs``;
``clip_grad_norm`` = 0 means no clipping; ``scale_range`` = [min, max]), plus ``preset`` and
``replay`` (S(0) replayed in every step); ``FinetuneSettings.to_config`` builds the config. The
old key ``lr_grid`` is still read as ``lrs`` (deprecated; a one-line warning says so). Explicit
keys in ``[finetune]`` override the preset's values, and ``load_experiment(..., preset="paper")``
swaps the preset (the "one flag away" switch of ``madseg demo``).

Every mistake is reported as one :class:`~ml_backend.errors.MadsegError` naming the file and the
key, e.g. ``experiment.toml: [selection] n3 must be a positive integer, got -1``.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_backend.classes import IGNORE_INDEX, VOC_CLASSES
from ml_backend.errors import MadsegError
from ml_backend.finetune_config import PRESETS as FT_PRESETS
from ml_backend.finetune_config import SAMPLING_MODES, FinetuneConfig, preset_config
from ml_backend.modelspec import ModelSpec

log = logging.getLogger(__name__)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: Fine-tuning presets; explicit ``[finetune]`` keys override them. One source of truth:
#: ``ml_backend.finetune.PRESETS`` (also behind ``madseg finetune --preset``); S(0) replay is on in
#: both. ``demo`` adds LwF at ``FinetuneConfig.lwf_weight`` (1.0) on the round's unlabelled
#: candidates — the dev-split rule's pick (``benchmarks/efficacy_finetune.py``, 3 dev seeds); the
#: ``paper`` preset has no LwF term (the paper's LwF is the separate "f(1) LwF" variant).
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    name: {
        "epochs": cfg.epochs, "steps": cfg.steps, "batch_size": cfg.batch_size, "lrs": tuple(cfg.lrs),
        "replay": True,
        "lwf_weight": cfg.lwf_weight if name == "demo" else 0.0, "scale_range": tuple(cfg.scale_range),
        "clip_grad_norm": cfg.clip_grad_norm,
        "encoder_lr_mult": cfg.encoder_lr_mult, "sampling": cfg.sampling, "l2sp_weight": cfg.l2sp_weight,
        "ema_decay": cfg.ema_decay,
    }
    for name, cfg in FT_PRESETS.items()
}
BOUNDS_METHODS = ("quartiles", "mean_std")
BOUNDS_RULES = ("auto", "s0", "pool", "none")
ORDERS = ("failures", "rank")
DISTANCE_METRICS = ("miou", "pixel_accuracy")
BASELINES = ("entropy", "random", "none")
IGNORE_POLICIES = ("unlabeled", "background")
SUBSET_NAMES = ("half0", "half1")

_SECTIONS: dict[str, tuple[str, ...]] = {
    "experiment": ("name", "dir", "classes", "seed"),
    "pool": ("folders", "lists"),
    "target": ("key", "name", "checkpoint", "options"),
    "competitors": ("key", "name", "checkpoint", "options"),
    "s0": ("root", "subset"),
    "t0": ("root", "subset"),
    "selection": (
        "n3", "n4", "test_size", "max_per_class", "bounds", "bounds_method", "min_count", "order",
        "rating_budget", "metric", "working_size", "baseline",
    ),
    "finetune": ("preset", "epochs", "steps", "batch_size", "lrs", "replay", "lwf_weight", "scale_range",
                 "clip_grad_norm", "encoder_lr_mult", "sampling", "l2sp_weight", "ema_decay"),
    "label_studio": ("url", "api_key_env", "document_root", "raters_per_task", "backend_url"),
    "oracle": ("enabled", "gt", "noise", "thresholds", "ignore", "seed"),
}
#: Old key names still read (deprecated; a one-line warning names the new one): section -> {old: new}.
DEPRECATED_KEYS: dict[str, dict[str, str]] = {"finetune": {"lr_grid": "lrs"}}
_REQUIRED_SECTIONS = ("experiment", "pool", "target", "competitors", "s0", "t0", "selection")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@=+-]*$")


@dataclass(frozen=True)
class ModelConfig:
    """One model of the experiment (the target or a competitor).

    ``key`` is the unique short name used in reports and file names; ``name``, ``checkpoint`` and
    ``options`` go to ``ml_backend.zoo.load_model(name, checkpoint, **options)``.
    """

    key: str
    name: str
    checkpoint: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def model_spec(self) -> ModelSpec:
        """The model as the zoo's one vocabulary, :class:`ml_backend.modelspec.ModelSpec` (what round
        plans, the backend's settings, evaluation and the benchmarks carry; torch-free)."""
        return ModelSpec(name=self.name, checkpoint=self.checkpoint, options=dict(self.options))

    def load(self, device: str | None = None) -> Any:
        """Build the model with the zoo (imports torch): ``load_model_spec(self.model_spec(), device)``."""
        from ml_backend.zoo import load_model_spec

        return load_model_spec(self.model_spec(), device=device)

    def to_dict(self) -> dict[str, Any]:
        """``{key, name, checkpoint, options}`` (the experiment's model table as JSON)."""
        return {"key": self.key, "name": self.name, "checkpoint": self.checkpoint,
                "options": dict(self.options)}


@dataclass(frozen=True)
class LabelledSetConfig:
    """A labelled folder (``images/`` + ``masks/``), optionally one half of it (S(0), T(0))."""

    root: Path
    subset: str | tuple[str, ...] | None = None

    def open(self) -> Any:
        """``ml_backend.datasets.LabelledFolder(root, subset)``."""
        from ml_backend.datasets import LabelledFolder

        subset = list(self.subset) if isinstance(self.subset, tuple) else self.subset
        return LabelledFolder(self.root, subset)

    def to_dict(self) -> dict[str, Any]:
        subset = list(self.subset) if isinstance(self.subset, tuple) else self.subset
        return {"root": str(self.root), "subset": subset}


@dataclass(frozen=True)
class PoolConfig:
    """The unlabelled pool: image folders (recursive) and/or list files (one path or URL per line)."""

    folders: tuple[Path, ...] = ()
    lists: tuple[Path, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"folders": [str(p) for p in self.folders], "lists": [str(p) for p in self.lists]}


@dataclass(frozen=True)
class SelectionConfig:
    """MAD selection and test-set settings.

    ``n3``: images per (competitor, class, partition) problem; ``n4``: lowest-rated images that go
    to S(i); ``test_size``/``max_per_class``: the unbiased test set T(i+1) (see
    ``projects.evaluation.testset``); ``bounds``: the size-bound rule (``sampler.bounds.class_bounds``:
    ``"auto"`` = S(0) per class where it has ``min_count`` masks of it, else the models'
    predictions on the pool, else none; ``"s0"`` = the paper's S(0)-only rule; ``"pool"``;
    ``"none"``) with the statistic ``bounds_method``; ``order``: how M is ordered for the raters
    (``sampler.order``: ``"failures"`` or the paper's ``"rank"``); ``rating_budget``: only M's
    first R candidates go to the raters (0 = all); ``metric``: distance between label maps;
    ``working_size``: (H, W) of the stored label maps, ``None`` = the target's input size;
    ``baseline``: the selection the same budget is spent on for the Appendix-A comparison
    (``None`` = no comparison).
    """

    n3: int
    n4: int
    test_size: int = 30
    max_per_class: int = 4
    bounds: str = "auto"
    bounds_method: str = "quartiles"
    min_count: int = 5
    order: str = "failures"
    rating_budget: int = 0
    metric: str = "miou"
    working_size: tuple[int, int] | None = None
    baseline: str | None = "entropy"

    def to_dict(self) -> dict[str, Any]:
        return {
            "n3": self.n3, "n4": self.n4, "test_size": self.test_size, "max_per_class": self.max_per_class,
            "bounds": self.bounds, "bounds_method": self.bounds_method, "min_count": self.min_count,
            "order": self.order, "rating_budget": self.rating_budget, "metric": self.metric,
            "working_size": list(self.working_size) if self.working_size else None,
            "baseline": self.baseline,
        }


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning settings after applying the preset (for ``ml_backend.finetune.FinetuneConfig``;
    the names are that class's field names, plus ``preset`` and ``replay``: S(0) replayed;
    :meth:`to_config` passes them to ``ml_backend.finetune_config.preset_config``, the one builder the
    backend's fine-tune jobs use too, so a name that is not a ``FinetuneConfig`` field fails)."""

    preset: str
    epochs: int
    batch_size: int
    lrs: tuple[float, ...]
    replay: bool
    lwf_weight: float
    scale_range: tuple[float, float] = (0.5, 2.0)
    clip_grad_norm: float | None = 10.0
    encoder_lr_mult: float = 1.0
    sampling: str = "uniform"
    l2sp_weight: float = 0.0
    ema_decay: float = 0.0
    steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "epochs": self.epochs, "steps": self.steps, "batch_size": self.batch_size,
            "lrs": list(self.lrs), "replay": self.replay, "lwf_weight": self.lwf_weight,
            "scale_range": list(self.scale_range), "clip_grad_norm": self.clip_grad_norm,
            "encoder_lr_mult": self.encoder_lr_mult, "sampling": self.sampling,
            "l2sp_weight": self.l2sp_weight, "ema_decay": self.ema_decay,
        }

    def to_config(self, *, seed: int = 0, lwf: bool = False) -> FinetuneConfig:
        """The :class:`FinetuneConfig` of these settings (``lwf``: the LwF variant, weight
        ``lwf_weight`` or 1.0; otherwise ``lwf_weight`` as set)."""
        fields = self.to_dict()  # FinetuneConfig's field names, plus preset and replay
        preset = fields.pop("preset")
        fields.pop("replay")
        fields.update(lrs=tuple(self.lrs), scale_range=tuple(self.scale_range), seed=seed,
                      lwf_weight=(self.lwf_weight or 1.0) if lwf else self.lwf_weight)
        return preset_config(preset, **fields)


@dataclass(frozen=True)
class LabelStudioConfig:
    """Where Label Studio and the ML backend are; the API key is read from ``api_key_env``."""

    url: str = "http://127.0.0.1:8080"
    api_key_env: str = "LABEL_STUDIO_API_KEY"
    document_root: Path | None = None
    raters_per_task: int = 3
    backend_url: str | None = None

    def api_key(self) -> str:
        """The API key from the environment, or :class:`MadsegError` saying which variable to set."""
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise MadsegError(
                f"environment variable {self.api_key_env} is not set; set it to your Label Studio "
                "access token (Account & Settings > Personal Access Token)"
            )
        return key

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url, "api_key_env": self.api_key_env,
            "document_root": str(self.document_root) if self.document_root else None,
            "raters_per_task": self.raters_per_task, "backend_url": self.backend_url,
        }


@dataclass(frozen=True)
class OracleConfig:
    """Simulated raters/annotators (demo, tests, benchmarks only; see ``projects.simulation.oracle``).

    ``gt``: folders of ground-truth masks, looked up by image file stem; ``noise``: standard
    deviation of each rater's Gaussian error on the mIoU scale; ``thresholds``: the four mIoU
    cut points of the 1-5 score; ``ignore``: what the annotator does with ignore (255) pixels
    (``"unlabeled"`` = leave them unpainted, ``"background"`` = paint them as background).
    """

    enabled: bool = False
    gt: tuple[Path, ...] = ()
    noise: float = 0.1
    thresholds: tuple[float, float, float, float] = (0.2, 0.4, 0.6, 0.8)
    ignore: str = "unlabeled"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled, "gt": [str(p) for p in self.gt], "noise": self.noise,
            "thresholds": list(self.thresholds), "ignore": self.ignore, "seed": self.seed,
        }


@dataclass(frozen=True)
class ExperimentConfig:
    """A parsed, validated experiment config (all paths absolute)."""

    path: Path
    name: str
    dir: Path
    classes: tuple[str, ...]
    seed: int
    pool: PoolConfig
    target: ModelConfig
    competitors: tuple[ModelConfig, ...]
    s0: LabelledSetConfig
    t0: LabelledSetConfig
    selection: SelectionConfig
    finetune: FinetuneSettings
    label_studio: LabelStudioConfig
    oracle: OracleConfig

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def models(self) -> tuple[ModelConfig, ...]:
        """The target followed by the competitors."""
        return (self.target, *self.competitors)

    def model(self, key: str) -> ModelConfig:
        """The model with this ``key``; :class:`MadsegError` listing the keys if there is none."""
        for m in self.models:
            if m.key == key:
                return m
        known = [m.key for m in self.models]
        raise MadsegError(f"{self.path.name}: no model with key {key!r}; known: {known}")

    def document_root(self) -> Path:
        """Label Studio's local-files document root: the configured one, or else the deepest folder
        that holds the experiment dir and every pool folder."""
        if self.label_studio.document_root is not None:
            return self.label_studio.document_root
        paths = [str(self.dir), *(str(p) for p in self.pool.folders)]
        paths += [str(p.parent) for p in self.pool.lists]
        return Path(os.path.commonpath(paths))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (recorded in the experiment dir for provenance)."""
        return {
            "path": str(self.path), "name": self.name, "dir": str(self.dir), "classes": list(self.classes),
            "seed": self.seed, "pool": self.pool.to_dict(), "target": self.target.to_dict(),
            "competitors": [c.to_dict() for c in self.competitors], "s0": self.s0.to_dict(),
            "t0": self.t0.to_dict(), "selection": self.selection.to_dict(),
            "finetune": self.finetune.to_dict(), "label_studio": self.label_studio.to_dict(),
            "oracle": self.oracle.to_dict(),
        }


# --------------------------------------------------------------------------------------------
# loading


class _Reader:
    """Validates one config file; every error names the file and the key."""

    def __init__(self, path: Path, check_paths: bool) -> None:
        self.file = path
        self.base = path.parent
        self.check_paths = check_paths

    def fail(self, where: str, msg: str) -> MadsegError:
        return MadsegError(f"{self.file.name}: {where} {msg}")

    # -- sections ------------------------------------------------------------------------------
    def section(self, raw: Mapping[str, Any], name: str, *, required: bool) -> dict[str, Any]:
        if name not in raw:
            if required:
                raise MadsegError(
                    f"{self.file.name}: missing section [{name}]; see projects/templates/demo.toml"
                )
            return {}
        sec = raw[name]
        if not isinstance(sec, dict):
            raise MadsegError(f"{self.file.name}: [{name}] must be a table, got {type(sec).__name__}")
        self.check_keys(sec, name, f"[{name}]")
        return sec

    def check_keys(self, sec: dict[str, Any], name: str, where: str) -> None:
        """Unknown keys -> :class:`MadsegError`; a deprecated key (:data:`DEPRECATED_KEYS`) is
        renamed in place with a one-line warning (both spellings at once -> error)."""
        for old, new in DEPRECATED_KEYS.get(name, {}).items():
            if old in sec:
                if new in sec:
                    raise self.fail(where, f"gives both {old} and {new}; keep {new} ({old} is its old name)")
                log.warning("%s: %s %s is deprecated; rename it to %s", self.file.name, where, old, new)
                sec[new] = sec.pop(old)
        unknown = sorted(set(sec) - set(_SECTIONS[name]))
        if unknown:
            raise MadsegError(
                f"{self.file.name}: {where} unknown key {unknown[0]!r}; "
                f"known keys: {', '.join(_SECTIONS[name])}"
            )

    # -- scalars -------------------------------------------------------------------------------
    def int_(self, sec: Mapping[str, Any], where: str, key: str, default: int | None = None, *,
             minimum: int = 1) -> int:
        if key not in sec:
            if default is None:
                raise self.fail(where, f"{key} is required")
            return default
        v = sec[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.fail(where, f"{key} must be {kind}, got {v!r}")
        return v

    def float_(self, sec: Mapping[str, Any], where: str, key: str, default: float, *, lo: float = 0.0,
               hi: float = float("inf")) -> float:
        v = sec.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
            rng = f">= {lo}" if hi == float("inf") else f"in [{lo}, {hi}]"
            raise self.fail(where, f"{key} must be a number {rng}, got {v!r}")
        return float(v)

    def bool_(self, sec: Mapping[str, Any], where: str, key: str, default: bool) -> bool:
        v = sec.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(where, f"{key} must be true or false, got {v!r}")
        return v

    def str_(self, sec: Mapping[str, Any], where: str, key: str, default: str | None = None) -> str:
        if key not in sec:
            if default is None:
                raise self.fail(where, f"{key} is required")
            return default
        v = sec[key]
        if not isinstance(v, str) or not v.strip():
            raise self.fail(where, f"{key} must be a non-empty string, got {v!r}")
        return v.strip()

    def choice(
        self, sec: Mapping[str, Any], where: str, key: str, default: str, options: tuple[str, ...]
    ) -> str:
        v = sec.get(key, default)
        if v not in options:
            raise self.fail(where, f"{key} must be one of {', '.join(repr(o) for o in options)}, got {v!r}")
        return v

    # -- paths ---------------------------------------------------------------------------------
    def expand(self, value: str, where: str) -> str:
        """Expand ``{shared}``, ``{cwd}``, ``{config_dir}``, ``${VAR}``, ``$VAR`` and ``~``."""

        def var(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            if name in os.environ:
                return os.environ[name]
            if name == "MADSEG_SHARED":
                return str(self.shared(where))
            raise self.fail(where, f"uses ${{{name}}} but environment variable {name} is not set; set it")

        out = _VAR_RE.sub(var, value)
        if "{shared}" in out:
            out = out.replace("{shared}", str(self.shared(where)))
        out = out.replace("{cwd}", str(Path.cwd())).replace("{config_dir}", str(self.base))
        return os.path.expanduser(out)

    def shared(self, where: str) -> Path:
        from ml_backend.shared import shared_dir

        try:
            return shared_dir()
        except MadsegError as exc:
            raise self.fail(where, f"uses {{shared}}: {exc}") from None

    def path(self, value: Any, where: str, key: str, *, must: str | None = None) -> Path:
        """Resolve a path value; ``must`` = "dir" / "file" / "exists" checks it (if checking paths)."""
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"{key} must be a path string, got {value!r}")
        p = Path(self.expand(value.strip(), f"{where} {key}"))
        if not p.is_absolute():
            p = self.base / p
        p = Path(os.path.normpath(p))
        if self.check_paths and must:
            if must == "dir" and not p.is_dir():
                raise self.fail(where, f"{key}: folder {p} does not exist; fix the path")
            if must == "file" and not p.is_file():
                raise self.fail(where, f"{key}: file {p} does not exist; fix the path")
            if must == "exists" and not p.exists():
                raise self.fail(where, f"{key}: {p} does not exist; fix the path")
        return p

    def paths(self, sec: Mapping[str, Any], where: str, key: str, *, must: str) -> tuple[Path, ...]:
        v = sec.get(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise self.fail(where, f"{key} must be a list of paths, got {v!r}")
        return tuple(self.path(item, where, f"{key}[{i}]", must=must) for i, item in enumerate(v))

    def url(self, sec: Mapping[str, Any], where: str, key: str, default: str | None) -> str | None:
        v = sec.get(key, default)
        if v is None:
            return None
        if not isinstance(v, str) or not re.match(r"^https?://[^\s/]+", self.expand(v, where)):
            raise self.fail(where, f"{key} must be an http(s) URL, got {v!r}")
        return self.expand(v, where).rstrip("/")

    # -- compound values -----------------------------------------------------------------------
    def model(self, sec: Mapping[str, Any], where: str, default_key: str | None) -> ModelConfig:
        """A model table, read by the zoo's one table reader (``ml_backend.zoo.model_spec_from_table``):
        paths (``checkpoint``, ``onnx:``/``hf:`` names, model files, the options ``class_map`` and
        ``pretrained``) are resolved against the config's folder (and checked when checking paths),
        option values are type-checked, each error naming the file, the table and the key."""
        from ml_backend.zoo import model_spec_from_table

        self.str_(sec, where, "name")
        ckpt = sec.get("checkpoint")
        if ckpt is not None and (not isinstance(ckpt, str) or not ckpt.strip()):
            raise self.fail(where, f"checkpoint must be a path string, got {ckpt!r}")

        def resolve(value: str, key: str, must: str) -> str:
            try:
                return str(self.path(value, where, key, must=must))
            except MadsegError as exc:
                if key.endswith("class_map"):
                    raise MadsegError(f"{exc} or use a shipped map (ade20k-voc, coco-panoptic-voc)") from None
                raise

        table = {k: copy.deepcopy(sec[k]) for k in ("name", "checkpoint", "options") if k in sec}
        spec = model_spec_from_table(table, self.file, where, resolve=resolve, option_prefix="options.",
                                     error=lambda msg: self.fail(where, msg))
        name, checkpoint, options = spec.name, spec.checkpoint, dict(spec.options)
        key = sec.get("key", default_key)
        if key is None:
            key = _default_key(name, checkpoint, options)
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise self.fail(where, f"key must be a short name of letters, digits and _.@=+-, got {key!r}")
        return ModelConfig(key=key, name=name, checkpoint=checkpoint, options=options)

    def labelled(self, sec: Mapping[str, Any], where: str, default_subset: str) -> LabelledSetConfig:
        root = self.path(sec.get("root"), where, "root", must="dir")
        if self.check_paths:
            for sub in ("images", "masks"):
                if not (root / sub).is_dir():
                    raise self.fail(where, f"root: {root} has no {sub}/ folder; a labelled folder needs "
                                    "images/ and masks/ with the same file stems")
        subset: Any = sec.get("subset", default_subset)
        bad = f"subset must be \"half0\", \"half1\", \"all\" or a list of stems, got {subset!r}"
        if subset in ("all", ""):
            subset = None
        elif isinstance(subset, list):
            if not subset or not all(isinstance(s, str) and s for s in subset):
                raise self.fail(where, bad)
            subset = tuple(subset)
        elif subset not in SUBSET_NAMES:
            raise self.fail(where, bad)
        return LabelledSetConfig(root=root, subset=subset)


def _default_key(name: str, checkpoint: str | None, options: Mapping[str, Any]) -> str:
    """A readable key from the model name, its scale and input size (e.g. ``espnetv2-s2.0-384``;
    ``onnx``/``hf`` models: the file or folder name, e.g. ``hf-segformer-b0``)."""
    if name in ("onnx", "hf") and checkpoint:
        name = f"{name}:{checkpoint}"
    for prefix in ("onnx:", "hf:"):
        if name.startswith(prefix):
            name = prefix[:-1] + "-" + re.sub(r"[^A-Za-z0-9_.=+-]", "-", Path(name[len(prefix):]).stem)
    base = Path(name).stem if "/" in name else name.replace(":", "-")
    parts = [base]
    if "scale" in options:
        parts.append(f"s{options['scale']}")
    elif checkpoint and (m := re.search(r"_s_([0-9.]+)_", Path(checkpoint).name)):
        parts.append(f"s{m.group(1)}")
    size = options.get("input_size")
    if size is None and checkpoint and (m := re.search(r"_(\d+)x\d+", Path(checkpoint).name)):
        size = int(m.group(1))
    if size is not None:
        parts.append(str(size[0] if isinstance(size, list) else size))
    return "-".join(parts)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in _SECTIONS or parts[0] == "competitors":
        raise MadsegError(f"override {dotted!r}: expected SECTION.KEY with SECTION one of "
                          f"{', '.join(s for s in _SECTIONS if s != 'competitors')}")
    section = raw.setdefault(parts[0], {})
    for old, new in DEPRECATED_KEYS.get(parts[0], {}).items():
        if parts[1] == new:
            section.pop(old, None)  # the override replaces the file's value under its old name too
    section[parts[1]] = value


def load_experiment(
    path: str | os.PathLike[str],
    *,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    check_paths: bool = True,
) -> ExperimentConfig:
    """Read and validate an experiment config.

    ``preset`` replaces ``[finetune] preset`` (e.g. ``"paper"``); ``overrides`` maps dotted keys to
    values applied before validation (e.g. ``{"finetune.epochs": 1, "oracle.enabled": False}``).
    ``check_paths=False`` skips the existence checks of folders and files (for tools that only
    read settings). Raises :class:`MadsegError` naming the file and key for every mistake.
    """
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MadsegError(f"{path}: experiment config not found; pass the path of a .toml file "
                          "(see projects/templates/demo.toml)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MadsegError(f"{path}: cannot read experiment config ({exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MadsegError(f"{path.name}: not valid TOML ({exc})") from None
    raw = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    if preset is not None:
        raw.setdefault("finetune", {})["preset"] = preset
    return _parse(raw, path, check_paths)


def _parse(raw: dict[str, Any], path: Path, check_paths: bool) -> ExperimentConfig:
    r = _Reader(path, check_paths)
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise MadsegError(
            f"{path.name}: unknown section [{unknown[0]}]; known sections: {', '.join(_SECTIONS)}"
        )

    # [experiment]
    ex = r.section(raw, "experiment", required=True)
    w = "[experiment]"
    name = r.str_(ex, w, "name")
    exp_dir = r.path(ex.get("dir", f"runs/{name}"), w, "dir")
    classes = ex.get("classes", list(VOC_CLASSES))
    if (not isinstance(classes, list) or len(classes) < 2
            or not all(isinstance(c, str) and c.strip() for c in classes)):
        raise r.fail(w, f"classes must be a list of at least 2 class names (index 0 = background), "
                     f"got {classes!r}")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise r.fail(w, f"classes has duplicate names {dup}")
    if len(classes) > IGNORE_INDEX:
        raise r.fail(w, f"classes has {len(classes)} names; at most {IGNORE_INDEX} (255 is the ignore index)")
    seed = r.int_(ex, w, "seed", 0, minimum=0)

    # [pool]
    po = r.section(raw, "pool", required=True)
    pool = PoolConfig(folders=r.paths(po, "[pool]", "folders", must="dir"),
                      lists=r.paths(po, "[pool]", "lists", must="file"))
    if not pool.folders and not pool.lists:
        raise r.fail("[pool]", "needs at least one entry in folders or lists")

    # models
    target = r.model(r.section(raw, "target", required=True), "[target]", None)
    comps_raw = raw.get("competitors")
    if not isinstance(comps_raw, list) or not comps_raw or not all(isinstance(c, dict) for c in comps_raw):
        raise MadsegError(
            f"{path.name}: needs at least one [[competitors]] table (name, checkpoint, options)"
        )
    competitors = []
    for i, c in enumerate(comps_raw):
        r.check_keys(c, "competitors", f"[[competitors]] #{i + 1}")
        competitors.append(r.model(c, f"[[competitors]] #{i + 1}", None))
    keys = [m.key for m in (target, *competitors)]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:
        raise MadsegError(f"{path.name}: model key {dups[0]!r} is used twice; give each model a distinct "
                          "key = \"...\"")

    # S(0), T(0)
    s0 = r.labelled(r.section(raw, "s0", required=True), "[s0]", "half0")
    t0 = r.labelled(r.section(raw, "t0", required=True), "[t0]", "half1")

    # [selection]
    se = r.section(raw, "selection", required=True)
    w = "[selection]"
    ws = se.get("working_size")
    if ws is None:
        working_size = None
    elif isinstance(ws, int) and not isinstance(ws, bool) and ws > 0:
        working_size = (ws, ws)
    elif (isinstance(ws, list) and len(ws) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ws)):
        working_size = (ws[0], ws[1])
    else:
        raise r.fail(w, f"working_size must be a positive integer or [height, width], got {ws!r}")
    baseline = r.choice(se, w, "baseline", "entropy", BASELINES)
    bounds = se.get("bounds", "auto")
    bounds_method = r.choice(se, w, "bounds_method", "quartiles", BOUNDS_METHODS)
    if bounds in BOUNDS_METHODS:  # the earlier meaning of the key: the S(0) rule with that statistic
        bounds, bounds_method = "s0", bounds
    elif bounds not in BOUNDS_RULES:
        raise r.fail(w, f"bounds must be one of {', '.join(repr(o) for o in BOUNDS_RULES)} (or the S(0) "
                        f"statistic 'quartiles' / 'mean_std'), got {bounds!r}")
    selection = SelectionConfig(
        n3=r.int_(se, w, "n3"), n4=r.int_(se, w, "n4"),
        test_size=r.int_(se, w, "test_size", 30), max_per_class=r.int_(se, w, "max_per_class", 4),
        bounds=bounds, bounds_method=bounds_method, min_count=r.int_(se, w, "min_count", 5),
        order=r.choice(se, w, "order", "failures", ORDERS),
        rating_budget=r.int_(se, w, "rating_budget", 0, minimum=0),
        metric=r.choice(se, w, "metric", "miou", DISTANCE_METRICS),
        working_size=working_size, baseline=None if baseline == "none" else baseline,
    )

    # [finetune]
    ft = r.section(raw, "finetune", required=False)
    w = "[finetune]"
    preset_name = r.choice(ft, w, "preset", "demo", tuple(FINETUNE_PRESETS))
    base = FINETUNE_PRESETS[preset_name]
    lrs = ft.get("lrs", list(base["lrs"]))
    if (not isinstance(lrs, list) or not lrs
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in lrs)):
        raise r.fail(w, f"lrs must be a non-empty list of positive learning rates, got {lrs!r}")
    finetune = FinetuneSettings(
        preset=preset_name,
        epochs=r.int_(ft, w, "epochs", base["epochs"]),
        batch_size=r.int_(ft, w, "batch_size", base["batch_size"]),
        lrs=tuple(float(v) for v in lrs),
        replay=r.bool_(ft, w, "replay", base["replay"]),
        lwf_weight=r.float_(ft, w, "lwf_weight", base["lwf_weight"]),
        scale_range=_scale_range(r, ft, w, base["scale_range"]),
        clip_grad_norm=_clip(r, ft, w, base["clip_grad_norm"]),
        encoder_lr_mult=r.float_(ft, w, "encoder_lr_mult", base["encoder_lr_mult"]),
        sampling=r.choice(ft, w, "sampling", base["sampling"], SAMPLING_MODES),
        l2sp_weight=r.float_(ft, w, "l2sp_weight", base["l2sp_weight"]),
        ema_decay=r.float_(ft, w, "ema_decay", base["ema_decay"], hi=0.9999),
        steps=_steps(r, ft, w, base["steps"]),
    )

    # [label_studio]
    ls = r.section(raw, "label_studio", required=False)
    w = "[label_studio]"
    env_name = r.str_(ls, w, "api_key_env", "LABEL_STUDIO_API_KEY")
    if not _ENV_NAME_RE.match(env_name):
        raise r.fail(w, f"api_key_env must be the NAME of an environment variable (not the key itself), "
                     f"got {env_name[:4]}...")
    docroot = ls.get("document_root")
    label_studio = LabelStudioConfig(
        url=r.url(ls, w, "url", "http://127.0.0.1:8080") or "http://127.0.0.1:8080",
        api_key_env=env_name,
        document_root=None if docroot is None else r.path(docroot, w, "document_root", must="dir"),
        raters_per_task=r.int_(ls, w, "raters_per_task", 3),
        backend_url=r.url(ls, w, "backend_url", None),
    )
    if label_studio.document_root is not None:
        for i, folder in enumerate(pool.folders):
            if not folder.is_relative_to(label_studio.document_root) or folder == label_studio.document_root:
                raise r.fail(
                    "[pool]",
                    f"folders[{i}]: {folder} is not inside a subfolder of [label_studio] document_root "
                    f"{label_studio.document_root}; Label Studio serves local files only from subfolders of "
                    "its document root"
                )

    # [oracle]
    orc = r.section(raw, "oracle", required=False)
    w = "[oracle]"
    enabled = r.bool_(orc, w, "enabled", False)
    thresholds = orc.get("thresholds", [0.2, 0.4, 0.6, 0.8])
    if (not isinstance(thresholds, list) or len(thresholds) != 4
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1
                       for t in thresholds)
            or any(thresholds[j + 1] <= thresholds[j] for j in range(3))):
        raise r.fail(w, f"thresholds must be 4 increasing numbers in [0, 1] (mIoU cut points of the "
                     f"scores 1..5), got {thresholds!r}")
    oracle = OracleConfig(
        enabled=enabled,
        gt=r.paths(orc, w, "gt", must="dir" if enabled else ""),
        noise=r.float_(orc, w, "noise", 0.1),
        thresholds=tuple(float(t) for t in thresholds),  # type: ignore[arg-type]
        ignore=r.choice(orc, w, "ignore", "unlabeled", IGNORE_POLICIES),
        seed=r.int_(orc, w, "seed", seed, minimum=0),
    )
    if enabled and not oracle.gt:
        raise r.fail(w, "gt must list at least one folder of ground-truth masks when enabled = true")

    return ExperimentConfig(
        path=path, name=name, dir=exp_dir, classes=tuple(c.strip() for c in classes), seed=seed,
        pool=pool, target=target, competitors=tuple(competitors), s0=s0, t0=t0, selection=selection,
        finetune=finetune, label_studio=label_studio, oracle=oracle,
    )


def _scale_range(r: Any, ft: Mapping[str, Any], w: str, default: tuple[float, float]) -> tuple[float, float]:
    v = ft.get("scale_range", list(default))
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            or not (0 < v[0] <= v[1])):
        raise r.fail(w, f"scale_range must be [min, max] with 0 < min <= max, got {v!r}")
    return (float(v[0]), float(v[1]))


def _clip(r: Any, ft: Mapping[str, Any], w: str, default: float | None) -> float | None:
    """``clip_grad_norm``: a positive number, or 0 for no clipping."""
    if "clip_grad_norm" not in ft:
        return default
    v = r.float_(ft, w, "clip_grad_norm", 0.0)
    return None if v == 0 else v


def _steps(r: Any, ft: Mapping[str, Any], w: str, default: int | None) -> int | None:
    """``steps`` (SGD steps, replacing epochs); 0 = use ``epochs``. An explicit ``epochs`` without
    ``steps`` means epochs."""
    if "steps" not in ft:
        return None if "epochs" in ft else default
    v = r.int_(ft, w, "steps", minimum=0)
    return None if v == 0 else v
