"""Simulated raters and annotators (projects.simulation.oracle): the pure mapping and results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml_backend.classes import VOC_CLASSES
from ml_backend.errors import MadsegError
from ml_backend.imageio import write_mask
from ml_backend.labelstudio.configs import (
    rating_config,
    segmentation_config,
    validate_rating_config,
    validate_segmentation_config,
)
from ml_backend.labelstudio.rle import decode
from projects.simulation.oracle import (
    NO_GT_SCORE,
    GroundTruth,
    OracleImage,
    annotation_regions,
    brush_result,
    default_image_id_of,
    is_out_of_domain,
    per_image_miou,
    rate_image,
    rating_result,
    score_from_quality,
    simulated_scores,
)

RATING_XML = rating_config()
BRUSH_XML = segmentation_config(VOC_CLASSES)


def test_score_mapping_thresholds() -> None:
    assert [score_from_quality(q) for q in (-0.3, 0.0, 0.19, 0.2, 0.39, 0.4, 0.6, 0.79, 0.8, 1.0, 1.4)] == [
        1,
        1,
        1,
        2,
        2,
        3,
        4,
        4,
        5,
        5,
        5,
    ]
    assert score_from_quality(0.5, (0.1, 0.3, 0.5, 0.7)) == 4


def test_simulated_scores_noise_seed_and_order_independence() -> None:
    assert simulated_scores("a", 0.55, n_raters=3, noise=0.0) == [3, 3, 3]
    assert simulated_scores("a", None, n_raters=3) == [NO_GT_SCORE] * 3
    s1 = simulated_scores("img-1", 0.5, n_raters=3, noise=0.2, seed=7)
    assert s1 == simulated_scores("img-1", 0.5, n_raters=3, noise=0.2, seed=7)
    assert simulated_scores("img-1", 0.5, n_raters=5, noise=0.2, seed=7)[:3] == s1  # rater r is stable
    # across many images the noise is centred: mean score of mIoU 0.5 (score 3) stays near 3
    many = np.array([simulated_scores(f"i{j}", 0.5, n_raters=3, noise=0.1, seed=1) for j in range(400)])
    assert abs(many.mean() - 3.0) < 0.1
    # score 3 needs |e| < 0.1 = 1 sigma: about 68 % of the answers
    assert 0.62 < (many == 3).mean() < 0.74
    # different seeds give different noise
    other = np.array([simulated_scores(f"i{j}", 0.5, n_raters=3, noise=0.1, seed=2) for j in range(400)])
    assert (other != many).any()


def test_per_image_miou_ignores_255_and_resizes_prediction() -> None:
    gt = np.zeros((4, 4), np.uint8)
    gt[:, 2:] = 15
    gt[0, 0] = 255
    assert per_image_miou(gt.copy(), gt, 21) == pytest.approx(1.0)
    half = gt[::2, ::2].copy()  # (2, 2) -> nearest back to (4, 4) is exact here
    half[0, 0] = 0
    assert per_image_miou(half, gt, 21) == pytest.approx(1.0)
    wrong = np.full((4, 4), 12, np.uint8)
    assert per_image_miou(wrong, gt, 21) == 0.0
    # half of the person pixels predicted as background: bg IoU 7/15, person IoU 4/8
    pred = gt.copy()
    pred[:, 3] = 0
    pred[0, 0] = 0
    assert per_image_miou(pred, gt, 21) == pytest.approx((7 / 11 + 4 / 8) / 2)


def test_out_of_domain() -> None:
    assert is_out_of_domain(None, 21)
    assert is_out_of_domain(np.zeros((3, 3), np.uint8), 21)
    assert is_out_of_domain(np.full((3, 3), 255, np.uint8), 21)
    m = np.zeros((3, 3), np.uint8)
    m[1, 1] = 20
    assert not is_out_of_domain(m, 21)


def test_rating_config_and_result_shapes() -> None:
    c = validate_rating_config(RATING_XML)
    assert (c.rating_from, c.rating_to, c.ood_from, c.ood_to) == ("rating", "image", "ood", "image")
    assert rating_result(2, False, c) == [
        {"from_name": "rating", "to_name": "image", "type": "choices", "value": {"choices": ["2 poor"]}}
    ]
    res = rating_result(5, True, c)
    assert res[1] == {
        "from_name": "ood",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": ["out of domain"]},
    }
    with pytest.raises(ValueError, match="1..5"):
        rating_result(0, False, c)
    with pytest.raises(MadsegError, match="lacks the rating control"):
        validate_rating_config("<View><Choices name='x' toName='i'><Choice value='a'/></Choices></View>")
    with pytest.raises(MadsegError, match="not valid XML"):
        validate_rating_config("<View>")
    # a rating made by the oracle is read back by the MOS logic the rounds use
    from projects.mos import parse_rating_result

    assert parse_rating_result(res, "task 1") == (5, True)
    assert parse_rating_result(rating_result(2, False, c), "task 2") == (2, False)


def test_brush_result_paints_ground_truth_exactly() -> None:
    ctl = validate_segmentation_config(BRUSH_XML)
    assert (ctl.from_name, ctl.to_name, len(ctl.labels)) == ("label", "image", 21)
    gt = np.zeros((30, 40), np.uint8)
    gt[5:20, 3:15] = 15
    gt[10:25, 20:38] = 12
    gt[0, :] = 255
    res = brush_result(gt, VOC_CLASSES, ctl)  # ignore -> unlabeled
    labels = [r["value"]["brushlabels"][0] for r in res]
    assert labels == ["background", "dog", "person"]
    for r in res:
        assert (r["from_name"], r["to_name"], r["type"]) == ("label", "image", "brushlabels")
        assert (r["original_width"], r["original_height"]) == (40, 30)
        k = VOC_CLASSES.index(r["value"]["brushlabels"][0])
        assert np.array_equal(decode(r["value"]["rle"], 30, 40) == 255, gt == k)
    painted = np.zeros_like(gt, bool)
    for r in res:
        painted |= decode(r["value"]["rle"], 30, 40) == 255
    assert not painted[0].any() and painted[1:].all()  # the ignore row stays unpainted
    bg = brush_result(gt, VOC_CLASSES, ctl, ignore="background")
    assert np.array_equal(decode(bg[0]["value"]["rle"], 30, 40) == 255, (gt == 0) | (gt == 255))
    # without a background label only the classes are painted; an unknown class is an error
    no_bg = [lab for lab in VOC_CLASSES if lab != "background"]
    assert [n for n, _ in annotation_regions(gt, VOC_CLASSES, no_bg)] == ["dog", "person"]
    with pytest.raises(MadsegError, match="no brush label 'dog'"):
        annotation_regions(gt, VOC_CLASSES, ["person"])
    with pytest.raises(MadsegError, match="lacks the brush control"):
        validate_segmentation_config(RATING_XML)


def test_ground_truth_lookup_and_rate_image(tmp_path: Path) -> None:
    from ml_backend.shared import shared_dir

    coco = shared_dir() / "data" / "coco_voc"
    gt = GroundTruth([coco / "masks"])
    stem = sorted(p.stem for p in (coco / "images").glob("*.jpg"))[0]
    img = coco / "images" / f"{stem}.jpg"
    assert gt.path_for(img) == coco / "masks" / f"{stem}.png"
    mask = gt.load(img)
    assert mask is not None and mask.ndim == 2
    assert gt.load("/somewhere/unlabelled/jellyfish.jpg") is None
    perfect = rate_image(
        OracleImage(stem, img, lambda: mask),
        mask,
        n_raters=3,
        num_classes=21,
        noise=0.0,
        thresholds=(0.2, 0.4, 0.6, 0.8),
        seed=0,
    )
    assert perfect.miou == pytest.approx(1.0) and perfect.scores == (5, 5, 5)
    assert perfect.ood is is_out_of_domain(mask, 21)
    bad = rate_image(
        OracleImage(stem, img, np.zeros_like(mask)),
        mask,
        n_raters=2,
        num_classes=21,
        noise=0.0,
        thresholds=(0.2, 0.4, 0.6, 0.8),
        seed=0,
    )
    assert bad.scores[0] == score_from_quality(bad.miou) and bad.miou < 0.5
    no_gt = rate_image(
        OracleImage("x", "x.jpg"),
        None,
        n_raters=3,
        num_classes=21,
        noise=0.1,
        thresholds=(0.2, 0.4, 0.6, 0.8),
        seed=0,
    )
    assert no_gt.ood and no_gt.miou is None and no_gt.scores == (NO_GT_SCORE,) * 3
    with pytest.raises(MadsegError, match="no target prediction"):
        OracleImage("y", "y.jpg").label_map()
    # duplicates across folders and missing folders are errors
    for d in ("a", "b"):
        write_mask(tmp_path / d / "same.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(MadsegError, match="must not share file names"):
        GroundTruth([tmp_path / "a", tmp_path / "b"]).path_for("same.jpg")
    with pytest.raises(MadsegError, match="ground-truth folder does not exist"):
        GroundTruth([tmp_path / "none"]).load("x.jpg")


def test_default_image_id_of() -> None:
    assert default_image_id_of({"meta": {"image_id": "abc"}, "data": {"image_id": "zzz"}}) == "abc"
    assert default_image_id_of({"data": {"image_id": "d1"}}) == "d1"
    assert default_image_id_of({"data": {"image": "/x.jpg"}}) is None


# ------------------------------------------------------------------------------------------------
# through the real Label Studio server (session fixture tests/ls_server.py)


@pytest.mark.server
def test_oracle_plays_separate_users_through_label_studio(ls_server, tmp_path: Path) -> None:  # noqa: ANN001
    from ml_backend.shared import shared_dir
    from projects.simulation.oracle import play_annotator, play_raters

    admin = ls_server.client()
    coco = shared_dir() / "data" / "coco_voc"
    gt = GroundTruth([coco / "masks"])
    stems = sorted(p.stem for p in (coco / "images").glob("*.jpg"))[:4]
    masks = {s: gt.load(f"{s}.jpg") for s in stems}
    images = {
        s: OracleImage(
            s, coco / "images" / f"{s}.jpg", (lambda s=s: masks[s]) if j % 2 == 0 else np.zeros_like(masks[s])
        )
        for j, s in enumerate(stems)
    }
    unl = sorted((shared_dir() / "data" / "unlabelled").rglob("*.jpg"))[0]
    images["unl"] = OracleImage("unl", unl, np.zeros((8, 8), np.uint8))
    rp = admin.projects.create(title="oracle rating test", label_config=RATING_XML)
    sp = admin.projects.create(title="oracle segmentation test", label_config=BRUSH_XML)
    tasks = [
        {"data": {"image": f"/data/local-files/?d={k}.jpg", "overlay": "/x.png", "image_id": k}}
        for k in images
    ] + [{"data": {"image": "/data/other.jpg", "overlay": "/y.png"}}]
    admin.projects.import_tasks(id=rp.id, request=tasks)
    admin.projects.import_tasks(id=sp.id, request=tasks)
    store = tmp_path / "tokens.json"

    run = play_raters(
        ls_server.url,
        ls_server.api_key,
        rp.id,
        images,
        gt,
        n_raters=3,
        noise=0.0,
        progress=False,
        token_store=store,
    )
    assert run.submitted == 15 and run.already_done == 0 and len(run.unknown_tasks) == 1
    assert run.ratings[stems[0]].scores == (5, 5, 5) and not run.ratings[stems[0]].ood
    assert run.ratings["unl"].ood and run.ratings["unl"].scores == (NO_GT_SCORE,) * 3
    users = {u.id: u.email for u in admin.users.list()}
    by_image: dict[str, list[tuple[str, list[str]]]] = {}
    for t in admin.tasks.list(project=rp.id, fields="all"):
        key = t.data.get("image_id")
        by_image[key] = [
            (users[a["completed_by"]], [r["value"]["choices"][0] for r in a["result"]]) for a in t.annotations
        ]
    assert by_image[None] == []  # a task without an image id is left alone
    for k, anns in by_image.items():
        if k is None:
            continue
        assert sorted(e for e, _ in anns) == [f"madseg-rater-{r}@madseg.example.com" for r in (1, 2, 3)]
        rating = run.ratings[k]
        for email, choices in anns:
            r = int(email.split("@")[0][-1]) - 1
            assert (
                choices[0]
                == f"{rating.scores[r]} " + ["bad", "poor", "fair", "good", "excellent"][rating.scores[r] - 1]
            )
            assert (choices[1:] == ["out of domain"]) is rating.ood
    # resumable: nothing new on a re-run; a deleted annotation is made again by the same user
    again = play_raters(
        ls_server.url,
        ls_server.api_key,
        rp.id,
        images,
        gt,
        n_raters=3,
        noise=0.0,
        progress=False,
        token_store=store,
    )
    assert (again.submitted, again.already_done) == (0, 15)
    victim = next(t for t in admin.tasks.list(project=rp.id, fields="all") if t.data.get("image_id") == "unl")
    admin.annotations.delete(id=victim.annotations[1]["id"])
    third = play_raters(
        ls_server.url,
        ls_server.api_key,
        rp.id,
        images,
        gt,
        n_raters=3,
        noise=0.0,
        progress=False,
        token_store=store,
    )
    assert (third.submitted, third.already_done) == (1, 14)

    ann = play_annotator(
        ls_server.url, ls_server.api_key, sp.id, images, gt, progress=False, token_store=store
    )
    assert ann.submitted == 4 and len(ann.unknown_tasks) == 1
    assert ann.left_to_people == [
        next(t.id for t in admin.tasks.list(project=sp.id) if t.data.get("image_id") == "unl")
    ]
    users = {u.id: u.email for u in admin.users.list()}
    for t in admin.tasks.list(project=sp.id, fields="all"):
        k = t.data.get("image_id")
        if k not in masks:
            assert t.annotations == []
            continue
        (a,) = t.annotations
        assert users[a["completed_by"]] == "madseg-annotator-1@madseg.example.com"
        painted = np.full(masks[k].shape, 255, np.uint8)
        for r in a["result"]:
            region = decode(r["value"]["rle"], r["original_height"], r["original_width"]) == 255
            painted[region] = VOC_CLASSES.index(r["value"]["brushlabels"][0])
        assert np.array_equal(painted, masks[k])  # 255 (ignore) pixels stay unpainted
    assert (
        play_annotator(
            ls_server.url, ls_server.api_key, sp.id, images, gt, progress=False, token_store=store
        ).submitted
        == 0
    )
