"""A round on a real Label Studio: projects, pushes (idempotent), ratings by 3 users, MOS -> S,
pre-annotations that decode back exactly, mask export, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ml_backend.classes import IGNORE_INDEX, VOC_CLASSES
from ml_backend.errors import MadsegError
from ml_backend.imageio import read_mask, write_mask
from ml_backend.labelstudio import brush, configs, export
from ml_backend.labelstudio.client import LabelStudioUnreachable, connect
from ml_backend.labelstudio.connect import connect_ml_backend
from ml_backend.labelstudio.rle import RLEError, decode, encode
from ml_backend.shared import shared_dir
from projects import rating, round_projects, segmentation
from projects.mos import choose_lowest, mean_opinion_scores

pytestmark = [pytest.mark.server, pytest.mark.slow]

N_CANDIDATES = 50
N_RATED = 15  # tasks the three raters rate (every submission costs ~0.2-0.4 s of server time)
N4 = 5
OOD_IMAGE = 3  # rater 2 flags candidate 3 as out of domain


def _score(rater: int, k: int) -> int:
    return 1 + (k * 7 + rater * 3 + k // 5) % 5


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """50 real photos with the 'target's prediction' (their ground truth, ignore -> background)."""
    data = shared_dir() / "data" / "coco_voc"
    images = sorted((data / "images").glob("*.jpg"))[:N_CANDIDATES]
    root = tmp_path_factory.mktemp("round")
    pred_dir = root / "pred"
    cands = []
    maps = {}
    for k, img in enumerate(images):
        iid = f"coco-{img.stem}"
        lm = read_mask(data / "masks" / f"{img.stem}.png", 21)
        lm = np.where(lm == IGNORE_INDEX, 0, lm).astype(np.uint8)
        maps[iid] = lm
        write_mask(pred_dir / f"{iid}.png", lm)
        cands.append({"id": iid, "path": str(img), "k": k})
    (root / "candidates.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cands))
    return {"root": root, "cands": cands, "maps": maps, "pred_dir": pred_dir}


@pytest.fixture(scope="module")
def client(ls_server):
    return connect(ls_server.url, ls_server.api_key)


@pytest.fixture(scope="module")
def projects_(client, ls_server, pool) -> round_projects.RoundProjects:
    return round_projects.create_round_projects(client, "pytest-exp", 1, raters_per_task=3,
                                                document_root=ls_server.document_root,
                                                storage_folders=[pool["root"]])


def test_create_round_projects_idempotent(client, ls_server, projects_, pool):
    again = round_projects.create_round_projects(client, "pytest-exp", 1, raters_per_task=3,
                                                 document_root=ls_server.document_root,
                                                 storage_folders=[pool["root"]])
    assert again == projects_
    rate_p = client.request("GET", f"api/projects/{projects_.rating}", "get")
    seg = client.request("GET", f"api/projects/{projects_.segmentation}", "get")
    assert "round 1" in rate_p["title"] and "rating" in rate_p["title"]
    assert "round 1" in seg["title"] and "segmentation" in seg["title"]
    assert rate_p["maximum_annotations"] == 3 and seg["maximum_annotations"] == 1
    assert rate_p["expert_instruction"] and seg["expert_instruction"]
    configs.validate_rating_config(rate_p["label_config"])
    assert configs.validate_segmentation_config(seg["label_config"], VOC_CLASSES).labels == VOC_CLASSES
    assert len(round_projects.list_storages(client, projects_.rating)) == 1  # not duplicated


def test_push_rating_idempotent_after_partial_push(client, ls_server, projects_, pool):
    overlays = pool["root"] / "overlays"
    half = rating.push_rating_tasks(client, projects_.rating, pool["cands"][:20],
                                    predictions=pool["pred_dir"],
                                    overlay_dir=overlays, document_root=ls_server.document_root, batch_size=8,
                                    progress=False)
    assert (half.created, half.existing) == (20, 0)
    full = rating.push_rating_tasks(client, projects_.rating, pool["cands"], predictions=pool["pred_dir"],
                                    overlay_dir=overlays, document_root=ls_server.document_root,
                                    progress=False)
    assert (full.created, full.existing) == (30, 20)
    again = rating.push_rating_tasks(client, projects_.rating, pool["cands"], predictions=pool["pred_dir"],
                                     overlay_dir=overlays, document_root=ls_server.document_root,
                                     progress=False)
    assert (again.created, again.existing) == (0, 50)
    tasks = list(round_projects.iter_tasks(client, projects_.rating))
    assert len(tasks) == 50
    assert sorted(export.task_image_id(t) for t in tasks) == sorted(c["id"] for c in pool["cands"])
    t0 = next(t for t in tasks if export.task_image_id(t) == pool["cands"][0]["id"])
    assert t0["data"]["image"].startswith("/data/local-files/?d=")
    assert len(list(overlays.glob("*.png"))) == 50
    # Label Studio serves both images of a task to a logged-in user (storages registered).
    for key in ("image", "overlay"):
        r = client.sdk._client_wrapper.httpx_client.httpx_client.get(
            ls_server.url + t0["data"][key], headers=client.sdk._client_wrapper.get_headers())
        assert r.status_code == 200, key
        assert r.content[:3] in (b"\x89PN", b"\xff\xd8\xff"), key


def _rate(ls_server, project_id: int, cands) -> dict[int, int]:
    """Three rater users rate the first N_RATED candidates through the API; rater index -> user id."""
    ids = {}
    by_image = {c["id"]: c["k"] for c in cands}
    for r in range(3):
        user = ls_server.user(f"rater{r + 1}")
        ids[r] = user.user_id
        rc = ls_server.client(user)
        for t in rc.tasks.list(project=project_id, page_size=100):
            k = by_image[t.data["image_id"]]
            if k >= N_RATED:
                continue
            result = [{"from_name": "rating", "to_name": "image", "type": "choices",
                       "value": {"choices": [configs.RATING_CHOICES[_score(r, k) - 1]]}}]
            if r == 2 and k == OOD_IMAGE:
                result.append({"from_name": "ood", "to_name": "image", "type": "choices",
                               "value": {"choices": [configs.OOD_CHOICE]}})
            rc.annotations.create(id=t.id, result=result, project=project_id)
    return ids


def test_three_raters_mos_and_s(client, ls_server, projects_, pool):
    if not list(round_projects.iter_tasks(client, projects_.rating)):
        pytest.fail("rating tasks missing (run the push test first)")
    assert rating.rating_progress(client, projects_.rating, 3) == (0, 50)
    users = _rate(ls_server, projects_.rating, pool["cands"])
    assert rating.rating_progress(client, projects_.rating, 3) == (N_RATED, 50)
    ratings = rating.collect_ratings(client, projects_.rating)
    assert len(ratings) == 3 * N_RATED
    assert {r.rater for r in ratings} == set(users.values())  # three separate users
    mos = mean_opinion_scores(ratings)
    expected = {}
    for c in pool["cands"][:N_RATED]:
        k = c["k"]
        expected[c["id"]] = math.inf if k == OOD_IMAGE else sum(_score(r, k) for r in range(3)) / 3
    assert mos == pytest.approx(expected)
    s = choose_lowest(mos, N4)
    finite = sorted((v, i) for i, v in expected.items() if math.isfinite(v))
    assert s == [i for _, i in finite[:N4]]
    assert pool["cands"][OOD_IMAGE]["id"] not in s
    pool["S"] = s


def test_segmentation_preannotations_and_export_roundtrip(client, ls_server, projects_, pool, tmp_path):
    s = pool.get("S") or [c["id"] for c in pool["cands"][:N4]]
    chosen = [c for c in pool["cands"] if c["id"] in s]
    res = segmentation.push_segmentation_tasks(client, projects_.segmentation, chosen,
                                               predictions=pool["pred_dir"], model_version="target@v1",
                                               document_root=ls_server.document_root,
                                               scores={s[0]: 0.25}, progress=False)
    assert res.created == len(chosen)
    assert segmentation.push_segmentation_tasks(client, projects_.segmentation, chosen,
                                                predictions=pool["pred_dir"], model_version="target@v1",
                                                document_root=ls_server.document_root,
                                                progress=False).created == 0
    _, config = export.project_label_config(client, projects_.segmentation)
    ctl = configs.validate_segmentation_config(config)
    annotator = ls_server.user("annotator1")
    ac = ls_server.client(annotator)
    submitted = {}
    for t in client.tasks.list(project=projects_.segmentation, fields="all", page_size=100):
        iid = t.data["image_id"]
        (pred,) = t.predictions
        assert pred.model_version == "target@v1"
        assert pred.score == (0.25 if iid == s[0] else 0.0)
        target = pool["maps"][iid]
        h, w = target.shape
        rebuilt = np.full((h, w), 255, np.uint8)
        for r in pred.result:
            assert (r["original_width"], r["original_height"]) == (w, h)
            rebuilt[decode(r["value"]["rle"], h, w) > 0] = VOC_CLASSES.index(r["value"]["brushlabels"][0])
        np.testing.assert_array_equal(rebuilt, target)
        # The annotator corrects it: the top rows become 'person', a band stays unpainted.
        corrected = target.copy()
        corrected[: h // 4] = 15
        corrected[h // 2: h // 2 + 5] = IGNORE_INDEX
        result = brush.class_map_results(corrected, VOC_CLASSES, ctl)
        ac.annotations.create(id=t.id, result=result, project=projects_.segmentation)
        submitted[iid] = corrected
    assert segmentation.segmentation_progress(client, projects_.segmentation) == (len(chosen), len(chosen))
    out = tmp_path / "labelled"
    written = export.export_masks(client, projects_.segmentation, out, document_root=ls_server.document_root)
    assert set(written) == set(submitted)
    for iid, stem in written.items():
        np.testing.assert_array_equal(read_mask(out / "masks" / f"{stem}.png", 21), submitted[iid])
        assert (out / "images" / f"{stem}.jpg").stat().st_size > 0


def test_cli_create_round_and_progress(ls_server, monkeypatch, capsys):
    from projects.cli import main

    for k, v in ls_server.env().items():
        monkeypatch.setenv(k, v)
    assert main(["ls", "create-round", "--experiment", "cli-exp", "--round", "2", "--raters", "2",
                 "--classes", "background,cat,dog"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert main(["ls", "progress", "--project", str(ids["rating"]), "--raters", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == 0
    assert main(["ls", "collect-ratings", "--project", str(ids["segmentation"])]) == 2
    assert "lacks the rating control 'rating'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_rating_project_without_rating_control(client, ls_server, pool, tmp_path):
    bad = configs.rating_config().replace('name="rating"', 'name="score"')
    pid = round_projects.ensure_project(client, "pytest bad rating project", bad)
    with pytest.raises(MadsegError, match=f"rating project {pid}.*lacks the rating control 'rating'"):
        rating.collect_ratings(client, pid)
    with pytest.raises(MadsegError, match="lacks the rating control 'rating'"):
        rating.push_rating_tasks(client, pid, pool["cands"][:2], predictions=pool["pred_dir"],
                                 overlay_dir=tmp_path, document_root=ls_server.document_root, progress=False)


@pytest.fixture(scope="module")
def bad_seg_project(client, ls_server, pool):
    """A segmentation project with one task (no annotation yet)."""
    pid = round_projects.ensure_project(client, "pytest bad segmentation", configs.segmentation_config())
    res = segmentation.push_segmentation_tasks(client, pid, pool["cands"][:1], predictions=pool["pred_dir"],
                                               model_version="v0", document_root=ls_server.document_root,
                                               progress=False)
    return pid, res.task_ids[pool["cands"][0]["id"]], pool["maps"][pool["cands"][0]["id"]].shape


def _annotate(ls_server, pid, task_id, result):
    c = ls_server.client(ls_server.user("annotator1"))
    ann = c.annotations.create(id=task_id, result=result, project=pid)
    return ann.id


def test_export_unknown_label_names_the_task(client, ls_server, bad_seg_project, tmp_path):
    pid, tid, (h, w) = bad_seg_project
    mask = np.zeros((h, w), bool)
    mask[:10, :10] = True
    result = [{"from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": w,
               "original_height": h, "image_rotation": 0,
               "value": {"format": "rle", "rle": encode(mask), "brushlabels": ["unicorn"]}}]
    aid = _annotate(ls_server, pid, tid, result)
    with pytest.raises(brush.AnnotationError, match=f"task {tid}, annotation {aid}.*unknown label 'unicorn'"):
        export.export_masks(client, pid, tmp_path / "out", document_root=ls_server.document_root)
    client.annotations.delete(id=aid)


def test_export_malformed_rle_names_the_task(client, ls_server, bad_seg_project, tmp_path):
    pid, tid, (h, w) = bad_seg_project
    rle = encode(np.ones((h, w), bool))[:-3]  # truncated
    result = [{"from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": w,
               "original_height": h, "image_rotation": 0,
               "value": {"format": "rle", "rle": rle, "brushlabels": ["cat"]}}]
    aid = _annotate(ls_server, pid, tid, result)
    with pytest.raises(RLEError, match=f"task {tid}, annotation {aid}.*malformed brush RLE"):
        export.export_masks(client, pid, tmp_path / "out", document_root=ls_server.document_root)
    client.annotations.delete(id=aid)


def test_push_refuses_invalid_prediction(client, ls_server, pool, bad_seg_project, tmp_path):
    pid, _, _ = bad_seg_project
    bad = np.full((7, 9), 30, np.uint8)  # class 30 does not exist
    with pytest.raises(MadsegError, match="outside 0..20"):
        segmentation.push_segmentation_tasks(client, pid, pool["cands"][1:2], predictions=lambda _i: bad,
                                             model_version="v0", document_root=ls_server.document_root,
                                             progress=False)
    outside = tmp_path / "x.jpg"
    outside.write_bytes(Path(pool["cands"][0]["path"]).read_bytes())
    with pytest.raises(MadsegError, match="outside the Label Studio document root"):
        segmentation.push_segmentation_tasks(client, pid, [{"id": "x", "path": str(outside)}],
                                             predictions=pool["pred_dir"], model_version="v0",
                                             document_root=pool["root"] / "pred", progress=False)


def test_label_studio_unreachable_is_one_clear_error():
    from projects.simulation.ls_local import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LabelStudioUnreachable, match=f"Label Studio at {url} unreachable.*start it"):
        connect(url, "secret-token-value", retries=2, backoff_s=0.05)
    try:
        connect(url, "secret-token-value", retries=0, backoff_s=0.01)
    except LabelStudioUnreachable as exc:
        assert "secret-token-value" not in str(exc)


def test_wrong_api_key_is_clear(ls_server):
    with pytest.raises(MadsegError, match="HTTP 401.*LABEL_STUDIO_API_KEY"):
        connect(ls_server.url, "not-a-valid-token")


def test_push_after_lost_response_adds_no_duplicates(client, ls_server, pool, monkeypatch):
    """The server imports a batch but the answer is lost (timeout): the retry re-checks and sends
    only what is missing; nothing is duplicated or lost."""
    import httpx

    pid = round_projects.ensure_project(client, "pytest lost response", configs.rating_config(),
                                        maximum_annotations=3)
    real = client.post_json_once
    calls = {"import": 0}

    def flaky(path, *args, **kwargs):
        resp = real(path, *args, **kwargs)
        calls["import"] += 1
        if calls["import"] == 2:  # the second batch reaches the server, its answer does not
            raise httpx.ReadTimeout("simulated lost response")
        return resp

    monkeypatch.setattr(client, "post_json_once", flaky)
    monkeypatch.setattr(client, "backoff_s", 0.05)
    res = rating.push_rating_tasks(client, pid, pool["cands"][:7], predictions=pool["pred_dir"],
                                   overlay_dir=pool["root"] / "overlays",
                                   document_root=ls_server.document_root, batch_size=3, progress=False)
    assert res.created == 7 and calls["import"] == 3
    ids = [export.task_image_id(t) for t in round_projects.iter_tasks(client, pid)]
    assert sorted(ids) == sorted(c["id"] for c in pool["cands"][:7])


def test_connect_dead_ml_backend_is_clear(client, projects_):
    from projects.simulation.ls_local import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MadsegError, match=f"ML backend {url}"):
        connect_ml_backend(client, projects_.segmentation, url)
