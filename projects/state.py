"""Per-round state files: which stages of a round are done, what they produced, and when.

Layout inside an experiment dir::

    <exp_dir>/round-<i>/state.json     (i = 0, 1, 2, ...)

``state.json`` holds ``{"version": 1, "round": i, "created_at", "updated_at",
"stages": {name: {"status": "running" | "done", "started_at", "finished_at", "seconds",
"outputs": {...}}}}`` (times are ISO-8601 UTC). Every change is written atomically
(``ml_backend.atomic``), so after a crash the file holds the last finished stage and the round
resumes from there; :meth:`RoundState.reset` forgets stages to re-run them.

Stage names are chosen by the orchestrator (letters, digits, ``_``, ``-``, ``.``); outputs are any
JSON values (``Path`` objects are stored as strings). The round stages record typed outputs
(``projects.stage_results``: one frozen dataclass per stage, stored as its ``to_dict()``), and
:meth:`RoundState.read` gives them back typed, e.g. ``st.read(MasksOutput).T_stems``.

:func:`experiment_lock` keeps two processes from driving the same experiment at once.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ml_backend.atomic import atomic_write_json
from ml_backend.errors import MadsegError
from ml_backend.jsonsafe import jsonable
from ml_backend.round_dirs import round_number, round_state_files

from .layout import STATE_FILE, round_dir
from .stage_results import FinetuneOutput, StageOutput

Out = TypeVar("Out", bound=StageOutput)

STATE_VERSION = 1
_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def list_rounds(exp_dir: str | os.PathLike[str]) -> list[int]:
    """Round numbers that have a state file, ascending."""
    return sorted(n for n in map(round_number, round_state_files(exp_dir)) if n is not None)


def served_round(exp_dir: str | os.PathLike[str], i: int) -> int:
    """The round whose model is served after round ``i``: ``i`` when the promotion gate promoted
    f(i), else the last promoted round before it (0 = the configured target f(0)).

    Raises ``MadsegError`` when a round on the way has not finished fine-tuning.
    """
    while i > 0:
        st = RoundState.load(exp_dir, i)
        if not st.done("finetune"):
            raise MadsegError(f"round {i} has not finished fine-tuning f({i}); "
                              f"run `madseg round --round {i}` first")
        if st.read(FinetuneOutput).is_promoted:  # state files from before the gate: promoted
            return i
        i -= 1
    return 0


class RoundState:
    """The state of one round; load with :meth:`load`, update with :meth:`begin` / :meth:`mark`."""

    def __init__(self, exp_dir: str | os.PathLike[str], i: int, data: dict[str, Any] | None = None) -> None:
        self.exp_dir = Path(exp_dir)
        self.round = i
        self.dir = round_dir(exp_dir, i)
        self.path = self.dir / STATE_FILE
        now = _now()
        self.data: dict[str, Any] = data or {
            "version": STATE_VERSION, "round": i, "created_at": now, "updated_at": now, "stages": {},
        }

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, exp_dir: str | os.PathLike[str], i: int) -> RoundState:
        """The state of round ``i`` (empty if the round has no state file yet).

        A state file that is not valid JSON or of another version raises :class:`MadsegError`
        naming it (it is never overwritten silently).
        """
        st = cls(exp_dir, i)
        if not st.path.exists():
            return st
        try:
            data = json.loads(st.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MadsegError(f"{st.path}: unreadable round state ({exc}); fix or delete the file "
                              "(deleting re-runs the whole round)") from None
        if (not isinstance(data, dict) or data.get("version") != STATE_VERSION
                or not isinstance(data.get("stages"), dict) or data.get("round") != i):
            raise MadsegError(f"{st.path}: not a madseg round-{i} state file (version {STATE_VERSION}); "
                              "fix or delete the file")
        st.data = data
        return st

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        """All stage records by name (in the order they were first started or marked)."""
        return self.data["stages"]

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished (was :meth:`mark`-ed and not reset since)."""
        rec = self.stages.get(stage)
        return bool(rec and rec.get("status") == "done")

    def outputs(self, stage: str) -> dict[str, Any]:
        """The outputs recorded by :meth:`mark`; :class:`MadsegError` if the stage is not done."""
        if not self.done(stage):
            raise MadsegError(f"{self.path}: stage {stage!r} of round {self.round} has not finished; "
                              "run the round to finish it")
        return dict(self.stages[stage].get("outputs", {}))

    def read(self, kind: type[Out], stage: str | None = None) -> Out:
        """The typed output of ``stage`` (default: the first stage ``kind`` belongs to, e.g.
        ``st.read(FinetuneOutput)``); :class:`MadsegError` if the stage is not done."""
        return kind.from_dict(self.outputs(stage or kind.STAGES[0]))

    def done_stages(self) -> list[str]:
        return [name for name, rec in self.stages.items() if rec.get("status") == "done"]

    # -- writing ---------------------------------------------------------------------------------
    def begin(self, stage: str) -> None:
        """Record that ``stage`` started (status "running"); saved at once."""
        _check_stage(stage)
        rec = self.stages.setdefault(stage, {})
        rec.update({"status": "running", "started_at": _now()})
        rec.pop("finished_at", None)
        rec.pop("seconds", None)
        rec.pop("outputs", None)
        self.save()

    def mark(self, stage: str, result: StageOutput | Mapping[str, Any] | None = None, /,
             **outputs: Any) -> None:
        """Record that ``stage`` is done with its typed ``result`` (stored as ``result.to_dict()``)
        and/or these JSON-able ``outputs``; saved atomically at once."""
        _check_stage(stage)
        base = result.to_dict() if isinstance(result, StageOutput) else dict(result or {})
        payload = jsonable({**base, **outputs})
        try:
            json.dumps(payload)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"outputs of stage {stage!r} are not JSON-serialisable: {exc}") from None
        now = _now()
        rec = self.stages.setdefault(stage, {})
        started = rec.get("started_at") if rec.get("status") == "running" else None
        rec.update({"status": "done", "started_at": started or now, "finished_at": now, "outputs": payload})
        elapsed = _dt.datetime.fromisoformat(now) - _dt.datetime.fromisoformat(rec["started_at"])
        rec["seconds"] = round(elapsed.total_seconds(), 3)
        self.save()

    def reset(self, *stages: str) -> None:
        """Forget ``stages`` (so they run again); saved at once. Unknown names are ignored."""
        for s in stages:
            self.stages.pop(s, None)
        self.save()

    def save(self) -> None:
        self.data["updated_at"] = _now()
        atomic_write_json(self.path, self.data)

    def __repr__(self) -> str:
        return f"RoundState(round={self.round}, done={self.done_stages()})"


def _check_stage(stage: str) -> None:
    if not isinstance(stage, str) or not _STAGE_RE.match(stage):
        raise ValueError(f"bad stage name {stage!r}: use letters, digits, '_', '-', '.'")


@contextlib.contextmanager
def experiment_lock(exp_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on the experiment dir for the duration of the ``with`` block.

    Raises :class:`MadsegError` at once if another process holds it (the lock is released by the
    OS when a process dies, so a crash never leaves a stale lock).
    """
    import fcntl

    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    lock_path = exp_dir / ".lock"
    fh = open(lock_path, "a+")  # noqa: SIM115 - kept open while locked
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise MadsegError(f"{exp_dir}: another madseg process (pid {holder}) is working on this "
                              "experiment; wait for it to finish or stop it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield lock_path
    finally:
        fh.close()
