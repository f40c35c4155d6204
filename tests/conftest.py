"""Shared pytest fixtures (each area adds its import here)."""

import pytest
import torch

from tests.ls_server import ls_server  # noqa: F401


@pytest.fixture
def cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the checkpoint-hash cache of a test out of the user's home."""
    monkeypatch.setenv("MADSEG_CACHE", str(tmp_path_factory.getbasetemp() / "madseg-cache"))


@pytest.fixture
def one_torch_thread():
    """Small tensors gain little from 2 threads, and on a busy 2-core machine OpenMP threads
    waiting for each other make them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
