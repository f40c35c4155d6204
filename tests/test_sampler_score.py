"""Integration: scoring real shared images with two real shared models (ESPNetv2 s=0.5 @256 as the
target, the TFLite DeepLabV3 as the competitor), then selecting from the store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ml_backend.imageio import read_rgb
from ml_backend.shared import shared_dir
from ml_backend.zoo import ModelSpec
from projects.cli import main as madseg_main
from sampler import candidates as cand
from sampler import store as S
from sampler.metrics import map_distance
from sampler.score import score_pool
from tests.experiments import write_experiment_toml
from tests.test_sampler_pool import BAD, CONVERTED, make_pool

pytestmark = pytest.mark.slow

TARGET = "espnetv2,scale=0.5,input_size=256"
COMPETITOR = "tflite"


@pytest.fixture(scope="module")
def models():
    from ml_backend.zoo import load_model_spec

    target = load_model_spec(ModelSpec.parse(TARGET), "cpu")
    return target, load_model_spec(ModelSpec.parse(COMPETITOR), "cpu")


@pytest.fixture(scope="module")
def pool_list(tmp_path_factory) -> Path:
    data = shared_dir() / "data"
    imgs = sorted((data / "coco_voc" / "images").glob("*.jpg"))[:6] + sorted(
        (data / "unlabelled" / "jetson").glob("*.jpg"))[:2]
    lst = tmp_path_factory.mktemp("pool") / "pool.txt"
    lst.write_text("\n".join(str(p) for p in imgs) + "\n")
    return lst


@pytest.fixture(scope="module")
def scored(models, pool_list, tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "s"
    target, comp = models
    stats = score_pool([pool_list], target, [comp], store, batch_size=4, workers=2, progress=False)
    return store, stats


def test_first_run_scores_every_image_with_every_model(scored, models):
    store, stats = scored
    target, comp = models
    assert stats.images == 8 and stats.paths == 8 and stats.bad == 0 and stats.duplicates == 0
    assert stats.inferred == {target.version: 8, comp.version: 8}
    assert stats.distances == 8
    meta = S.ScoreStore(store, writer_rank=None).read_meta()
    assert meta.resolution == target.input_size == (256, 256)
    ids, areas, ent = S.read_areas(store, target.version)
    assert ids.shape == (8,) and areas.shape == (8, 21)
    assert np.allclose(areas.sum(1), 1.0, atol=1e-5)
    assert (ent > 0).all() and (ent < np.log(21)).all()
    _, c_areas, c_ent = S.read_areas(store, comp.version)
    assert np.allclose(c_areas.sum(1), 1.0, atol=1e-5)
    assert np.isnan(c_ent).all()  # the entropy is kept for the target role only


def test_stored_maps_areas_and_distances_match_direct_computation(scored, models):
    store, _ = scored
    target, comp = models
    ids, t_areas, t_ent = S.read_areas(store, target.version)
    d_ids, d_miou = S.read_distances(store, target.version, comp.version, "miou")
    _, d_pa = S.read_distances(store, target.version, comp.version, "pixel_accuracy")
    assert d_ids.tolist() == ids.tolist()
    for k, info in enumerate(S.iter_images(store)):
        assert info.image_id == ids[k]
        tmap = S.read_label_map(store, target.version, info.image_id)
        cmap = S.read_label_map(store, comp.version, info.image_id)
        assert tmap.shape == cmap.shape == (256, 256)
        assert d_miou[k] == pytest.approx(map_distance(tmap, cmap, 21, "miou"), abs=1e-9)
        assert d_pa[k] == pytest.approx(map_distance(tmap, cmap, 21, "pixel_accuracy"), abs=1e-9)
        counts = np.bincount(tmap.reshape(-1), minlength=21) / tmap.size
        assert np.allclose(t_areas[k], counts, atol=1e-6)
        if k < 2:  # re-run both models directly on the decoded image
            rgb = read_rgb(info.path)
            assert (info.height, info.width) == rgb.shape[:2]
            with torch.inference_mode():
                tp = target.forward(target.preprocessor()(rgb)[None])
                cp = comp.forward(comp.preprocessor()(rgb)[None])  # 513x513: arg-max, then nearest
                clab = F.interpolate(cp.argmax(1, keepdim=True).float(), (256, 256), mode="nearest-exact")
            assert (tp.argmax(1)[0].numpy() == tmap).mean() > 0.999
            assert (clab[0, 0].numpy() == cmap).mean() > 0.999
            ent = torch.special.entr(tp).sum(1).mean().item()
            assert t_ent[k] == pytest.approx(ent, rel=1e-3)


def test_rerun_does_nothing_new(scored, models, pool_list):
    store, _ = scored
    target, comp = models
    stats = score_pool([pool_list], target, [comp], store, batch_size=4, workers=1, progress=False)
    assert stats.inferred == {} and stats.distances == 0
    assert stats.already_done == 8 and stats.hashed == 0  # unchanged files are not even re-read


def test_new_target_version_runs_only_the_target_and_distances(scored, models, pool_list, tmp_path):
    store, _ = scored
    target, comp = models
    sd = torch.load(target.checkpoint, map_location="cpu")
    key = [k for k, v in sd.items() if v.dtype.is_floating_point][-1]
    sd[key] = sd[key] + 0.05
    ckpt = tmp_path / "finetuned.pth"
    torch.save(sd, ckpt)
    new = ModelSpec.parse(f"espnetv2,checkpoint={ckpt},scale=0.5,input_size=256")
    stats = score_pool([pool_list], new, [comp], store, batch_size=4, workers=2, progress=False)
    assert len(stats.inferred) == 1
    (new_version, n), = stats.inferred.items()
    assert new_version not in (target.version, comp.version) and n == 8
    assert stats.distances == 8
    with sqlite3.connect(S.ScoreStore(store, writer_rank=None).shard_paths()[0]) as conn:
        per_model = dict(conn.execute("SELECT model_version, COUNT(*) FROM areas GROUP BY model_version"))
    assert per_model == {target.version: 8, comp.version: 8, new_version: 8}
    # selection now defaults to the latest run (the new target)
    inp = cand.load_selection_inputs(store)
    assert inp.target_version == new_version and inp.competitor_versions == [comp.version]


def test_select_cli_writes_candidates_and_summary(scored, models, tmp_path, capsys):
    store, _ = scored
    target, comp = models
    out = tmp_path / "cand.jsonl"
    rc = madseg_main([
        "select", "--store", str(store), "--target-version", target.version, "--competitor-version",
        comp.version, "--n3", "2", "--bounds-from", str(shared_dir() / "data" / "voc_samples"),
        "--min-occurrences", "2", "--out", str(out),
    ])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines, "MAD selected nothing"
    assert [c["rank"] for c in lines] == list(range(1, len(lines) + 1))  # the raters' order
    for c in lines:
        assert Path(c["path"]).is_file() and len(c["id"]) == 32
        assert [s["rank"] for s in c["selections"]] == sorted(s["rank"] for s in c["selections"])
        assert {s["partition"] for s in c["selections"]} <= {"target", "competitor"}
        assert all(s["competitor"] == "tflite" for s in c["selections"])
    summary = json.loads((tmp_path / "cand.summary.json").read_text())
    assert summary["selected"] == len(lines) and summary["pool_size"] == 8
    n_sel = sum(len(c["selections"]) for c in lines)
    assert sum(sum(v.values()) for v in summary["counts"].values()) == n_sel
    assert summary["chosen_by_several"] == sum(1 for c in lines if len(c["selections"]) > 1)
    assert "|M| =" in capsys.readouterr().out
    # the Python API gives the same selection
    bounds = np.array([summary["bounds"][k] for k in summary["bounds"]])
    api = cand.select_candidates(store, target.version, [comp.version], bounds, n3=2)
    assert [c.to_dict() for c in api] == lines
    rule = summary["bounds_rule"]
    assert rule["rule"] == "auto" and rule["min_count"] == 2 and sum(rule["counts"].values()) == 20
    assert summary["m_size"] == len(lines) and summary["rating_budget"] == 0
    # the paper's order (best rank first) and a rating budget, one option away
    o = tmp_path / "rank.jsonl"
    assert madseg_main(["select", "--store", str(store), "--target-version", target.version,
                        "--competitor-version", comp.version, "--n3", "2", "--bounds-from",
                        str(shared_dir() / "data" / "voc_samples"), "--min-occurrences", "2",
                        "--order", "rank", "--budget", "3", "--out", str(o)]) == 0
    ranked = [json.loads(x) for x in o.read_text().splitlines()]
    assert len(ranked) == 3 and {c["id"] for c in ranked} <= {c["id"] for c in lines}
    assert [c["best_rank"] for c in ranked] == sorted(c["best_rank"] for c in ranked)
    assert json.loads((tmp_path / "rank.summary.json").read_text())["m_size"] == len(lines)
    for method in ("entropy", "random"):
        o = tmp_path / f"{method}.jsonl"
        assert madseg_main(["select", "--store", str(store), "--method", method, "--n", "3",
                            "--target-version", target.version, "--out", str(o)]) == 0
        assert len(o.read_text().splitlines()) == 3


def test_bad_images_duplicates_and_urls_are_reported_not_fatal(models, tmp_path):
    import functools
    import http.server
    import threading

    from ml_backend.zoo import load_model

    target = models[0]
    comp = load_model("espnetv2", scale=1.0, input_size=256, device="cpu")  # cheaper than the TFLite model
    files = make_pool(tmp_path / "pool")
    www = tmp_path / "www"
    www.mkdir()
    (www / "remote.png").write_bytes(files["palette"].read_bytes())  # same content as a local file
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        lst = tmp_path / "urls.txt"
        lst.write_text(f"{base}/remote.png\n{base}/missing.png\n")
        store = tmp_path / "store"
        stats = score_pool([tmp_path / "pool", lst], target, [comp], store, batch_size=4, workers=2,
                           progress=False)
    finally:
        srv.shutdown()
        srv.server_close()
    good = len(("rgb_jpg", "rgb_webp", "rgb_bmp")) + len(CONVERTED)
    assert stats.inferred == {target.version: good, comp.version: good}
    assert stats.bad == len(BAD) and stats.converted == len(CONVERTED)
    assert stats.duplicates == 2 and stats.unreadable == 2  # zero-byte file + HTTP 404
    rows = [line.split("\t") for line in (store / "pool_report.tsv").read_text().splitlines()[1:]]
    by_path = {r[1]: (r[0], r[2]) for r in rows}
    for kind in BAD:
        assert by_path[str(files[kind])][0] == "bad", kind
    for kind, mode in CONVERTED.items():
        assert by_path[str(files[kind])] == ("converted", f"converted from {mode} to RGB")
    assert by_path[str(files["zero"])][0] == "unreadable" and "0 bytes" in by_path[str(files["zero"])][1]
    assert by_path[f"{base}/missing.png"][0] == "unreadable"
    assert "404" in by_path[f"{base}/missing.png"][1]
    dups = {p for p, (k, _) in by_path.items() if k == "duplicate"}
    assert dups == {str(files["duplicate"]), str(files["palette"])} or dups == {
        str(files["duplicate"]), f"{base}/remote.png"}
    assert len(list(S.iter_images(store))) == good
    # bad files are not retried while unchanged; nothing crashes on a re-run
    again = score_pool([tmp_path / "pool"], target, [comp], store, batch_size=4, workers=0, progress=False)
    assert again.inferred == {} and again.bad == len(BAD)


def test_swapping_roles_reuses_maps_and_adds_only_the_missing_entropy(scored, models, pool_list):
    store, _ = scored
    target, comp = models
    stats = score_pool([pool_list], comp, [target], store, batch_size=4, workers=2, progress=False)
    assert stats.inferred == {comp.version: 8}  # re-run once as the target, for its entropy
    assert stats.distances == 8
    _, _, ent = S.read_areas(store, comp.version)
    assert (ent > 0).all()
    d_new = S.read_distances(store, comp.version, target.version, "miou")[1]
    d_old = S.read_distances(store, target.version, comp.version, "miou")[1]
    np.testing.assert_allclose(d_new, d_old, atol=1e-12)  # the distance is symmetric
    again = score_pool([pool_list], comp, [target], store, batch_size=4, workers=0, progress=False)
    assert again.inferred == {}


def test_score_cli_with_toml_config_and_clear_errors(scored, models, pool_list, tmp_path, capsys):
    store, _ = scored
    target, comp = models
    cfg = tmp_path / "models.toml"
    cfg.write_text(
        '[target]\nname = "espnetv2"\noptions = { scale = 0.5, input_size = 256 }\n\n'
        f'[[competitors]]\nname = "tflite"\ncheckpoint = "{comp.checkpoint}"\n'
    )
    assert madseg_main(["score", str(pool_list), "--store", str(store), "--config", str(cfg),
                        "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target_version"] == target.version and out["competitor_versions"] == [comp.version]
    assert out["inferred"] == {} and out["images"] == 8
    errors = {
        "at least one competitor": ["score", str(pool_list), "--store", str(store), "--target", TARGET],
        "does not exist": ["score", str(tmp_path / "nope"), "--store", str(store), "--target", TARGET,
                           "--competitor", COMPETITOR],
        "must start with a model name": ["score", str(pool_list), "--store", str(store), "--target",
                                         "scale=0.5", "--competitor", COMPETITOR],
        "unknown model name": ["score", str(pool_list), "--store", str(tmp_path / "s2"), "--target",
                               "nosuchnet", "--competitor", COMPETITOR],
        "stores label maps at 256x256": ["score", str(pool_list), "--store", str(store), "--target", TARGET,
                                         "--competitor", COMPETITOR, "--resolution", "128"],
        "needs --n": ["select", "--store", str(store), "--method", "entropy"],
    }
    for what, argv in errors.items():
        assert madseg_main(argv) == 2, what
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err, (what, err)


def test_madseg_select_and_the_round_write_the_same_candidates_file(scored, models, tmp_path):
    """One entry point: the round's select stage and `madseg select` give byte-identical files
    (same settings: S(0) = voc_samples, n3 = 2), and both exclude what they are told to."""
    from projects.experiment import load_experiment
    from projects.rounds import RoundPlan, RunOptions, Services
    from projects.stage_results import ScoreOutput

    store, _ = scored
    target, comp = models
    voc = shared_dir() / "data" / "voc_samples"
    cfg = write_experiment_toml(tmp_path, "same", f"""[pool]
