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


@pytest.fixture(scope="session")
def voc2012_small() -> dict:
    """Small fixed subsets of the shared voc2012 (the demo's S(0)/T(0) source) for fast round tests:
    ``s0`` (train stems), ``t0`` (val stems), and disjoint extra labelled images that play the
    round's S(i) (``s``, from train) and T(i) (``t``, from val)."""
    from ml_backend.shared import shared_dir

    root = shared_dir() / "data" / "voc2012"
    return {
        "train": root / "train", "val": root / "val",
        "s0": ["2007_000032", "2007_000063", "2007_000068", "2007_000170"],
        "t0": ["2007_000061", "2007_000129", "2007_000175", "2007_000346", "2007_000464", "2007_000529"],
        "s": [["2007_000241", "2007_000250"], ["2007_000243", "2007_000256"]],
        "t": [["2007_000323", "2007_000452", "2007_000491"], ["2007_000559", "2007_000572", "2007_000629"]],
    }
