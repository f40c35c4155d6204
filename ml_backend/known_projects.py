"""Which Label Studio projects may queue fine-tunes through the backend's ``/webhook`` and ``/train``.

A project is known when it is

1. listed in ``MADSEG_TRAIN_PROJECTS``;
2. a segmentation project of the experiment (``MADSEG_EXPERIMENT``): the ``segmentation`` output
   of the ``projects`` stage in ``<experiment dir>/round-<i>/state.json`` (the format of
   ``projects.state``; re-read when a state file changes, so a new round's project counts at once);
3. registered by a ``/setup`` call that passed the backend's authentication (basic auth or the
   bearer token) with a segmentation label config. Label Studio calls ``/setup`` when the backend
   is connected to a project. These ids are kept in ``<model_dir>/known_projects.json`` (written
   atomically; re-read when it changes, so several worker processes agree and a restart keeps them).
   A backend without credentials registers nothing this way: anyone who can reach it could call
   ``/setup``.

Events of any other project are answered ``ignored`` and create nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from .atomic import atomic_write_json
from .round_dirs import round_state_files

log = logging.getLogger(__name__)

FILE_NAME = "known_projects.json"
#: At most this many projects are registered through /setup (a bound on the file, not a policy).
MAX_REGISTERED = 10_000


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def experiment_segmentation_projects(exp_dir: Path) -> set[int]:
    """The segmentation project ids recorded in ``exp_dir/round-*/state.json`` (unreadable files skipped)."""
    out: set[int] = set()
    for path in round_state_files(exp_dir):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stage = data["stages"]["projects"]
            if stage.get("status") != "done":
                continue
            pid = stage.get("outputs", {}).get("segmentation")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            out.add(pid)
    return out


class KnownProjects:
    """The known projects of one backend (module docstring). Thread-safe."""

    def __init__(
        self, model_dir: Path, configured: Iterable[int] = (), experiment_dir: Path | None = None
    ) -> None:
        self.path = Path(model_dir) / FILE_NAME
        self.configured = frozenset(int(p) for p in configured)
        self.experiment_dir = Path(experiment_dir) if experiment_dir else None
        self._lock = threading.Lock()
        self._registered: set[int] = set()
        self._stamp: tuple[int, int, int] | None = None
        self._exp: set[int] = set()
        self._exp_stamp: tuple[tuple[str, tuple[int, int, int] | None], ...] = ()

    def _registered_now(self) -> set[int]:
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            ids: set[int] = set()
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                ids = {int(p) for p in data.get("projects", []) if isinstance(p, int) and p > 0}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError) as exc:
                log.error("%s is unreadable (%s); projects registered through /setup are not known until "
                          "it is fixed or deleted", self.path, type(exc).__name__)
            self._registered, self._stamp = ids, stamp
        return self._registered

    def _experiment_now(self) -> set[int]:
        if self.experiment_dir is None:
            return set()
        files = round_state_files(self.experiment_dir)
        stamp = tuple((str(p), _stamp(p)) for p in files)
        if stamp != self._exp_stamp:
            self._exp, self._exp_stamp = experiment_segmentation_projects(self.experiment_dir), stamp
        return self._exp

    def why(self, project_id: int) -> str | None:
        """How ``project_id`` is known ("MADSEG_TRAIN_PROJECTS", "experiment", "setup"), or None."""
        if project_id in self.configured:
            return "MADSEG_TRAIN_PROJECTS"
        with self._lock:
            if project_id in self._experiment_now():
                return "experiment"
            if project_id in self._registered_now():
                return "setup"
        return None

    def register(self, project_id: int) -> bool:
        """Remember a project that completed an authenticated ``/setup``; True when it is new."""
        with self._lock:
            ids = self._registered_now()
            if project_id in ids:
                return False
            if len(ids) >= MAX_REGISTERED:
                log.error("%s already lists %d projects; project %d not registered", self.path, len(ids),
                          project_id)
                return False
            new = sorted(ids | {project_id})
            atomic_write_json(self.path, {"projects": new})
            self._registered, self._stamp = set(new), _stamp(self.path)
            return True

    def all(self) -> list[int]:
        with self._lock:
            return sorted(self.configured | self._experiment_now() | self._registered_now())
