"""The experiment's settings for the ML backend, handed down as data (``ml_backend`` never reads
the experiment TOML: it sits below ``projects``).

:func:`backend_settings` picks what the backend and its fine-tune jobs need from an experiment
(target spec, fine-tune settings, S(0) when replayed, T(0), Label Studio's document root, the
experiment dir, the pool's image folders and the ground-truth mask folders it must never serve)
as an :class:`ml_backend.experiment_settings.ExperimentSettings`. :func:`prepare_backend_env`
is what ``madseg backend`` / ``madseg worker`` run first: with ``MADSEG_EXPERIMENT`` set it writes
those settings to ``<experiment dir>/backend-settings.json`` and points ``MADSEG_BACKEND_SETTINGS``
at the file.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path

from ml_backend.errors import MadsegError
from ml_backend.experiment_settings import SETTINGS_ENV, ExperimentSettings

from .experiment import ExperimentConfig, load_experiment
from .layout import ExperimentLayout

EXPERIMENT_ENV = "MADSEG_EXPERIMENT"


def pool_dirs(exp: ExperimentConfig) -> list[Path]:
    """The folders the experiment's pool images live in: its pool folders, and for list files the
    folder of each listed local entry (the backend reads local task images only from these)."""
    out = [Path(p) for p in exp.pool.folders]
    if exp.pool.lists:
        from sampler.pool import _list_entries, is_url

        for list_file in exp.pool.lists:
            for entry in _list_entries(Path(list_file)):
                if not is_url(entry):
                    p = Path(entry)
                    out.append(p if p.is_dir() else p.parent)
    return list(dict.fromkeys(out))


def backend_settings(exp: ExperimentConfig) -> ExperimentSettings:
    """The backend-relevant parts of an experiment, as data."""
    ft = exp.finetune.to_dict()
    replay = ft.pop("replay", False)
    return ExperimentSettings(
        target=exp.target.model_spec(),
        finetune=ft,
        replay=exp.s0.to_dict() if replay else None,
        val=exp.t0.to_dict(),
        document_root=str(exp.document_root()),
        dir=str(exp.dir),
        pool_dirs=tuple(str(p) for p in pool_dirs(exp)),
        ground_truth=tuple(
            [str(p) for p in exp.oracle.gt]
            + [str(Path(s.root) / "masks") for s in (exp.s0, exp.t0) if getattr(s, "root", None)]
        ),
    )


def write_backend_settings(exp: ExperimentConfig, path: str | Path | None = None) -> Path:
    """Write :func:`backend_settings` (default ``<experiment dir>/backend-settings.json``, atomic)."""
    default = ExperimentLayout.of(exp.dir).backend_settings
    return backend_settings(exp).write(path if path is not None else default)


def prepare_backend_env(env: MutableMapping[str, str]) -> Path | None:
    """With ``MADSEG_EXPERIMENT`` set in ``env`` and no ``MADSEG_BACKEND_SETTINGS``: write the
    experiment's settings file and set ``MADSEG_BACKEND_SETTINGS`` to it; returns its path (None
    when there is nothing to do). A bad experiment file raises ``MadsegError``."""
    exp_file = env.get(EXPERIMENT_ENV, "").strip()
    if not exp_file or env.get(SETTINGS_ENV, "").strip():
        return None
    exp = load_experiment(exp_file)
    try:
        path = write_backend_settings(exp)
    except OSError as exc:
        raise MadsegError(
            f"{EXPERIMENT_ENV}={exp_file}: cannot write the backend's settings to "
            f"{ExperimentLayout.of(exp.dir).backend_settings} ({exc.strerror or exc}); "
            "make the experiment dir writable"
        ) from None
    env[SETTINGS_ENV] = str(path)
    return path
