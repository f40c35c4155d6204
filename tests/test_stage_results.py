"""Typed stage outputs (``projects.stage_results``) over ``state.json`` files in the format the rounds
have always written: reading them typed and writing them back gives the same keys and values, an older
state (no effort, no gate) loads, and unknown keys survive."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ml_backend.errors import MadsegError
from ml_backend.zoo import ModelSpec
from projects.stage_results import (
    STAGE_OUTPUTS,
    ChooseOutput,
    Effort,
    FinetuneOutput,
    GateVerdict,
    MasksOutput,
    ProjectsOutput,
    PushOutput,
    RatingsOutput,
    ScoreOutput,
    SelectOutput,
    TrainedModel,
)
from projects.state import RoundState, served_round

SPEC = {"name": "espnetv2", "checkpoint": "/m/esp.pth", "options": {"scale": 0.5, "input_size": [256, 256]}}
CHILD = {"name": "espnetv2", "checkpoint": "/e/round-1/finetune/model.pth", "options": {"scale": 0.5}}
EFFORT = {"tasks": 4, "annotations": 12, "annotators": 3, "lead_time_s": 61.5, "without_lead_time": 0,
          "simulated": True}
GATE = {"format": 1, "promoted": False, "status": "rejected", "reasons": ["T(0): forgetting 0.031 > 0.02"],
        "metrics": {"T(0)": {"name": "T(0)", "n_images": 6, "parent_miou": 0.5, "child_miou": 0.4,
                             "parent_gt_miou": 0.5, "child_gt_miou": 0.41, "delta_gt_miou": -0.09,
                             "ci_low": None, "ci_high": None}},
        "criteria": {"seed": 0, "t0_tolerance": 0.02}, "parent": "f(0)", "parent_spec": SPEC,
        "failure_sets": [{"name": "T(1)", "images": 3}], "excluded_training_images": 1}

#: the outputs of every stage of a MAD round, as ``projects.rounds`` wrote them before the typed outputs
MAD_ROUND: dict[str, dict[str, Any]] = {
    "score": {"target_version": "espnetv2-s0.5-256@3f2a", "competitor_versions": {"dice": "dicenet@9a"},
              "n_images": 40, "bad": 1, "duplicates": 2, "inferred": {"input_size": [256, 256]}},
    "select": {"candidates": "candidates.jsonl", "n_candidates": 8, "m_size": 12, "pool_size": 37,
               "n_records": 9, "order": "failures", "rating_budget": 8, "n3": 2,
               "bounds_rule": {"rule": "auto", "counts": {"s0": 3, "pool": 1, "none": 17}}},
    "predict": {"predictions": "pred", "n": 8, "computed": 8},
    "projects": {"rating": 11, "segmentation": 12, "ml_backend": 3},
    "push_rating": {"created": 8, "existing": 0, "tasks": 8},
    "ratings": {"ratings": "ratings.json", "n_rated": 8, "n_ood": 1, "effort": EFFORT},
    "choose": {"S": ["a", "b"], "T": ["c", "d", "e"], "n_ood": 1},
    "push_segmentation": {"created": 5, "existing": 0, "tasks": 5},
    "masks": {"labels": "labels", "S_stems": ["a", "b"], "T_stems": ["c", "d", "e"], "effort": EFFORT},
    "finetune": {"spec": CHILD, "version": "espnetv2@77aa", "lr": 3e-05, "val_miou": None,
                 "checkpoint": "/e/round-1/finetune/model.pth", "gate": GATE, "promoted": False,
                 "lwf": {"spec": {**CHILD, "checkpoint": "/e/lwf.pth"}, "version": "espnetv2@88bb",
                         "lr": 3e-05, "val_miou": 0.61, "checkpoint": "/e/lwf.pth"},
                 "n_train": 2},
}


def _state_file(tmp_path: Path, outputs: dict[str, dict[str, Any]], i: int = 1) -> Path:
    """A state.json in the on-disk format (written by hand, not by the classes under test)."""
    stages = {name: {"status": "done", "started_at": "2026-01-01T00:00:00.000+00:00",
                     "finished_at": "2026-01-01T00:00:01.000+00:00", "seconds": 1.0, "outputs": out}
              for name, out in outputs.items()}
    path = tmp_path / f"round-{i}" / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "round": i, "created_at": "2026-01-01T00:00:00.000+00:00",
                                "updated_at": "2026-01-01T00:00:01.000+00:00", "stages": stages}))
    return path


def test_every_stage_of_an_existing_state_file_round_trips(tmp_path: Path) -> None:
    _state_file(tmp_path, MAD_ROUND)
    st = RoundState.load(tmp_path, 1)
    assert set(STAGE_OUTPUTS) == set(MAD_ROUND)
    for stage, stored in MAD_ROUND.items():
        typed = st.read(STAGE_OUTPUTS[stage], stage)
        assert typed.to_dict() == stored, stage
        assert json.dumps(typed.to_dict()) == json.dumps(stored), stage  # key order too
        assert typed.extra == {}, stage
    # marking the typed outputs again writes the same state.json outputs
    again = RoundState.load(tmp_path, 2)
    for stage in MAD_ROUND:
        again.mark(stage, st.read(STAGE_OUTPUTS[stage], stage))
    reread = json.loads((tmp_path / "round-2" / "state.json").read_text())
    assert {k: v["outputs"] for k, v in reread["stages"].items()} == MAD_ROUND


def test_readers_get_attributes(tmp_path: Path) -> None:
    _state_file(tmp_path, MAD_ROUND)
    st = RoundState.load(tmp_path, 1)
    assert st.read(ScoreOutput).competitor_versions == {"dice": "dicenet@9a"}
    assert st.read(SelectOutput).bounds_rule["counts"]["s0"] == 3
    assert st.read(ProjectsOutput).segmentation == 12
    assert st.read(PushOutput, "push_segmentation").created == 5
    assert st.read(RatingsOutput).effort == Effort.from_dict(EFFORT)
    assert st.read(ChooseOutput).S == ("a", "b") and st.read(ChooseOutput).T == ("c", "d", "e")
    masks = st.read(MasksOutput)
    assert masks.T_stems == ("c", "d", "e") and masks.effort is not None and masks.effort.lead_time_s == 61.5
    ft = st.read(FinetuneOutput)
    assert ft.spec == ModelSpec.from_dict(CHILD) and ft.version == "espnetv2@77aa" and ft.val_miou is None
    assert isinstance(ft.gate, GateVerdict) and ft.gate.status == "rejected" and not ft.is_promoted
    assert ft.gate.parent_spec == ModelSpec.from_dict(SPEC)
    assert ft.gate.failure_sets == ({"name": "T(1)", "images": 3},)
    assert isinstance(ft.lwf, TrainedModel) and ft.lwf.val_miou == 0.61
    assert ft.model == TrainedModel.from_dict({k: MAD_ROUND["finetune"][k] for k in
                                               ("spec", "version", "lr", "val_miou", "checkpoint")})
    with pytest.raises(MadsegError, match="has not finished"):
        RoundState.load(tmp_path, 3).read(FinetuneOutput)


def test_older_states_and_unknown_keys(tmp_path: Path) -> None:
    """A state from before effort and the gate were recorded (and an entropy round's select) loads; the
    optional keys stay absent when written back; keys the classes do not know are kept."""
    old = copy.deepcopy(MAD_ROUND)
    for stage in ("ratings", "masks"):
        del old[stage]["effort"]
    del old["projects"]["ml_backend"]
    for key in ("gate", "promoted", "lwf"):
        del old["finetune"][key]
    old["select"] = {"candidates": "candidates.jsonl", "n_candidates": 6, "pool_size": 37}
    old["score"]["written_by"] = "a newer madseg"
    _state_file(tmp_path, old)
    st = RoundState.load(tmp_path, 1)
    for stage, stored in old.items():
        assert st.read(STAGE_OUTPUTS[stage], stage).to_dict() == stored, stage
    assert st.read(ScoreOutput).extra == {"written_by": "a newer madseg"}
    assert st.read(RatingsOutput).effort is None and st.read(SelectOutput).m_size is None
    ft = st.read(FinetuneOutput)
    assert ft.gate is None and ft.promoted is None and ft.is_promoted  # before the gate: served
    assert served_round(tmp_path, 1) == 1


def test_served_round_follows_the_typed_gate(tmp_path: Path) -> None:
    _state_file(tmp_path, MAD_ROUND, 1)  # f(1) rejected
    promoted = copy.deepcopy(MAD_ROUND)
    promoted["finetune"].update(promoted=True, gate={**GATE, "promoted": True, "status": "promoted"})
    _state_file(tmp_path, promoted, 2)
    assert served_round(tmp_path, 1) == 0 and served_round(tmp_path, 2) == 2
    # positive control: round 2 rejected as well -> back to f(0)
    _state_file(tmp_path, MAD_ROUND, 2)
    assert served_round(tmp_path, 2) == 0


def test_bad_outputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MadsegError, match="FinetuneOutput expects a JSON object"):
        FinetuneOutput.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(MadsegError, match="bad model spec"):
        FinetuneOutput.from_dict({"spec": {"checkpoint": "x.pth"}})


def test_plan_json_round_trips_through_plan_record(tmp_path: Path) -> None:
    """plan.json as the rounds have always written it reads back typed and writes back unchanged."""
    from projects.stage_results import PlanRecord

    stored = {"kind": "mad", "number": 2, "target_key": "f(1)",
              "target": {"name": "espnetv2", "checkpoint": "/m/f1.pth", "options": {"scale": 2.0}},
              "competitors": {"g": {"name": "dicenet", "checkpoint": None, "options": {}}},
              "n4": 10, "test_size": 30, "finetune": True, "title": "demo round 2", "used": ["a", "b"],
              "lwf_variant": False}
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(stored))
    plan = PlanRecord.read(f)
    assert plan.kind == "mad" and plan.target_key == "f(1)" and plan.target.options == {"scale": 2.0}
    assert plan.competitors["g"].name == "dicenet" and plan.used == ("a", "b")
    assert plan.to_dict() == stored and list(plan.to_dict()) == list(stored)
    f.write_text("{not json")
    with pytest.raises(MadsegError, match="plan.json: cannot read the round's plan"):
        PlanRecord.read(f)
