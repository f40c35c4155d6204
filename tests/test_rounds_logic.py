"""Round orchestration without servers: S/T helpers, candidates files, the resumable stage engine
(incl. a real kill -9 through the crash hook), the demo's config rewriting, cached evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ml_backend.errors import MadsegError
from ml_backend.shared import shared_dir
from projects.rounds import (
    MAD_STAGES,
    RoundPlan,
    RoundRunner,
    RunOptions,
    lowest_mos,
    top_by_score,
)
from projects.simulation.demo import _toml_with_overrides, demo_overrides, stage_table
from projects.state import RoundState
from sampler.candidates import Candidate, Selection, read_candidates, write_candidates

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "projects" / "templates" / "demo.toml"


def test_lowest_mos_skips_out_of_domain_and_excluded() -> None:
    mos = {"a": 2.0, "b": float("inf"), "c": 1.0, "d": 2.0, "e": float("nan"), "f": 1.5}
    assert lowest_mos(mos, 3) == ["c", "f", "a"]  # ties (a, d) broken by id
    assert lowest_mos(mos, 10, exclude=["c"]) == ["f", "a", "d"]
    assert lowest_mos(mos, 0) == []


def test_lowest_mos_ties_follow_the_raters_order() -> None:
    mos = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 2.0, "z": 1.0}
    # M's order (the order raters saw) breaks the ties; ids not in it come after, by id
    assert lowest_mos(mos, 3, order=["c", "d", "a"]) == ["c", "a", "b"]
    assert lowest_mos(mos, 5, order=["z"]) == ["z", "a", "b", "c", "d"]


def test_top_by_score() -> None:
    assert top_by_score({"x": 0.5, "y": 0.9, "z": 0.9, "w": 0.1}, 3, exclude=["w"]) == ["y", "z", "x"]


def test_candidates_round_trip_and_errors(tmp_path: Path) -> None:
    sel = Selection("tflite", "v1", "cat", 8, "target", 0.5, 1)
    recs = [Candidate("b", "/p/b.jpg", rank=1, selections=(sel,), target_areas=(0.9, 0.1)),
            Candidate("a", "/p/a.jpg", rank=2, method="entropy", entropy=1.5)]
    write_candidates(tmp_path / "c.jsonl", recs)
    assert read_candidates(tmp_path / "c.jsonl") == recs
    # a hand-written file with only id and path reads with the defaults
    (tmp_path / "min.jsonl").write_text('{"id": "a", "path": "/p/a.jpg", "extra": 1}\n\n')
    assert read_candidates(tmp_path / "min.jsonl") == [Candidate("a", "/p/a.jpg")]
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(MadsegError, match="needs 'id' and 'path'"):
        read_candidates(tmp_path / "bad.jsonl")
    with pytest.raises(MadsegError, match="no candidates file"):
        read_candidates(tmp_path / "missing.jsonl")


ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from projects.rounds import RoundPlan, RoundRunner, MAD_STAGES

    root = Path(sys.argv[1])
    calls = root / "calls.txt"

    class CountingRunner(RoundRunner):
        def __getattribute__(self, name):
            if name.startswith("_stage_"):
                stage = name[len("_stage_"):]
                def run(plan, st):
                    with open(calls, "a") as fh:
                        fh.write(stage + "\\n")
                    return {"ran": stage}
                return run
            return super().__getattribute__(name)

    plan = RoundPlan(kind="mad", number=1, root=root, target_key="f(0)", target={"name": "x"},
                     competitors={}, n4=1, test_size=1, finetune=True, title="t")
    CountingRunner.__new__(CountingRunner).run(plan)
    print("finished")
""")


