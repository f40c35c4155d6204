"""The report's "did the round help?" numbers (projects.evaluation.evaluate.round_help, experiment_effort,
gate_verdicts, markdown_table) and the effort count of Label Studio exports, on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ml_backend.metrics import confusion_matrix
from ml_backend.modelspec import ModelSpec
from projects.evaluation.evaluate import (
    Evaluation,
    ModelEntry,
    experiment_effort,
    gate_verdicts,
    markdown_table,
    round_help,
    table1,
)
from projects.evaluation.evaluate import (
    TestSet as EvalSet,
)
from projects.rounds import annotation_effort
from projects.state import RoundState

C = 21


def _cm(cls: int, wrong_rows: int) -> np.ndarray:
    gt = np.zeros((20, 20), np.uint8)
    gt[5:15, 5:15] = cls
    pred = gt.copy()
    pred[5:5 + wrong_rows, 5:15] = 0
    return confusion_matrix(pred, gt, C)


def _set(name: str, stems: list[str], drawn: int, against: str = "") -> EvalSet:
    return EvalSet(name, tuple((Path(f"/x/{s}.jpg"), Path(f"/x/{s}.png")) for s in stems), drawn, "", against)


def _ev() -> Evaluation:
    t0 = _set("T(0)", ["a", "b"], 0)
    t1 = _set("T(1)", ["c", "d", "e"], 1, "f(0)")
    t2 = _set("T(2)", ["g", "h"], 2, "f(1)")
    models = [ModelEntry("f(0)", {"name": "x"}, "target", 0), ModelEntry("f(1)", {"name": "x"}, "target", 1),
              ModelEntry("f(2)", {"name": "x"}, "target", 2)]
    ev = Evaluation(models=models, sets=[t0, t1, t2])
    wrong = {"f(0)": (0, 6), "f(1)": (0, 2), "f(2)": (4, 8)}  # (rows lost on T(0), on the failures)
    for key, (w0, wf) in wrong.items():
        ev.confusions[(key, "T(0)")] = np.stack([_cm(10, w0), _cm(12, w0)])
        ev.confusions[(key, "T(1)")] = np.stack([_cm(k, wf) for k in (5, 9, 11)])
        ev.confusions[(key, "T(2)")] = np.stack([_cm(k, wf) for k in (14, 16)])
    return ev


def test_round_help_gain_interval_and_training_images_left_out() -> None:
    ev = _ev()
    out = round_help(ev, {"f(1)": ["d"], "f(2)": []}, served="f(1)")
    assert out["failure_zone"] == ["T(1)", "T(2)"] and out["served"] == "f(1)"
    f1, f2 = out["rows"]
    assert f1["model"] == "f(1)" and f1["served"] is True
    assert f1["images"] == 4 and f1["excluded_training_images"] == 1  # "d" was a training image
    assert f1["sets"] == ["T(1) (2)", "T(2) (2)"]
    # f(0) loses 6 of 10 object rows, f(1) 2: object IoU 0.4 -> 0.8, background 1 -> ~0.92..
    assert f1["gain"] > 0.2 and f1["ci"][0] > 0 and f1["ci"][0] <= f1["gain"] <= f1["ci"][1]
    assert f1["t0_gain"] == pytest.approx(0.0)
    assert f2["gain"] < 0 and f2["t0_gain"] < 0 and f2["images"] == 5
    # when nothing was promoted the served model is f(0) itself: listed with zero gain
    none = round_help(ev, {"f(1)": []}, served="f(0)")
    assert [r["model"] for r in none["rows"]] == ["f(1)", "f(0)"]
    assert none["rows"][1]["gain"] == 0.0 and none["rows"][1]["served"] is True


def test_table1_marks_drawn_against_the_round_target_and_gives_both_mious() -> None:
    ev = _ev()
    rows = {r["key"]: r for r in table1(ev, [f"c{k}" for k in range(C)])["rows"]}
    assert rows["f(0)"]["drawn_against"]["T(1)"] is True and rows["f(1)"]["drawn_against"]["T(2)"] is True
    assert rows["f(1)"]["drawn_against"]["T(1)"] is False
    # T(0) has 2 object classes + background: both definitions agree without spurious classes
    assert rows["f(0)"]["gt_miou"]["T(0)"] == pytest.approx(rows["f(0)"]["miou"]["T(0)"])
    md = markdown_table(ev, marks={"f(2)": "rejected"})
    assert "| f(2) (rejected) |" in md and "100.0 / 100.0" in md


def test_gate_verdicts_and_effort_from_round_state(tmp_path: Path) -> None:
    st = RoundState.load(tmp_path, 1)
    st.mark("ratings", n_rated=3, effort={"annotations": 9, "lead_time_s": 61.5, "simulated": False})
    st.mark("masks", S_stems=["a"], T_stems=["b", "c"],
            effort={"annotations": 3, "lead_time_s": 300.0, "simulated": False})
    st.mark("finetune", spec={}, promoted=False,
            gate={"status": "rejected", "reasons": ["T(0): forgetting"], "parent": "f(0)", "metrics": {}})
    st2 = RoundState.load(tmp_path, 2)  # a state written before effort was recorded
    (tmp_path / "round-2").mkdir(exist_ok=True)
    (tmp_path / "round-2" / "ratings.json").write_text(json.dumps({"raw": [{}, {}, {}, {}]}))
    st2.mark("ratings", n_rated=2)
    st2.mark("masks", S_stems=["d"], T_stems=[])
    st2.mark("finetune", spec={})
    assert gate_verdicts(tmp_path, 2) == {
        "f(1)": {"status": "rejected", "reasons": ["T(0): forgetting"], "parent": "f(0)", "metrics": {}},
        "f(2)": {"status": "not gated", "reasons": [], "parent": None, "metrics": {}},
    }
    eff = experiment_effort(tmp_path, [1, 2, 3])
    assert eff["total"] == {"ratings": 13, "masks": 4, "lead_time_s": 361.5}
    assert eff["rounds"][0]["masks lead time (s)"] == 300.0 and eff["rounds"][1]["ratings"] == 4
    assert eff["rounds"][2] == {"round": 3} and eff["simulated"] is False


def test_annotation_effort_counts_finished_annotations_and_lead_time() -> None:
    tasks = [
        {"annotations": [{"completed_by": 1, "lead_time": 12.5, "result": [{}]},
                         {"completed_by": 2, "lead_time": 7.0, "result": [{}]},
                         {"completed_by": 3, "was_cancelled": True, "lead_time": 99.0, "result": [{}]}]},
        {"annotations": [{"completed_by": {"id": 1}, "lead_time": None, "result": [{}]}]},
        {"annotations": []},
    ]
    eff = annotation_effort(tasks, simulated=False)
    assert eff == {"tasks": 3, "annotations": 3, "annotators": 2, "lead_time_s": 19.5,
                   "without_lead_time": 1, "simulated": False}
    assert annotation_effort([], simulated=True)["simulated"] is True


def test_evaluation_cache_notices_a_checkpoint_rewritten_in_place(tmp_path: Path) -> None:
    """A fine-tune redone into the same folder rewrites model.pth: the cached spec -> version map must
    not hand back the old version's confusions (the gate would judge the wrong model)."""
    import os

    from PIL import Image

    from ml_backend.imageio import write_mask
    from projects.evaluation.evaluate import evaluate_models

    img, mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(img)
    write_mask(mask, np.ones((4, 4), np.uint8))
    ckpt = tmp_path / "model.pth"
    loads: list[int] = []

    class Constant:
        def __init__(self, cls: int) -> None:
            self.cls, self.version = cls, f"const{cls}"

        def predict(self, images: list[np.ndarray], batch_size: int = 1) -> list[np.ndarray]:
            return [np.full(im.shape[:2], self.cls, np.uint8) for im in images]

    def loader(spec: ModelSpec) -> Constant:
        loads.append(1)
        return Constant(int(Path(spec.checkpoint).read_text()))

    models = [ModelEntry("f(1)", {"name": "x", "checkpoint": str(ckpt), "options": {}})]
    sets = [EvalSet("T(0)", ((img, mask),))]
    ckpt.write_text("1")
    first = evaluate_models(models, sets, C, tmp_path / "cache", loader=loader)
    assert first.miou("f(1)", "T(0)") == 1.0 and len(loads) == 1
    assert evaluate_models(models, sets, C, tmp_path / "cache", loader=loader).versions["f(1)"] == "const1"
    assert len(loads) == 1  # unchanged checkpoint: cached
    ckpt.write_text("0")
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = evaluate_models(models, sets, C, tmp_path / "cache", loader=loader)
    assert len(loads) == 2 and again.versions["f(1)"] == "const0" and again.miou("f(1)", "T(0)") == 0.0


def test_before_after_gallery_shows_the_served_model_and_marks_a_rejected_one() -> None:
    from projects.evaluation.evaluate import before_after_columns

    f = [ModelEntry(f"f({i})", {"name": "x"}, "target", i) for i in range(3)]
    # f(1) promoted, f(2) rejected: after = f(1); f(2) shown marked as rejected
    cols = before_after_columns(f, served=1)
    assert [(t, m.key) for t, m, _ in cols] == [
        ("before: f(0)", "f(0)"), ("after: f(1) (served)", "f(1)"),
        ("f(2): rejected by the gate, not served", "f(2)")]
    # the last one promoted: before/after only (positive control)
    assert [m.key for _, m, _ in before_after_columns(f, served=2)] == ["f(0)", "f(2)"]
    assert all("rejected" not in t for t, _, _ in before_after_columns(f, served=2))
    # nothing promoted: f(0) is what is served; the rejected f(2) never appears as "after"
    cols = before_after_columns(f, served=0)
    assert [m.key for _, m, _ in cols] == ["f(0)", "f(2)"]
    assert not any(t.startswith("after") for t, _, _ in cols)
    assert len({folder for _, _, folder in cols}) == len(cols)
