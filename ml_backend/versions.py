"""The model directory of the ML backend: fine-tuned versions and the "current version" pointer.

Layout of ``<model_dir>`` (``MADSEG_MODEL_DIR``)::

    current.json              the pointer: which model the backend serves (written atomically)
    versions/<job id>/        one folder per successful fine-tune job: the checkpoint + JSON sidecar
                              written by ml_backend.finetune, and version.json (= the pointer record)
    jobs/<job id>/            work folder of a job (exported masks); status.json says how it ended

The pointer is a small JSON object (a :class:`ServingRecord`): the model spec the zoo loads
(``name``, ``checkpoint``, ``options``), the ``version`` string the fine-tuning core reported,
and provenance (job id, projects, number of training images, time). Without a pointer the
backend serves the configured target model. The fine-tune job writes the pointer with
:func:`write_pointer` (temp file + rename), so a reader never sees a half-written file; the
backend notices a new pointer by its inode/mtime and hot-swaps the model without a restart.

Promotion gate (:mod:`ml_backend.gate`): every fine-tuned version is recorded under
``versions/<job id>/version.json`` with its ``status`` ("promoted" or "rejected") and the gate's
decision (reasons and numbers). Only a promoted version may become the pointer:
:func:`write_pointer` refuses a rejected record, and :func:`record_version` records one without
touching the pointer, so a rejected version is kept and listed (``/versions``, the report) but
never served.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .errors import MadsegError
from .modelspec import ModelSpec

POINTER_NAME = "current.json"
VERSION_RECORD_NAME = "version.json"


@dataclass(frozen=True)
class ServingRecord:
    """What the backend serves: a model spec for ``ml_backend.zoo.load_model_spec`` plus provenance."""

    version: str
    name: str
    checkpoint: str | None
    options: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    projects: tuple[int, ...] = ()
    n_train: int = 0
    created_at: float = 0.0
    status: str = "promoted"
    gate: dict[str, Any] | None = None

    @property
    def reason(self) -> str:
        """The gate's reasons as one line ("" when the version was not gated)."""
        return "; ".join((self.gate or {}).get("reasons") or [])

    def spec(self) -> ModelSpec:
        """The model spec the zoo loads."""
        return ModelSpec(name=self.name, checkpoint=self.checkpoint, options=dict(self.options))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["projects"] = list(self.projects)
        return out

    @classmethod
    def from_json(cls, obj: Any, source: str) -> ServingRecord:
        """Parse a record; raises :class:`MadsegError` naming ``source`` when it is malformed."""
        if not isinstance(obj, dict) or not isinstance(obj.get("version"), str) or not isinstance(
            obj.get("name"), str
        ):
            raise MadsegError(
                f"{source}: not a model-version record (needs string 'version' and 'name'); "
                "delete it to serve the configured target model again"
            )
        ckpt = obj.get("checkpoint")
        options = obj.get("options") or {}
        if ckpt is not None and not isinstance(ckpt, str) or not isinstance(options, dict):
            raise MadsegError(f"{source}: 'checkpoint' must be a string and 'options' an object")
        return cls(
            version=obj["version"],
            name=obj["name"],
            checkpoint=ckpt,
            options=options,
            job_id=obj.get("job_id"),
            projects=tuple(int(p) for p in obj.get("projects") or ()),
            n_train=int(obj.get("n_train") or 0),
            created_at=float(obj.get("created_at") or 0.0),
            status=str(obj.get("status") or "promoted"),
            gate=obj.get("gate") if isinstance(obj.get("gate"), dict) else None,
        )


def pointer_path(model_dir: str | os.PathLike[str]) -> Path:
    return Path(model_dir) / POINTER_NAME


def versions_dir(model_dir: str | os.PathLike[str]) -> Path:
    return Path(model_dir) / "versions"


def jobs_dir(model_dir: str | os.PathLike[str]) -> Path:
    return Path(model_dir) / "jobs"


def _read_record(path: Path) -> ServingRecord | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MadsegError(f"{path}: cannot read the model-version record ({exc})") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MadsegError(f"{path}: not valid JSON ({exc.msg}); delete it to fall back") from exc
    return ServingRecord.from_json(obj, str(path))


def read_pointer(model_dir: str | os.PathLike[str]) -> ServingRecord | None:
    """The current-version record of ``model_dir``, or ``None`` when no fine-tune has finished yet."""
    return _read_record(pointer_path(model_dir))


def pointer_stamp(model_dir: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """A cheap change detector for the pointer: (inode, mtime_ns, size), ``None`` when absent."""
    try:
        st = os.stat(pointer_path(model_dir))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def record_version(model_dir: str | os.PathLike[str], record: ServingRecord) -> Path | None:
    """Record ``record`` under ``versions/<job id>/version.json`` (listed by :func:`list_versions`)
    without touching the pointer; None for a record without a job id."""
    if not record.job_id:
        return None
    return atomic_write_json(versions_dir(model_dir) / record.job_id / VERSION_RECORD_NAME, record.to_json())


def write_pointer(model_dir: str | os.PathLike[str], record: ServingRecord) -> Path:
    """Record ``record`` under ``versions/<job id>/`` and atomically make it the current version.

    Only a record carrying a promotion-gate decision that promoted it may be served: a rejected
    record, or one without a decision (``gate=None``), raises :class:`MadsegError`.
    """
    if record.status != "promoted":
        raise MadsegError(
            f"version {record.version} ({record.job_id}) was {record.status} by the promotion gate "
            f"({record.reason or 'no reason recorded'}); it cannot become the served version"
        )
    if not isinstance(record.gate, dict) or record.gate.get("promoted") is not True:
        raise MadsegError(
            f"version {record.version} ({record.job_id}) has no promotion-gate decision; run the gate "
            "(ml_backend.gate.decide) and pass its decision to new_record(gate=...) before serving it"
        )
    record_version(model_dir, record)
    return atomic_write_json(pointer_path(model_dir), record.to_json())


def list_versions(model_dir: str | os.PathLike[str]) -> list[ServingRecord]:
    """Every fine-tuned version recorded in ``model_dir``, oldest first (unreadable records skipped)."""
    out = []
    root = versions_dir(model_dir)
    if not root.is_dir():
        return out
    for rec_path in root.glob(f"*/{VERSION_RECORD_NAME}"):
        try:
            rec = _read_record(rec_path)
        except MadsegError:
            continue
        if rec is not None:
            out.append(rec)
    out.sort(key=lambda r: r.created_at)
    return out


def new_record(
    *, version: str, name: str, checkpoint: str | os.PathLike[str], options: dict[str, Any], job_id: str,
    projects: tuple[int, ...], n_train: int, gate: dict[str, Any] | None = None,
) -> ServingRecord:
    """A record for a freshly fine-tuned checkpoint (stamped with the current time).

    ``gate``: the promotion gate's decision (``GateDecision.to_json()``); its ``promoted`` flag
    sets the record's status (no decision = "promoted", for callers that gate elsewhere).
    """
    status = "promoted" if gate is None or gate.get("promoted") else "rejected"
    return ServingRecord(
        version=version, name=name, checkpoint=str(checkpoint), options=dict(options), job_id=job_id,
        projects=tuple(projects), n_train=n_train, created_at=time.time(), status=status,
        gate=None if gate is None else dict(gate),
    )
