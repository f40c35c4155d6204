"""The round's fine-tune stage gates f(i) before it is served (real fine-tunes of ESPNetv2 s=0.5 @256,
real evaluation; S(0)/T(0) are small voc2012 subsets, the round's labels are voc2012 images put
where the masks stage exports them, so no Label Studio is needed for this stage).

- forced regression (a huge learning rate): f(1) is rejected, kept and listed with the reason,
  the pointer does not move, and round 2 goes on with f(0) as its target;
- positive control: a damaged f(1) let through by a wide tolerance is served; the next round's
  f(2) (a near-copy of f(0)) beats it on T(0) and on the failure sets and is promoted and served.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ml_backend.app import create_app
from ml_backend.backend_config import BackendConfig
from ml_backend.modelspec import ModelSpec
from ml_backend.versions import list_versions, read_pointer
from projects.experiment import ExperimentConfig, load_experiment
from projects.rounds import MAD_STAGES, RoundRunner, RunOptions
from projects.state import RoundState, round_dir
from sampler.candidates import Candidate, write_candidates
from tests.experiments import DICE, ESP, write_experiment_toml

pytestmark = pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")

WIDE = {"t0_tolerance": 1.0, "failure_tolerance": 1.0}


def _experiment(tmp: Path, voc: dict[str, Any], lr: float, epochs: int) -> ExperimentConfig:
    cfg = write_experiment_toml(tmp, "gate", f"""
[pool]
folders = ["{voc['val']}/images"]

[target]
key = "esp-s0.5"
name = "espnetv2"
checkpoint = "{ESP}"

[[competitors]]
key = "dicenet-s0.5"
name = "dicenet"
checkpoint = "{DICE}"

[s0]
root = "{voc['train']}"
subset = {json.dumps(voc['s0'])}

[t0]
root = "{voc['val']}"
subset = {json.dumps(voc['t0'])}

[selection]
n3 = 1
n4 = 2
test_size = 3

[finetune]
epochs = {epochs}
lrs = [{lr}]
""")
    return load_experiment(cfg)


def _labelled_round(exp: ExperimentConfig, voc: dict[str, Any], i: int) -> None:
    """Round i with every stage up to ``masks`` done: S(i), T(i) exported to round-<i>/labels/."""
    s_stems, t_stems = voc["s"][i - 1], voc["t"][i - 1]
    labels = round_dir(exp.dir, i) / "labels"
    for stems, src in ((s_stems, voc["train"]), (t_stems, voc["val"])):
        for s in stems:
            for sub, ext in (("images", "jpg"), ("masks", "png")):
                (labels / sub).mkdir(parents=True, exist_ok=True)
                shutil.copy(src / sub / f"{s}.{ext}", labels / sub / f"{s}.{ext}")
    (labels / "sets.json").write_text(json.dumps({"S": s_stems, "T": t_stems}))
    # the select stage's candidates: here only the labelled images (nothing left for LwF)
    write_candidates(round_dir(exp.dir, i) / "candidates.jsonl",
                     [Candidate(id=s, path=str(labels / "images" / f"{s}.jpg")) for s in s_stems + t_stems])
    st = RoundState.load(exp.dir, i)
    outputs = {"choose": {"S": s_stems, "T": t_stems, "n_ood": 0},
               "masks": {"labels": "labels", "S_stems": s_stems, "T_stems": t_stems}}
    for stage in MAD_STAGES[:-1]:
        st.mark(stage, **outputs.get(stage, {}))


def _runner(exp: ExperimentConfig, gate: dict[str, Any] | None = None) -> RoundRunner:
    return RoundRunner(exp, RunOptions(progress=False, device="cpu", gate_options=gate or {}))


def _versions(model_dir: Path, target: ModelSpec) -> dict[str, Any]:
    app = create_app(BackendConfig(target=target, model_dir=model_dir, device="cpu"))
    resp = app.test_client().get("/versions")
    assert resp.status_code == 200
    return resp.get_json()


def test_forced_regression_is_rejected_and_the_round_goes_on_with_the_parent(
    tmp_path: Path, voc2012_small: dict[str, Any]
) -> None:
    exp = _experiment(tmp_path, voc2012_small, lr=0.05, epochs=2)
    _labelled_round(exp, voc2012_small, 1)
    runner = _runner(exp)
    st = runner.run(runner.mad_plan(1))
    out = st.outputs("finetune")
    assert out["promoted"] is False and out["gate"]["status"] == "rejected"
    assert any("forgetting" in r or "worse" in r for r in out["gate"]["reasons"])
    assert out["gate"]["metrics"]["T(0)"]["n_images"] == 6
    assert out["gate"]["failure_sets"] == [{"name": "T(1)", "images": 3}]
    assert out["gate"]["parent"] == "f(0)"
    # kept on disk and listed with the reason; never served
    assert Path(out["checkpoint"]).is_file()
    assert read_pointer(runner.model_dir) is None
    (rec,) = list_versions(runner.model_dir)
    assert rec.status == "rejected" and rec.version == out["version"] and rec.reason
    listed = _versions(runner.model_dir, exp.target.model_spec())
    assert listed["current"] is None
    assert listed["details"][0]["status"] == "rejected" and listed["details"][0]["reason"] == rec.reason
    # the next round's target is the parent
    assert runner.target_key(1) == "f(0)" and runner.target_spec(1) == exp.target.model_spec()
    plan2 = runner.mad_plan(2)
    assert plan2.target_key == "f(0)" and plan2.target == exp.target.model_spec()
    assert runner.finetuned_spec(1).to_dict() == out["spec"]


def test_improving_version_is_promoted_over_a_worse_served_parent(
    tmp_path: Path, voc2012_small: dict[str, Any]
) -> None:
    exp = _experiment(tmp_path, voc2012_small, lr=0.05, epochs=2)
    _labelled_round(exp, voc2012_small, 1)
    bad = _runner(exp, WIDE).run(_runner(exp, WIDE).mad_plan(1)).outputs("finetune")
    assert bad["promoted"] is True  # let through by the wide tolerance: the damaged f(1) is served
    model_dir = _runner(exp).model_dir
    assert read_pointer(model_dir).version == bad["version"]

    gentle = replace(exp, finetune=replace(exp.finetune, lrs=(1e-9,), epochs=1))
    _labelled_round(gentle, voc2012_small, 2)
    runner = _runner(gentle)
    plan = runner.mad_plan(2)
    assert plan.target_key == "f(1)"
    out = runner.run(plan).outputs("finetune")
    gate = out["gate"]
    assert out["promoted"] is True, gate["reasons"]
    assert gate["metrics"]["T(0)"]["delta_gt_miou"] > 0.01
    # and against f(0), the anchor that keeps small drops from adding up over rounds: about even
    assert gate["metrics"]["T(0) vs f(0)"]["delta_gt_miou"] > -0.01
    fz = gate["metrics"]["T(1..2) failures"]
    assert fz["n_images"] == 6 and fz["delta_gt_miou"] > 0
    assert read_pointer(model_dir).version == out["version"]
    assert runner.target_key(2) == "f(2)"
    assert [v.status for v in list_versions(model_dir)] == ["promoted", "promoted"]
