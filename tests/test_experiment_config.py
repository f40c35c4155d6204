"""The experiment config (projects.experiment) and the per-round state files (projects.state)."""

from __future__ import annotations

import json
import multiprocessing
import os
import textwrap
from pathlib import Path

import pytest

from ml_backend.classes import VOC_CLASSES
from ml_backend.errors import MadsegError
from projects.experiment import FINETUNE_PRESETS, load_experiment
from projects.state import RoundState, experiment_lock, list_rounds, round_dir

TEMPLATE = Path(__file__).resolve().parents[1] / "projects" / "templates" / "demo.toml"


def _layout(root: Path) -> None:
    for d in ("pool/a", "pool/b", "labelled/images", "labelled/masks", "gt", "ckpt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "ckpt" / "target.pth").write_bytes(b"x")
    (root / "ckpt" / "comp.pth").write_bytes(b"x")


BASE = """
[experiment]
name = "t"
dir = "runs/t"

[pool]
folders = ["pool/a", "pool/b"]

[target]
name = "espnetv2"
checkpoint = "ckpt/target.pth"
options = { scale = 2.0, input_size = 384 }

[[competitors]]
key = "comp"
name = "dicenet"
checkpoint = "ckpt/comp.pth"

[s0]
root = "labelled"

[t0]
root = "labelled"

[selection]
n3 = 2
n4 = 5
"""


def _write(tmp_path: Path, text: str = BASE, name: str = "experiment.toml") -> Path:
    _layout(tmp_path)
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


# ------------------------------------------------------------------------------------------------
# loading


def test_minimal_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_experiment(_write(tmp_path))
    assert cfg.name == "t"
    assert cfg.dir == tmp_path.resolve() / "runs" / "t"
    assert cfg.pool.folders == (tmp_path.resolve() / "pool" / "a", tmp_path.resolve() / "pool" / "b")
    assert cfg.classes == VOC_CLASSES and cfg.num_classes == 21 and cfg.seed == 0
    assert cfg.target.key == "espnetv2-s2.0-384"
    assert cfg.target.model_spec().to_dict() == {
        "name": "espnetv2", "checkpoint": str(tmp_path.resolve() / "ckpt" / "target.pth"),
        "options": {"scale": 2.0, "input_size": 384},
    }
    assert [m.key for m in cfg.models] == ["espnetv2-s2.0-384", "comp"]
    assert cfg.model("comp").name == "dicenet"
    assert cfg.s0.subset == "half0" and cfg.t0.subset == "half1"
    sel = cfg.selection
    assert (sel.n3, sel.n4, sel.test_size, sel.max_per_class, sel.bounds, sel.metric, sel.working_size,
            sel.baseline) == (2, 5, 30, 4, "auto", "miou", None, "entropy")
    assert (sel.bounds_method, sel.min_count, sel.order, sel.rating_budget) == ("quartiles", 5, "failures", 0)
    ft = cfg.finetune
    assert ft.preset == "demo" and ft.batch_size == 2 and ft.replay is True
    ls = cfg.label_studio
    assert (ls.url, ls.api_key_env, ls.raters_per_task, ls.backend_url) == (
        "http://127.0.0.1:8080", "LABEL_STUDIO_API_KEY", 3, None)
    assert cfg.oracle.enabled is False and cfg.oracle.thresholds == (0.2, 0.4, 0.6, 0.8)
    assert cfg.document_root() == tmp_path.resolve()
    json.dumps(cfg.to_dict())  # serialisable


def test_presets_overrides_and_explicit_keys(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE + "\n[finetune]\nepochs = 3\n")
    cfg = load_experiment(p)
    assert cfg.finetune.epochs == 3 and cfg.finetune.lrs == FINETUNE_PRESETS["demo"]["lrs"]
    paper = load_experiment(_write(tmp_path), preset="paper")
    pf = paper.finetune
    assert (pf.epochs, pf.batch_size, pf.lrs) == (80, 2, (1e-5, 5e-5, 1e-4))
    o = load_experiment(_write(tmp_path), overrides={"finetune.epochs": 1, "selection.n3": 7,
                                                     "oracle.noise": 0.0})
    assert (o.finetune.epochs, o.selection.n3, o.oracle.noise) == (1, 7, 0.0)
    with pytest.raises(MadsegError, match="SECTION.KEY"):
        load_experiment(_write(tmp_path), overrides={"epochs": 1})
    with pytest.raises(MadsegError, match=r"\[finetune\] epochs must be a positive integer, got 0"):
        load_experiment(_write(tmp_path), overrides={"finetune.epochs": 0})


def test_lrs_is_the_name_and_lr_grid_an_old_alias(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``[finetune] lrs`` is FinetuneConfig's name; the old ``lr_grid`` still reads, with one warning line."""
    new = load_experiment(_write(tmp_path, BASE + "\n[finetune]\nlrs = [2e-5, 4e-5]\n"))
    assert new.finetune.lrs == (2e-5, 4e-5) and new.finetune.to_config().lrs == (2e-5, 4e-5)
    assert new.finetune.to_dict()["lrs"] == [2e-5, 4e-5] and "lr_grid" not in new.finetune.to_dict()
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    with caplog.at_level("WARNING", logger="projects.experiment"):
        old = load_experiment(_write(tmp_path, BASE + "\n[finetune]\nlr_grid = [2e-5, 4e-5]\n"))
    assert old.finetune == new.finetune
    (warn,) = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert "lr_grid" in warn.getMessage() and "lrs" in warn.getMessage() and "\n" not in warn.getMessage()
    # an override of the new name replaces the old one from the file
    o = load_experiment(_write(tmp_path, BASE + "\n[finetune]\nlr_grid = [2e-5]\n"),
                        overrides={"finetune.lrs": [7e-5]})
    assert o.finetune.lrs == (7e-5,)
    with pytest.raises(MadsegError, match=r"\[finetune\] gives both lr_grid and lrs"):
        load_experiment(_write(tmp_path, BASE + "\n[finetune]\nlr_grid = [1e-5]\nlrs = [1e-5]\n"))
    with pytest.raises(MadsegError, match=r"\[finetune\] lrs must be a non-empty list"):
        load_experiment(_write(tmp_path, BASE + "\n[finetune]\nlr_grid = []\n"))


def test_the_experiment_and_the_backend_build_the_same_finetune_config(tmp_path: Path) -> None:
    """One vocabulary: the experiment's [finetune] names are FinetuneConfig's, so the rounds
    (FinetuneSettings.to_config) and the backend's jobs (settings file -> jobs.finetune_config) build
    the same config from them."""
    import dataclasses

    from ml_backend.finetune_config import FinetuneConfig
    from ml_backend.jobs import finetune_config
    from projects.backend_settings import backend_settings

    text = BASE + "\n[finetune]\npreset = \"paper\"\nlrs = [2e-5]\nsteps = 7\nencoder_lr_mult = 0.5\n"
    exp = load_experiment(_write(tmp_path, text))
    names = set(exp.finetune.to_dict()) - {"preset", "replay"}
    assert names <= {f.name for f in dataclasses.fields(FinetuneConfig)}
    rounds = exp.finetune.to_config(seed=0)
    assert (rounds.lrs, rounds.steps, rounds.encoder_lr_mult, rounds.epochs) == ((2e-5,), 7, 0.5, 80)
    assert finetune_config(backend_settings(exp).finetune) == rounds
    # the LwF variant and the seed are the rounds' own additions
    assert exp.finetune.to_config(seed=3, lwf=True).lwf_weight == 1.0
    assert exp.finetune.to_config(seed=3).seed == 3


def test_placeholders_and_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _layout(tmp_path)
    shared = tmp_path / "shared_here"
    (shared / "data").mkdir(parents=True)
    monkeypatch.setenv("MADSEG_SHARED", str(shared))
    monkeypatch.setenv("MY_POOL", str(tmp_path / "pool"))
    text = _replace(BASE, 'folders = ["pool/a", "pool/b"]',
                    'folders = ["${MY_POOL}/a", "$MY_POOL/b", "{shared}/data"]')
    text = _replace(text, 'dir = "runs/t"', 'dir = "${MADSEG_SHARED}/runs"')
    cfg = load_experiment(_write(tmp_path, text))
    assert cfg.pool.folders == (tmp_path / "pool" / "a", tmp_path / "pool" / "b", shared.resolve() / "data")
    assert cfg.dir == shared / "runs"
    # ${MADSEG_SHARED} falls back to shared_dir() when the variable is unset
    monkeypatch.delenv("MADSEG_SHARED")
    from ml_backend.shared import shared_dir

    real = shared_dir(required=False)
    if real.is_dir():
        text2 = _replace(BASE, 'dir = "runs/t"', 'dir = "${MADSEG_SHARED}/x"')
        cfg = load_experiment(_write(tmp_path, text2))
        assert cfg.dir == real / "x"
    monkeypatch.delenv("MY_POOL")
    with pytest.raises(MadsegError, match=r"experiment.toml: \[pool\] folders\[0\] uses \$\{MY_POOL\}"):
        load_experiment(_write(tmp_path, text))


def test_demo_template_loads_against_shared() -> None:
    from ml_backend.shared import shared_dir

    shared = shared_dir()
    cfg = load_experiment(TEMPLATE)
    assert cfg.name == "demo" and cfg.oracle.enabled
    assert cfg.pool.folders == (shared / "data" / "coco_voc" / "images", shared / "data" / "unlabelled")
    assert cfg.target.checkpoint == str(shared / "models" / "espnetv2" / "espnetv2_s_2.0_pascal_384x384.pth")
    assert [c.name for c in cfg.competitors] == ["dicenet", "tflite", "espnetv2"]
    assert len({m.key for m in cfg.models}) == 4
    assert cfg.s0.root == shared / "data" / "voc2012" / "train" and cfg.s0.subset is None
    assert cfg.t0.root == shared / "data" / "voc2012" / "val" and len(cfg.t0.subset) == 21
    assert len(cfg.s0.open()) == 330 and len(cfg.t0.open()) == 21
    assert cfg.oracle.gt == (shared / "data" / "coco_voc" / "masks",)
    assert cfg.selection.test_size == 30 and cfg.selection.max_per_class == 4
    assert cfg.label_studio.raters_per_task == 3
    assert cfg.finetune.preset == "demo"
    assert load_experiment(TEMPLATE, preset="paper").finetune.epochs == 80
    assert cfg.dir == Path.cwd() / "runs" / "demo"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("n3 = 2", "n3 = -1", r"experiment.toml: \[selection\] n3 must be a positive integer, got -1"),
        ("n3 = 2", "n3 = 2.5", r"\[selection\] n3 must be a positive integer, got 2.5"),
        ("n3 = 2", "n3 = true", r"\[selection\] n3 must be a positive integer, got True"),
        ("n4 = 5\n", "", r"\[selection\] n4 is required"),
        ("n3 = 2", "n3 = 2\nbounds = \"median\"",
         r"\[selection\] bounds must be one of 'auto', 's0', 'pool', 'none'"),
        ("n3 = 2", "n3 = 2\norder = \"best\"", r"\[selection\] order must be one of 'failures', 'rank'"),
        ("n3 = 2", "n3 = 2\nrating_budget = -3", r"\[selection\] rating_budget must be an integer >= 0"),
        ("n3 = 2", "n3 = 2\nworking_size = [1, 2, 3]",
         r"working_size must be a positive integer or \[height, width\]"),
        ("n3 = 2", "n3 = 2\nn_3 = 4", r"\[selection\] unknown key 'n_3'; known keys: n3, n4"),
        ('name = "t"', 'name = "t"\nclasses = ["background", "a", "a"]',
         r"classes has duplicate names \['a'\]"),
        ('name = "t"', 'name = "t"\nclasses = ["background"]', r"classes must be a list of at least 2"),
        ('folders = ["pool/a", "pool/b"]', 'folders = ["pool/missing"]',
         r"\[pool\] folders\[0\]: folder .*missing does not exist"),
        ('folders = ["pool/a", "pool/b"]', "folders = []", r"\[pool\] needs at least one entry"),
        ('checkpoint = "ckpt/comp.pth"', 'checkpoint = "ckpt/nope.pth"',
         r"\[\[competitors\]\] #1 checkpoint: .*nope.pth does not exist"),
        ('key = "comp"', 'key = "espnetv2-s2.0-384"', r"model key 'espnetv2-s2.0-384' is used twice"),
        ("options = { scale = 2.0, input_size = 384 }", 'options = "fast"',
         r"\[target\] options must be a table"),
        ('[s0]\nroot = "labelled"', '[s0]\nroot = "labelled"\nsubset = "half2"',
         r"\[s0\] subset must be \"half0\""),
        ('[t0]\nroot = "labelled"', '[t0]\nroot = "pool"', r"\[t0\] root: .*pool has no images/ folder"),
        ("[selection]", "[selectoin]", r"unknown section \[selectoin\]"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(MadsegError, match=message):
        load_experiment(_write(tmp_path, _replace(BASE, old, new)))


def test_more_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MadsegError, match="experiment config not found"):
        load_experiment(tmp_path / "nope.toml")
    with pytest.raises(MadsegError, match="not valid TOML"):
        load_experiment(_write(tmp_path, "[experiment\nname=1"))
    with pytest.raises(MadsegError, match=r"missing section \[selection\]"):
        load_experiment(_write(tmp_path, BASE.split("[selection]")[0]))
    with pytest.raises(MadsegError, match="at least one \\[\\[competitors\\]\\]"):
        block = '[[competitors]]\nkey = "comp"\nname = "dicenet"\ncheckpoint = "ckpt/comp.pth"\n'
        load_experiment(_write(tmp_path, _replace(BASE, block, "")))
    bad_oracle = BASE + "\n[oracle]\nenabled = true\n"
    with pytest.raises(MadsegError, match=r"\[oracle\] gt must list at least one folder"):
        load_experiment(_write(tmp_path, bad_oracle))
    with pytest.raises(MadsegError, match=r"\[oracle\] thresholds must be 4 increasing numbers"):
        load_experiment(_write(tmp_path, BASE + '\n[oracle]\nthresholds = [0.2, 0.2, 0.6, 0.8]\n'))
    with pytest.raises(MadsegError, match=r"\[label_studio\] url must be an http\(s\) URL"):
        load_experiment(_write(tmp_path, BASE + '\n[label_studio]\nurl = "localhost:8080"\n'))
    with pytest.raises(MadsegError, match=r"api_key_env must be the NAME of an environment variable"):
        load_experiment(_write(tmp_path, BASE + '\n[label_studio]\napi_key_env = "abc123-secret"\n'))
    with pytest.raises(MadsegError, match=r"not inside a subfolder of \[label_studio\] document_root"):
        load_experiment(_write(tmp_path, BASE + '\n[label_studio]\ndocument_root = "pool/a"\n'))
    # settings-only reading skips the existence checks
    text = _replace(BASE, 'folders = ["pool/a", "pool/b"]', 'folders = ["elsewhere"]')
    assert load_experiment(_write(tmp_path, text), check_paths=False).pool.folders[0].name == "elsewhere"
    # the API key comes from the named variable
    cfg = load_experiment(_write(tmp_path, BASE + '\n[label_studio]\napi_key_env = "MADSEG_TEST_KEY"\n'))
    monkeypatch.delenv("MADSEG_TEST_KEY", raising=False)
    with pytest.raises(MadsegError, match="environment variable MADSEG_TEST_KEY is not set"):
        cfg.label_studio.api_key()
    monkeypatch.setenv("MADSEG_TEST_KEY", "tok")
    assert cfg.label_studio.api_key() == "tok"


# ------------------------------------------------------------------------------------------------
# round state


def test_round_state_mark_resume_and_reset(tmp_path: Path) -> None:
    st = RoundState.load(tmp_path, 1)
    assert not st.done("score") and st.done_stages() == []
    assert not st.path.exists()  # loading an empty state writes nothing
    st.begin("score")
    assert not RoundState.load(tmp_path, 1).done("score")  # running is not done
    st.mark("score", store=tmp_path / "store", images=12)
    st.mark("select", candidates="c.jsonl")
    again = RoundState.load(tmp_path, 1)
    assert again.done("score") and again.done("select") and again.done_stages() == ["score", "select"]
    assert again.outputs("score") == {"store": str(tmp_path / "store"), "images": 12}
    rec = again.stages["score"]
    assert rec["seconds"] >= 0 and rec["started_at"] <= rec["finished_at"]
    with pytest.raises(MadsegError, match="stage 'finetune' of round 1 has not finished"):
        again.outputs("finetune")
    again.reset("select")
    assert not RoundState.load(tmp_path, 1).done("select")
    assert round_dir(tmp_path, 1) == tmp_path / "round-1" == again.dir
    RoundState.load(tmp_path, 0).mark("x")
    assert list_rounds(tmp_path) == [0, 1]
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        again.mark("bad", obj=object())
    with pytest.raises(ValueError, match="bad stage name"):
        again.mark("no spaces")
    with pytest.raises(MadsegError, match="round number"):
        round_dir(tmp_path, -1)


def test_round_state_corrupt_file_is_reported_not_overwritten(tmp_path: Path) -> None:
    p = round_dir(tmp_path, 2) / "state.json"
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    with pytest.raises(MadsegError, match=r"round-2/state.json: unreadable round state"):
        RoundState.load(tmp_path, 2)
    p.write_text(json.dumps({"version": 1, "round": 3, "stages": {}}))
    with pytest.raises(MadsegError, match="not a madseg round-2 state file"):
        RoundState.load(tmp_path, 2)


def _try_lock(exp_dir: str, q: multiprocessing.Queue) -> None:  # runs in a child process
    try:
        with experiment_lock(exp_dir):
            q.put("locked")
    except MadsegError as exc:
        q.put(str(exc))


def test_experiment_lock_excludes_a_second_process(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with experiment_lock(tmp_path):
        q = ctx.Queue()
        p = ctx.Process(target=_try_lock, args=(str(tmp_path), q))
        p.start()
        p.join(30)
        msg = q.get(timeout=5)
        assert f"pid {os.getpid()}" in msg and "another madseg process" in msg
    q = ctx.Queue()
    p = ctx.Process(target=_try_lock, args=(str(tmp_path), q))
    p.start()
    p.join(30)
    assert q.get(timeout=5) == "locked"


def test_selection_bounds_rule_and_the_paper_rule_one_setting_away(tmp_path: Path) -> None:
    text = _replace(BASE, "n3 = 2", 'n3 = 2\nbounds = "s0"\nrating_budget = 40\norder = "rank"')
    sel = load_experiment(_write(tmp_path, text)).selection
    assert (sel.bounds, sel.bounds_method, sel.rating_budget, sel.order) == ("s0", "quartiles", 40, "rank")
    # the key's earlier values (the S(0) statistic) still mean the S(0) rule with that statistic
    sel = load_experiment(_write(tmp_path, _replace(BASE, "n3 = 2", 'n3 = 2\nbounds = "mean_std"'))).selection
    assert (sel.bounds, sel.bounds_method) == ("s0", "mean_std")
    assert sel.to_dict()["bounds"] == "s0" and sel.to_dict()["min_count"] == 5