def test_stage_engine_resumes_after_kill_9(tmp_path: Path) -> None:
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = {**os.environ, "MADSEG_TEST_CRASH_AFTER": "round1.ratings", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    st = RoundState.load(tmp_path, 1)
    upto = MAD_STAGES.index("ratings") + 1
    assert st.done_stages() == list(MAD_STAGES[:upto])
    assert (tmp_path / "calls.txt").read_text().split() == list(MAD_STAGES[:upto])
    env.pop("MADSEG_TEST_CRASH_AFTER")
    p = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "finished" in p.stdout, p.stderr
    # every stage ran exactly once over the two processes
    assert (tmp_path / "calls.txt").read_text().split() == list(MAD_STAGES)
    st = RoundState.load(tmp_path, 1)
    assert st.done_stages() == list(MAD_STAGES)
    assert st.outputs("finetune") == {"ran": "finetune"}
    table = stage_table(tmp_path)
    assert "| finetune |" in table and "round-1" in table


def test_eval_plan_has_no_finetune(tmp_path: Path) -> None:
    plan = RoundPlan(kind="eval", number=3, root=tmp_path, target_key="f(2)", target={"name": "x"},
                     competitors={}, n4=0, test_size=5, finetune=False, title="t")
    assert "finetune" not in plan.stages and plan.stages[-1] == "masks"
    assert plan.dir == tmp_path / "round-3"


def test_demo_config_rewrite_loads_with_overrides(tmp_path: Path) -> None:
    from projects.experiment import load_experiment

    ov = demo_overrides(tmp_path / "exp", 8123, 9123, oracle=False)
    exp = load_experiment(TEMPLATE, overrides=ov)
    text = _toml_with_overrides(TEMPLATE.read_text(), ov, exp)
    (tmp_path / "experiment.toml").write_text(text)
    again = load_experiment(tmp_path / "experiment.toml")
    assert again.dir == (tmp_path / "exp").resolve()
    assert again.label_studio.url == "http://127.0.0.1:8123"
    assert again.label_studio.backend_url == "http://127.0.0.1:9123"
    assert again.oracle.enabled is False
    assert again.target.model_spec() == exp.target.model_spec()
    assert [c.key for c in again.competitors] == [c.key for c in exp.competitors]


def test_mad_plan_requires_previous_finetune(tmp_path: Path) -> None:
    from projects.experiment import load_experiment

    exp = load_experiment(TEMPLATE, overrides={"experiment.dir": str(tmp_path / "e")})
    runner = RoundRunner(exp, RunOptions(progress=False))
    plan = runner.mad_plan(1)
    assert plan.target == exp.target.model_spec() and plan.target_key == "f(0)" and plan.finetune
    assert set(plan.competitors) == {c.key for c in exp.competitors}
    with pytest.raises(MadsegError, match="has not finished fine-tuning f\\(1\\)"):
        runner.mad_plan(2)


@pytest.mark.slow
def test_evaluate_models_caches_confusions(tmp_path: Path) -> None:
    from projects.evaluation.evaluate import (
        ModelEntry,
        TestSet,
        evaluate_models,
        labelled_pairs,
        markdown_table,
        ranking_curves,
        table1,
    )

    voc = shared_dir() / "data" / "voc_samples"
    pairs = labelled_pairs(voc)[:3]
    esp = shared_dir() / "models" / "espnetv2"
    spec = {"name": "espnetv2", "checkpoint": str(esp / "espnetv2_s_0.5_pascal_256x256.pth"), "options": {}}
    spec2 = {**spec, "checkpoint": str(esp / "espnetv2_s_1.0_pascal_256x256.pth")}
    models = [ModelEntry("a", spec, "target", 0), ModelEntry("b", spec2, "competitor")]
    sets = [TestSet("T(0)", tuple(pairs), 0), TestSet("T(1)", tuple(pairs[:2]), 1)]
    ev = evaluate_models(models, sets, 21, tmp_path / "cache")
    assert ev.confusions[("a", "T(0)")].shape == (3, 21, 21)
    assert 0.0 < ev.miou("a", "T(0)") <= 1.0
    # the per-set numbers equal the sum of the per-image confusions
    assert np.array_equal(ev.confusions[("a", "T(1)")], ev.confusions[("a", "T(0)")][:2])

    def no_loading(spec: object) -> object:
        raise AssertionError("a cached evaluation must not load the model")

    again = evaluate_models(models, sets, 21, tmp_path / "cache", loader=no_loading)
    assert again.miou("b", "T(0)") == ev.miou("b", "T(0)")
    t1 = table1(again, [f"c{k}" for k in range(21)])
    assert [r["key"] for r in t1["rows"]] == ["a", "b"]
    assert t1["rows"][0]["drawn_against"]["T(1)"] is True  # f(0) is the target T(1) was drawn against
    curves = ranking_curves(again)
    assert set(curves) == {"T(0)", "T(1)"} and curves["T(0)"]["ks"] == [1, 2, 3]
    assert "| a |" in markdown_table(again)
    json.dumps(t1)


def test_lwf_distils_only_on_unlabelled_candidates(tmp_path: Path) -> None:
    """The demo preset's LwF term uses the round's candidates minus every S and T image so far."""
    from projects.experiment import FINETUNE_PRESETS
    from projects.layout import RoundLayout, round_dir
    from projects.rounds import RoundPlan, labelled_stems, unlabelled_candidates

    assert FINETUNE_PRESETS["demo"]["lwf_weight"] == 1.0 and FINETUNE_PRESETS["paper"]["lwf_weight"] == 0.0
    for j, sets in ((1, {"S": ["a"], "T": ["b"]}), (2, {"S": ["c"], "T": ["d"]})):
        f = RoundLayout(round_dir(tmp_path, j)).sets
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(sets))
    plan = RoundPlan(kind="mad", number=2, root=tmp_path, target_key="f(1)", target={"name": "x"},
                     competitors={}, n4=1, test_size=1, finetune=True, title="t")
    assert labelled_stems(plan) == {"a", "b", "c", "d"}
    cands = [Candidate(id=i, path=f"/pool/{i}.jpg") for i in ("a", "e", "d", "f")]
    cands.append(Candidate(id="x9", path="/pool/c.jpg"))  # id differs from the file stem: excluded by stem
    assert unlabelled_candidates(cands, labelled_stems(plan)) == ["/pool/e.jpg", "/pool/f.jpg"]
    # round 1 sees only its own sets (positive control: round 2's S and T stay available)
    plan1 = RoundPlan(kind="mad", number=1, root=tmp_path, target_key="f(0)", target={"name": "x"},
                      competitors={}, n4=1, test_size=1, finetune=True, title="t")
    expected = ["/pool/e.jpg", "/pool/d.jpg", "/pool/f.jpg", "/pool/c.jpg"]
    assert unlabelled_candidates(cands, labelled_stems(plan1)) == expected