folders = ["{voc / 'images'}"]
[target]
name = "espnetv2"
options = {{ scale = 0.5, input_size = 256 }}
[[competitors]]
key = "tflite"
name = "tflite"
[s0]
root = "{voc}"
subset = "all"
[t0]
root = "{voc}"
[selection]
n3 = 2
n4 = 2
""")
    exp = load_experiment(cfg)
    services = Services(exp, RunOptions(progress=False), store, tmp_path / "backend")
    scored_out = ScoreOutput(target_version=target.version, competitor_versions={"tflite": comp.version})
    plan = RoundPlan(kind="mad", number=1, root=tmp_path / "exp", target_key="f(0)",
                     target=exp.target.model_spec(),
                     competitors={c.key: c.model_spec() for c in exp.competitors}, n4=2, test_size=0,
                     finetune=False, title="t")
    info = services.select_mad(plan, scored_out).to_dict()  # as state.json stores it
    cli_out = tmp_path / "cli.jsonl"
    assert madseg_main(["select", "--store", str(store), "--target-version", target.version,
                        "--competitor-version", comp.version, "--n3", "2", "--bounds-from", str(voc),
                        "--out", str(cli_out)]) == 0
    round_file = plan.dir / "candidates.jsonl"
    assert info["n_candidates"] > 0
    assert round_file.read_bytes() == cli_out.read_bytes()
    # the round's state keeps where the bounds came from (voc_samples: < 5 masks of most classes)
    rule = info["bounds_rule"]
    assert rule["rule"] == "auto" and sum(rule["counts"].values()) == 20 and rule["counts"]["pool"] > 0
    assert info["m_size"] == info["n_candidates"] and info["order"] == "failures"
    json.dumps(info)
    # a rating budget keeps M's first R, in the same order
    cfg.write_text(cfg.read_text().replace("n4 = 2", "n4 = 2\nrating_budget = 2"))
    budget = Services(load_experiment(cfg), RunOptions(progress=False), store, tmp_path / "backend")
    plan_b = RoundPlan(**{**plan.__dict__, "root": tmp_path / "budget"})
    info_b = budget.select_mad(plan_b, scored_out).to_dict()
    assert (info_b["n_candidates"], info_b["m_size"], info_b["rating_budget"]) == (2, info["m_size"], 2)
    assert (plan_b.dir / "candidates.jsonl").read_text().splitlines() == cli_out.read_text().splitlines()[:2]
    # the round leaves out the images it is told to (e.g. S(1..i-1)), and selects again without them
    first = cand.read_candidates(round_file)[0].id
    used = RoundPlan(**{**plan.__dict__, "used": frozenset({first}), "number": 2})
    services.select_mad(used, scored_out)
    assert first not in {c.id for c in cand.read_candidates(used.dir / "candidates.jsonl")}
