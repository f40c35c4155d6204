"""Session fixture: one real Label Studio server (SQLite in a temp dir) for the whole test run.

Usage in a test::

    @pytest.mark.server
    def test_something(ls_server):
        client = ls_server.client()                  # label_studio_sdk.LabelStudio as the admin
        rater = ls_server.user("rater1")             # signed-up user with its own token (cached)
        rater_client = ls_server.client(rater)
        env = ls_server.env()                        # LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY

The first run migrates a template data dir once (~1 min, cached in ``~/.cache/madseg``); later
runs start in seconds. Local files are served under ``ls_server.document_root``, the common parent
of the shared data folder and pytest's temp folders, so test images, overlays and the shared data
can all be used as task images.
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_backend.shared import shared_dir
from projects.simulation.ls_local import LocalLabelStudio, LSUser, signup_user, start_local_label_studio

TEST_USERNAME = "admin@madseg.test"
TEST_PASSWORD = "madseg-test-pass-1"
TEST_TOKEN = "madseg-test-admin-token-1"
USER_PASSWORD = "madseg-user-pass-1"


class LSServer:
    """The running test server: ``url``, ``api_key`` (= ``token``), ``username``, ``password``,
    ``document_root``, ``data_dir``, and helpers for clients and extra users."""

    def __init__(self, server: LocalLabelStudio) -> None:
        self.server = server
        self.url = server.url
        self.token = server.token
        self.api_key = server.token
        self.username = server.username
        self.password = server.password
        self.document_root = server.document_root
        self.data_dir = server.data_dir
        self._users: dict[str, LSUser] = {}

    def env(self) -> dict[str, str]:
        """``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` for the admin (for monkeypatch.setenv)."""
        return {"LABEL_STUDIO_URL": self.url, "LABEL_STUDIO_API_KEY": self.api_key}

    def user(self, name: str) -> LSUser:
        """The user ``<name>@madseg.test`` (signed up on first use), with its own API token."""
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(f"user name {name!r}: use letters, digits, dot, dash, underscore")
        if name not in self._users:
            self._users[name] = signup_user(self.url, f"{name}@madseg.test", USER_PASSWORD)
        return self._users[name]

    def client(self, user: LSUser | None = None) -> Any:
        """An SDK client (``label_studio_sdk.LabelStudio``) as the admin or as ``user``."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=user.token if user else self.api_key)

    def alive(self) -> bool:
        return self.server.alive()

    def log_tail(self, n: int = 30) -> str:
        return self.server.log_tail(n)


def _document_root(tmp_base: Path) -> Path:
    shared = shared_dir(required=False).resolve()
    return Path(os.path.commonpath([str(shared), str(tmp_base.resolve())]))


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LSServer]:
    """A real Label Studio 1.23 server on 127.0.0.1 for the whole session (stopped at the end)."""
    data_dir = tmp_path_factory.mktemp("label-studio")
    server = start_local_label_studio(
        data_dir,
        document_root=_document_root(tmp_path_factory.getbasetemp()),
        username=TEST_USERNAME,
        password=TEST_PASSWORD,
        token=TEST_TOKEN,
    )
    atexit.register(server.stop)
    try:
        yield LSServer(server)
    finally:
        server.stop()
