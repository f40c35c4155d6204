"""The experiment directory named once (projects.layout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_backend.errors import MadsegError
from projects.layout import ExperimentLayout, RoundLayout, round_dir
from projects.state import RoundState


def test_every_path_of_an_experiment_dir(tmp_path: Path) -> None:
    lay = ExperimentLayout.of(tmp_path)
    assert lay.store == tmp_path / "store" and lay.model_dir == tmp_path / "backend"
    assert lay.results == tmp_path / "results.json" and lay.report == tmp_path / "report"
    assert lay.eval_cache == tmp_path / "eval" and lay.report_assets == tmp_path / "report-assets"
    assert lay.backend_settings == tmp_path / "backend-settings.json"
    assert lay.entropy_round().dir == tmp_path / "baseline-entropy" / "round-1"
    assert lay.compare_round().dir == tmp_path / "baseline-compare" / "round-1"
    assert [label for _, label in lay.round_roots()] == ["round", "entropy", "compare"]
    assert ExperimentLayout.of(tmp_path, tmp_path / "m").model_dir == tmp_path / "m"
    r = lay.round(2)
    assert r == RoundLayout(tmp_path / "round-2")
    assert (r.candidates.name, r.ratings.name, r.selection.name, r.plan.name) == (
        "candidates.jsonl", "ratings.json", "selection.json", "plan.json")
    assert r.pred_mask("abc") == tmp_path / "round-2" / "pred" / "abc.png"
    assert r.sets == tmp_path / "round-2" / "labels" / "sets.json"
    assert (r.train.name, r.finetune.name, r.finetune_lwf.name) == ("train", "finetune", "finetune-lwf")


def test_the_round_state_lives_where_the_layout_says(tmp_path: Path) -> None:
    st = RoundState.load(tmp_path, 3)
    st.mark("score", n=1)
    assert ExperimentLayout.of(tmp_path).round(3).state == st.path and st.path.is_file()


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1"])
def test_bad_round_numbers(tmp_path: Path, bad: object) -> None:
    with pytest.raises(MadsegError, match="round number"):
        round_dir(tmp_path, bad)  # type: ignore[arg-type]
    assert round_dir(tmp_path, 0) == tmp_path / "round-0"  # positive control


def test_round_state_files_and_numbers(tmp_path: Path) -> None:
    from ml_backend.round_dirs import round_number, round_state_files
    from projects.state import list_rounds

    for i in (2, 10):
        RoundState.load(tmp_path, i).mark("score", n=i)
    (tmp_path / "round-x").mkdir()
    (tmp_path / "round-x" / "state.json").write_text("{}")  # not a round folder name
    files = round_state_files(tmp_path)
    assert [round_number(f) for f in files] == [10, 2, None]  # sorted by path
    assert list_rounds(tmp_path) == [2, 10]
    assert round_number(tmp_path / "other" / "state.json") is None
