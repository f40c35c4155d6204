"""Pure tests of the ML backend's event filtering, coalescing, config and label-config handling."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from ml_backend.backend_config import BackendConfig
from ml_backend.errors import MadsegError
from ml_backend.jobs import (
    Coalescer,
    InProcessFinetuneQueue,
    WebhookPayloadError,
    decide,
    new_job_id,
)
from ml_backend.labelstudio.brush import label_map_results
from ml_backend.labelstudio.configs import (
    BrushControls,
    LabelConfigError,
    find_brush_controls,
    is_segmentation_config,
)
from ml_backend.model import drawn_classes
from ml_backend.modelspec import ModelSpec

SEG_CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="label" toName="image">'
    '<Label value="background" background="#000000"/><Label value="bird" background="#808000"/>'
    '<Label value="cat" background="#400000"/></BrushLabels></View>'
)
RATING_CONFIG = (
    '<View><Image name="image" value="$image"/><Image name="overlay" value="$overlay"/>'
    '<Choices name="rating" toName="image" choice="single" required="true">'
    '<Choice value="1 bad"/><Choice value="5 excellent"/></Choices></View>'
)


def _payload(action: str, config: str = SEG_CONFIG, **extra: object) -> dict:
    return {"action": action, "project": {"id": 7, "label_config": config, "token": "secret"}, **extra}


# -- event filtering ---------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "START_TRAINING"])
def test_training_actions_in_a_segmentation_project_train(action: str) -> None:
    d = decide(_payload(action, annotation={"id": 3, "result": []}))
    assert d.train and d.project_id == 7 and d.action == action


@pytest.mark.parametrize(
    "action", ["PROJECT_UPDATED", "ANNOTATION_DELETED", "TASKS_CREATED", "ANNOTATIONS_DELETED", "FOO"]
)
def test_other_actions_are_ignored(action: str) -> None:
    d = decide(_payload(action))
    assert not d.train and d.action == action


def test_annotations_in_a_rating_project_are_ignored() -> None:
    d = decide(_payload("ANNOTATION_CREATED", RATING_CONFIG, annotation={"id": 1}))
    assert not d.train and "not a segmentation" in d.reason


def test_skipped_annotation_is_ignored() -> None:
    d = decide(_payload("ANNOTATION_CREATED", annotation={"id": 1, "was_cancelled": True}))
    assert not d.train


def test_project_id_falls_back_to_annotation_or_task() -> None:
    assert decide({"action": "ANNOTATION_CREATED", "annotation": {"project": 4}}).project_id == 4
    assert decide({"action": "ANNOTATION_UPDATED", "task": {"project": "5"}}).project_id == 5
    assert decide({"action": "START_TRAINING", "project": {"id": 9}}).train


@pytest.mark.parametrize(
    "payload",
    [
        None, [], "ANNOTATION_CREATED", 3,
        {}, {"action": None}, {"action": 12}, {"action": ""},
        {"action": "ANNOTATION_CREATED"},
        {"action": "START_TRAINING", "project": {"id": "x"}},
        {"action": "START_TRAINING", "project": {"id": -2}},
        {"action": "START_TRAINING", "project": {"id": True}},
        {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": "garbage"},
    ],
)
def test_broken_payloads_raise_a_payload_error(payload: object) -> None:
    with pytest.raises(WebhookPayloadError):
        decide(payload)


def test_payload_error_does_not_echo_the_payload() -> None:
    with pytest.raises(WebhookPayloadError) as info:
        decide({"action": "START_TRAINING", "project": {"token": "supersecret"}})
    assert "supersecret" not in str(info.value)


def test_is_segmentation_config() -> None:
    assert is_segmentation_config(SEG_CONFIG)
    assert not is_segmentation_config(RATING_CONFIG)
    assert not is_segmentation_config("<View><BrushLabels")  # not XML


# -- coalescing --------------------------------------------------------------------------------


def test_coalescer_joins_pending_and_schedules_one_follow_up() -> None:
    c = Coalescer()
    a, new = c.offer(1, "a")
    assert (a, new) == ("a", True)
    assert c.offer(1, "b") == ("a", False)  # queued: coalesce
    assert c.offer(2, "x") == ("x", True)  # other project: independent
    c.start(1, "a")
    assert c.offer(1, "c") == ("c", True)  # running: exactly one follow-up
    assert c.offer(1, "d") == ("c", False)
    c.finish(1, "a")
    assert c.snapshot() == {"pending": {1: "c", 2: "x"}, "running": {}}


def test_job_ids_are_unique_within_a_second() -> None:
    ids = {new_job_id(3) for _ in range(1000)}
    assert len(ids) == 1000


def test_in_process_queue_coalesces_and_runs_one_job_at_a_time() -> None:
    """Events while a job is queued join it; an event while it runs makes exactly one follow-up."""
    started = threading.Event()
    release = threading.Event()
    active = []
    ran: list[tuple[str, int]] = []
    lock = threading.Lock()

    def runner(job_id: str, project_id: int, settings: dict) -> None:
        with lock:
            active.append(job_id)
            assert len(active) == 1, "two fine-tunes at once"
        started.set()
        release.wait(10)
        with lock:
            active.remove(job_id)
            ran.append((job_id, project_id))

    q = InProcessFinetuneQueue({"model_dir": "unused"}, runner=runner)
    first = q.submit(5)
    assert not first.coalesced
    assert started.wait(10)
    # the first job runs: the next events create one follow-up and then coalesce into it
    follow = q.submit(5)
    assert not follow.coalesced and follow.job_id != first.job_id
    for _ in range(5):
        again = q.submit(5)
        assert again.coalesced and again.job_id == follow.job_id
    assert q.describe()["running"] == {"5": first.job_id}
    assert q.describe()["pending"] == {"5": follow.job_id}
    release.set()
    assert q.wait_idle(10)
    assert ran == [(first.job_id, 5), (follow.job_id, 5)]
    assert [s for _, s in q.finished] == ["finished", "finished"]


def test_in_process_queue_survives_a_failing_job() -> None:
    calls = []

    def runner(job_id: str, project_id: int, settings: dict) -> None:
        calls.append(job_id)
        if len(calls) == 1:
            raise RuntimeError("boom")

    q = InProcessFinetuneQueue({}, runner=runner)
    q.submit(1)
    assert q.wait_idle(10)
    q.submit(1)
    assert q.wait_idle(10)
    assert [s for _, s in q.finished] == ["failed", "finished"]


# -- label config and brush results --------------------------------------------------------------


def test_brush_target_from_label_config() -> None:
    t = find_brush_controls(SEG_CONFIG)
    assert t == BrushControls("label", "image", "image", ("background", "bird", "cat"))
    with pytest.raises(LabelConfigError, match="BrushLabels"):
        find_brush_controls(RATING_CONFIG)


def test_drawn_classes_are_those_with_a_label() -> None:
    names = ("background", "aeroplane", "bird", "cat")
    assert drawn_classes(names, ("background", "bird", "cat")) == {0: "background", 2: "bird", 3: "cat"}
    assert drawn_classes(names, ("dog",)) == {}


def test_brush_results_one_per_present_class_and_decode_back() -> None:
    from ml_backend.labelstudio.rle import decode

    target = BrushControls("label", "image", "image", ("bird", "cat"))
    lm = np.zeros((5, 7), np.uint8)
    lm[1:3, 2:5] = 2
    lm[4, 6] = 3
    lm[0, 0] = 1  # aeroplane: not in the config, not drawn
    prob = np.full((5, 7), 0.5, np.float32)
    prob[lm == 2] = 0.9
    res = label_map_results(lm, {2: "bird", 3: "cat"}, target, prob)
    assert [r["value"]["brushlabels"] for r in res] == [["bird"], ["cat"]]
    for r, cls in zip(res, (2, 3), strict=True):
        assert (r["from_name"], r["to_name"], r["type"]) == ("label", "image", "brushlabels")
        assert (r["original_width"], r["original_height"]) == (7, 5)
        np.testing.assert_array_equal(decode(r["value"]["rle"], 5, 7) > 0, lm == cls)
    assert res[0]["score"] == pytest.approx(0.9)


# -- configuration -------------------------------------------------------------------------------


def test_config_from_env(tmp_path) -> None:
    env = {
        "MADSEG_MODEL": "espnetv2",
        "MADSEG_MODEL_OPTIONS": '{"scale": 0.5, "input_size": 256}',
        "MADSEG_MODEL_DIR": str(tmp_path / "m"),
        "MADSEG_TRAIN_PROJECTS": "3, 4",
        "MADSEG_FINETUNE_OPTIONS": '{"epochs": 1}',
        "BASIC_AUTH_USER": "alice-user",
        "BASIC_AUTH_PASS": "s3cret-pass",
    }
    cfg = BackendConfig.from_env(env)
    opts = {"scale": 0.5, "input_size": 256}
    assert cfg.target.to_dict() == {"name": "espnetv2", "checkpoint": None, "options": opts}
    assert cfg.job_settings()["target"] == {"name": "espnetv2", "checkpoint": None, "options": opts}
    assert cfg.train_projects == (3, 4) and cfg.redis_url is None
    assert cfg.basic_auth == ("alice-user", "s3cret-pass") and "s3cret" not in repr(cfg)
    settings = json.dumps(cfg.job_settings())  # what a queued job carries: no secrets
    assert "s3cret-pass" not in settings and "alice-user" not in settings
    assert cfg.job_settings()["finetune_options"] == {"epochs": 1}


@pytest.mark.parametrize(
    "env, match",
    [
        ({}, "MADSEG_MODEL"),
        ({"MADSEG_MODEL": "x", "MADSEG_MODEL_OPTIONS": "{bad"}, "MADSEG_MODEL_OPTIONS"),
        ({"MADSEG_MODEL": "x", "MADSEG_MODEL_OPTIONS": "[1]"}, "JSON object"),
        ({"MADSEG_MODEL": "x", "MADSEG_CHECKPOINT": "/nonexistent.pth"}, "not found"),
        ({"MADSEG_MODEL": "x", "MADSEG_TRAIN_PROJECTS": "1,abc"}, "MADSEG_TRAIN_PROJECTS"),
        ({"MADSEG_MODEL": "x", "MADSEG_BACKEND_WORKERS": "2"}, "REDIS_URL"),
        ({"MADSEG_MODEL": "x", "BASIC_AUTH_USER": "u"}, "BASIC_AUTH_PASS"),
        ({"MADSEG_MODEL": "x", "MADSEG_PREDICT_BATCH": "0"}, "at least 1"),
    ],
)
def test_bad_config_is_one_clear_error(env: dict, match: str) -> None:
    with pytest.raises(MadsegError, match=match):
        BackendConfig.from_env(env)


def test_a_burst_within_the_start_delay_becomes_one_job() -> None:
    runs: list[str] = []
    q = InProcessFinetuneQueue({"start_delay_s": 0.5}, runner=lambda j, p, s: runs.append(j))
    subs = [q.submit(8) for _ in range(4)]
    assert len({s.job_id for s in subs}) == 1 and [s.coalesced for s in subs] == [False, True, True, True]
    assert q.wait_idle(10)
    assert runs == [subs[0].job_id]


def test_config_from_the_demo_experiment(tmp_path, monkeypatch) -> None:
    """MADSEG_EXPERIMENT fills target, fine-tune settings (-> a valid FinetuneConfig), S(0), T(0)."""
    from ml_backend.jobs import finetune_config
    from ml_backend.shared import shared_dir
    from projects.backend_settings import prepare_backend_env
    from projects.experiment import load_experiment

    monkeypatch.chdir(tmp_path)
    toml = Path(__file__).resolve().parents[1] / "projects" / "templates" / "demo.toml"
    exp = load_experiment(toml)
    env = {"MADSEG_EXPERIMENT": str(toml), "MADSEG_MODEL_DIR": str(tmp_path)}
    settings = prepare_backend_env(env)  # what `madseg backend` does first: the experiment as data
    assert settings is not None and env["MADSEG_BACKEND_SETTINGS"] == str(settings)
    cfg = BackendConfig.from_env(env)
    assert cfg.target == exp.target.model_spec()
    assert cfg.replay_dir == (shared_dir() / "data" / "voc2012" / "train").resolve()
    assert cfg.replay_subset is None
    assert cfg.val_dir == (shared_dir() / "data" / "voc2012" / "val").resolve()
    assert cfg.val_subset == list(exp.t0.subset)
    ft = finetune_config(cfg.finetune_options)
    assert ft.epochs == exp.finetune.epochs and ft.lrs == exp.finetune.lrs
    # explicit variables win over the experiment
    cfg2 = BackendConfig.from_env({**env, "MADSEG_FINETUNE_OPTIONS": '{"epochs": 1}'})
    assert finetune_config(cfg2.finetune_options).epochs == 1


def test_backend_reads_the_experiment_settings_once_as_data(tmp_path, monkeypatch) -> None:
    """BackendConfig.from_env reads and checks the settings file once (ExperimentSettings) and takes
    every experiment value from its fields: target, fine-tune settings, dir, pool and mask folders."""
    from ml_backend.experiment_settings import ExperimentSettings

    (tmp_path / "pool").mkdir()
    s = ExperimentSettings(target={"name": "espnetv2", "checkpoint": None, "options": {"scale": 0.5}},
                           finetune={"preset": "paper", "lrs": [2e-5]}, dir=str(tmp_path),
                           pool_dirs=(str(tmp_path / "pool"),), ground_truth=(str(tmp_path / "gt"),))
    s.write(tmp_path / "s.json")
    calls = []
    real = ExperimentSettings.from_json.__func__  # type: ignore[attr-defined]

    def counting(cls: type, obj: object, source: str = "backend settings") -> ExperimentSettings:
        calls.append(source)
        return real(cls, obj, source)

    monkeypatch.setattr(ExperimentSettings, "from_json", classmethod(counting))
    cfg = BackendConfig.from_env({"MADSEG_BACKEND_SETTINGS": str(tmp_path / "s.json"),
                                  "MADSEG_MODEL_DIR": str(tmp_path / "m")})
    assert len(calls) == 1
    assert cfg.target == s.target and cfg.finetune_options == s.finetune
    assert cfg.experiment_dir == tmp_path.resolve() and cfg.local_dirs == ((tmp_path / "pool").resolve(),)
    assert cfg.ground_truth_dirs == ((tmp_path / "gt").resolve(),)
    from ml_backend.jobs import finetune_config

    assert finetune_config(cfg.finetune_options).lrs == (2e-5,)
    # no settings file and no MADSEG_MODEL: nothing to serve
    with pytest.raises(MadsegError, match="no target model configured"):
        BackendConfig.from_env({"MADSEG_MODEL_DIR": str(tmp_path / "m")})


def test_backend_does_not_read_the_experiment_toml_itself(tmp_path) -> None:
    """Without the settings file, MADSEG_EXPERIMENT alone is a clear error (the TOML is projects')."""
    toml = Path(__file__).resolve().parents[1] / "projects" / "templates" / "demo.toml"
    with pytest.raises(MadsegError, match="MADSEG_BACKEND_SETTINGS"):
        BackendConfig.from_env({"MADSEG_EXPERIMENT": str(toml), "MADSEG_MODEL_DIR": str(tmp_path)})


def test_experiment_settings_file_round_trip_and_bad_files(tmp_path) -> None:
    from ml_backend.experiment_settings import ExperimentSettings

    s = ExperimentSettings(target={"name": "espnetv2", "checkpoint": None, "options": {"scale": 0.5}},
                           finetune={"epochs": 2}, val=None,
                           pool_dirs=(str(tmp_path),))
    assert ExperimentSettings.read(s.write(tmp_path / "s.json")) == s
    cfg = BackendConfig.from_env({"MADSEG_BACKEND_SETTINGS": str(tmp_path / "s.json"),
                                  "MADSEG_MODEL_DIR": str(tmp_path)})
    assert cfg.target.options == {"scale": 0.5} and cfg.finetune_options == {"epochs": 2}
    # on disk the target stays the {name, checkpoint, options} object; read once into a ModelSpec
    on_disk = json.loads((tmp_path / "s.json").read_text())
    assert on_disk["target"] == {"name": "espnetv2", "checkpoint": None, "options": {"scale": 0.5}}
    assert isinstance(cfg.target, ModelSpec) and isinstance(s.target, ModelSpec)
    (tmp_path / "bad.json").write_text('{"target": {"name": "espnetv2", "checkpoint": 5}}')
    with pytest.raises(MadsegError, match="'target': checkpoint must be a file path"):
        ExperimentSettings.read(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"target": {"name": "espnetv2"}, "epochz": 1}')
    with pytest.raises(MadsegError, match="unknown key"):
        ExperimentSettings.read(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(MadsegError, match="not valid JSON"):
        ExperimentSettings.read(tmp_path / "bad.json")
    with pytest.raises(MadsegError, match="file not found"):
        ExperimentSettings.read(tmp_path / "missing.json")


def test_unknown_finetune_setting_is_a_clear_error() -> None:
    from ml_backend.jobs import finetune_config

    with pytest.raises(MadsegError, match="unknown fine-tune setting"):
        finetune_config({"epochz": 3})
    with pytest.raises(MadsegError, match="epochs"):
        finetune_config({"epochs": 0})


def test_backend_finetune_config_starts_from_the_preset() -> None:
    from ml_backend.finetune import PRESETS
    from ml_backend.jobs import finetune_config

    assert finetune_config({}) == PRESETS["demo"]
    paper = finetune_config({"preset": "paper"})
    assert paper.epochs == PRESETS["paper"].epochs and paper.lrs == PRESETS["paper"].lrs
    assert finetune_config({"preset": "paper", "lrs": [1e-5]}).lrs == (1e-5,)
    with pytest.raises(MadsegError, match="unknown preset 'fast'"):
        finetune_config({"preset": "fast"})


def test_backend_finetune_config_reads_old_lr_names_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """``lrs`` is FinetuneConfig's name (the experiment's too); ``lr_grid`` and ``lr`` still read."""
    from ml_backend.jobs import finetune_config

    with caplog.at_level("WARNING", logger="ml_backend.jobs"):
        assert finetune_config({"preset": "paper", "lrs": [1e-5]}).lrs == (1e-5,)
        assert not caplog.records
        assert finetune_config({"preset": "paper", "lr_grid": [1e-5]}).lrs == (1e-5,)
        assert finetune_config({"lr": 2e-5}).lrs == (2e-5,)
    assert [("lr_grid" in r.getMessage(), "lr'" in r.getMessage()) for r in caplog.records] == [
        (True, False), (False, True)]
    assert all("deprecated" in r.getMessage() and "'lrs'" in r.getMessage() for r in caplog.records)
    with pytest.raises(MadsegError, match="both 'lr_grid' and 'lrs'"):
        finetune_config({"lr_grid": [1e-5], "lrs": [1e-5]})
