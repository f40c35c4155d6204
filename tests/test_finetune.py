"""Fine-tuning core: labelled folders, augmentation, loss going down, atomic checkpoints, resume,
replay, LwF and the LR grid. ESPNetv2 s=0.5 at 128x128 keeps every run to a few seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_backend.datasets import LabelledFolder, SegmentationTrainSet, UnlabelledTrainSet, augment
from ml_backend.errors import MadsegError, MaskError
from ml_backend.finetune import (
    EpochInfo,
    FinetuneConfig,
    distillation_loss,
    epoch_plan,
    finetune,
    segmentation_loss,
    training_loss,
)
from ml_backend.imageio import write_mask
from ml_backend.shared import shared_dir
from ml_backend.zoo import load_model, read_sidecar

VOC = shared_dir() / "data" / "voc_samples"
UNLABELLED = shared_dir() / "data" / "unlabelled" / "edgenets"
TRAIN_STEMS = ["voc_0", "voc_1", "voc_114", "voc_120"]
REPLAY_STEMS = ["voc_166", "voc_20", "voc_23"]
VAL_STEMS = ["voc_293", "voc_294"]
SIZE = 128


pytestmark = pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return load_model("espnetv2", scale=0.5, input_size=SIZE, device="cpu")


def _cfg(**kw) -> FinetuneConfig:
    base = {"epochs": 2, "lrs": (1e-3,), "num_workers": 0}
    base.update(kw)
    return FinetuneConfig(**base)


def _copy_labelled(dst: Path, stems: list[str]) -> Path:
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for s in stems:
            shutil.copy(VOC / sub / f"{s}.png", dst / sub / f"{s}.png")
    return dst


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def test_labelled_folder_subsets_and_errors(tmp_path: Path) -> None:
    full = LabelledFolder(VOC)
    assert len(full) == 14 and full.pairs[0][0].name == "voc_0.png"
    h0, h1 = LabelledFolder(VOC, "half0"), LabelledFolder(VOC, "half1")
    assert len(h0) == len(h1) == 7 and set(h0.stems).isdisjoint(h1.stems)
    assert set(h0.stems) | set(h1.stems) == set(full.stems)
    assert LabelledFolder(VOC, ["voc_8", "voc_1"]).stems == ("voc_8", "voc_1")
    with pytest.raises(MadsegError, match="unknown stem"):
        LabelledFolder(VOC, ["voc_8", "nope"])
    with pytest.raises(MadsegError, match="subset 'third'"):
        LabelledFolder(VOC, "third")
    with pytest.raises(MadsegError, match="no images/ sub-folder"):
        LabelledFolder(tmp_path)

    folder = _copy_labelled(tmp_path / "set", ["voc_0", "voc_1", "voc_8"])
    (folder / "masks" / "voc_1.png").unlink()
    with pytest.raises(MaskError, match=r"1 image\(s\) have no mask .*\(voc_1\)"):
        LabelledFolder(folder)


def test_check_finds_bad_masks(tmp_path: Path) -> None:
    folder = _copy_labelled(tmp_path / "set", ["voc_0", "voc_1"])
    LabelledFolder(folder).check(21)
    bad = np.zeros((513, 513), np.uint8)
    bad[0, 0] = 99
    write_mask(folder / "masks" / "voc_1.png", bad)
    with pytest.raises(MaskError, match=r"voc_1\.png: mask has values \[99\]"):
        LabelledFolder(folder).check(21)
    write_mask(folder / "masks" / "voc_1.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(MaskError, match=r"voc_1\.png: mask is 12x10 but its image voc_1\.png is 513x513"):
        LabelledFolder(folder).check(21)


def test_augment_scales_pads_crops_and_flips() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)
    mask = np.zeros((50, 80), np.uint8)
    mask[:, 40:] = 7
    for seed in range(20):
        im, mk = augment(image, mask, (32, 48), np.random.default_rng(seed), scale_range=(0.5, 2.0))
        assert im.shape == (32, 48, 3) and mk is not None and mk.shape == (32, 48)
        assert set(np.unique(mk).tolist()) <= {0, 7, 255}
    im, mk = augment(image, mask, (32, 48), np.random.default_rng(1), scale_range=(0.5, 0.5), flip=False)
    assert (mk[16:, :] == 255).all() and (mk[:, 24:] == 255).all()  # padding is ignore
    assert (mk[:16, :12] == 0).all() and (mk[:16, 12:24] == 7).all()
    assert (im[20, 30] == (124, 116, 104)).all()  # image padding = ImageNet mean (normalises to ~0)
    a = augment(image, mask, (32, 48), np.random.default_rng(5))
    b = augment(image, mask, (32, 48), np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # seeded -> reproducible


def test_train_and_unlabelled_datasets(model, tmp_path: Path) -> None:
    pairs = LabelledFolder(VOC, TRAIN_STEMS).pairs
    ds = SegmentationTrainSet(pairs, (64, 96), model.mean, model.std, num_classes=21, seed=3)
    x, m = ds[0]
    assert x.shape == (3, 64, 96) and x.dtype == torch.float32
    assert m.shape == (64, 96) and m.dtype == torch.int64
    assert torch.equal(ds[0][0], x)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], x)  # a new epoch, new augmentation
    (tmp_path / "broken.jpg").write_bytes(b"")
    shutil.copy(UNLABELLED / "sample1.jpg", tmp_path / "ok.jpg")
    unl = UnlabelledTrainSet([tmp_path / "broken.jpg", tmp_path / "ok.jpg"], (64, 64), model.mean, model.std)
    assert unl[0].shape == (3, 64, 64) and unl.bad == {0}  # the unreadable file is skipped


def test_epoch_plan_is_deterministic_and_covers_the_new_pairs() -> None:
    cfg = FinetuneConfig(batch_size=2, seed=4)
    plan = epoch_plan(5, 10, 3, cfg, epoch=2)
    assert len(plan) == 3 and sorted(np.concatenate([p["train"] for p in plan]).tolist()) == [0, 1, 2, 3, 4]
    assert all(len(p["replay"]) == 2 and len(p["unl"]) == 2 for p in plan)
    again = epoch_plan(5, 10, 3, cfg, epoch=2)
    assert all(np.array_equal(a["replay_seed"], b["replay_seed"]) for a, b in zip(plan, again, strict=True))
    assert "replay" not in epoch_plan(5, 0, 0, cfg, epoch=0)[0]


def test_losses() -> None:
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 10.0
    masks = torch.tensor([[[1, 1], [255, 255]]])
    assert float(segmentation_loss(logits, masks)) < 1e-3
    assert float(segmentation_loss(logits, torch.full((1, 2, 2), 255))) == 0.0  # all ignored: no NaN
    t = torch.randn(2, 5, 4, 4)
    assert float(distillation_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(torch.randn(2, 5, 4, 4), t, 2.0)) > 0


# ------------------------------------------------------------------------------------------------
# fine-tuning
# ------------------------------------------------------------------------------------------------


def test_finetune_lowers_training_loss_and_round_trips(model, tmp_path: Path) -> None:
    train = LabelledFolder(VOC, TRAIN_STEMS)
    before = training_loss(model, train)
    # no random scaling here: the training crops are then the images the loss is measured on
    cfg = _cfg(epochs=3, replay_batch_size=1, scale_range=(1.0, 1.0))
    res = finetune(model, train, tmp_path / "ft", replay=LabelledFolder(VOC, REPLAY_STEMS), config=cfg,
                   progress=False)
    assert res.checkpoint == tmp_path / "ft" / "model.pth" and res.checkpoint.is_file()
    assert res.version != model.version and res.version.startswith("espnetv2-s0.5-128@")
    # loadable with the same name and options; the sidecar alone also suffices
    tuned = load_model("espnetv2", res.checkpoint, **model.spec.options)
    assert tuned.version == res.version
    assert load_model("espnetv2", res.checkpoint).spec.options == model.spec.options
    after = training_loss(tuned, train)
    assert after < before * 0.8, (before, after)
    side = read_sidecar(res.checkpoint)
    assert side is not None and side["version"] == res.version
    assert side["parent"]["version"] == model.version
    assert side["data"]["train"]["stems"] == TRAIN_STEMS and side["data"]["replay"]["count"] == 3
    assert side["hyperparameters"]["momentum"] == 0.9 and side["hyperparameters"]["weight_decay"] == 5e-4
    assert side["lr"] == 1e-3 and len(side["metrics"]["train_loss"]) == 3
    assert not list((tmp_path / "ft").rglob("*.tmp")) and not list((tmp_path / "ft").rglob("state.pt"))
    # the model passed in is untouched
    assert training_loss(model, train) == pytest.approx(before)
    # a finished job returns at once with the same result
    again = finetune(model, train, tmp_path / "ft", replay=LabelledFolder(VOC, REPLAY_STEMS), config=cfg,
                     progress=False)
    assert again.version == res.version
    with pytest.raises(MadsegError, match="holds a different fine-tune"):
        finetune(model, train, tmp_path / "ft", config=_cfg(epochs=4), progress=False)


def test_resume_after_interrupt_continues_at_next_epoch(model, tmp_path: Path) -> None:
    train = LabelledFolder(VOC, TRAIN_STEMS[:2])
    replay = LabelledFolder(VOC, REPLAY_STEMS)
    seen: list[int] = []

    def crash_after_first(info: EpochInfo) -> None:
        seen.append(info.epoch)
        if info.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(model, train, tmp_path / "a", replay=replay, config=_cfg(epochs=3),
                 progress=False, on_epoch_end=crash_after_first)
    run_dir = next((tmp_path / "a" / "runs").iterdir())
    assert (run_dir / "state.pt").is_file()
    assert not (tmp_path / "a" / "model.pth").exists() and not (run_dir / "model.pth").exists()
    resumed = finetune(model, train, tmp_path / "a", replay=replay, config=_cfg(epochs=3),
                       progress=False, on_epoch_end=lambda info: seen.append(info.epoch))
    assert seen == [1, 2, 3]  # epoch 1 was not trained again
    straight = finetune(model, train, tmp_path / "b", replay=replay, config=_cfg(epochs=3), progress=False)
    a = torch.load(resumed.checkpoint, map_location="cpu", weights_only=True)
    b = torch.load(straight.checkpoint, map_location="cpu", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert resumed.runs[0]["train_loss"] == pytest.approx(straight.runs[0]["train_loss"], rel=1e-4)


def test_crash_while_writing_leaves_no_partial_checkpoint(model, tmp_path: Path, monkeypatch) -> None:
    train = LabelledFolder(VOC, TRAIN_STEMS[:2])
    real_save = torch.save

    def save_then_die(obj, fh, *args, **kwargs):
        if isinstance(obj, dict) and "epoch" not in obj:  # the weights file, not the epoch state
            fh.write(b"partial")
            raise OSError("disk full")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(OSError, match="disk full"):
        finetune(model, train, tmp_path / "c", config=_cfg(epochs=1), progress=False)
    assert not list((tmp_path / "c").rglob("model.pth")) and not list((tmp_path / "c").rglob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    res = finetune(model, train, tmp_path / "c", config=_cfg(epochs=1), progress=False)
    assert load_model("espnetv2", res.checkpoint).version == res.version


def test_lwf_term_changes_training(model, tmp_path: Path) -> None:
    """Student = teacher at step 1 (KL = 0); from step 2 on the distillation term changes the run."""
    train = LabelledFolder(VOC, TRAIN_STEMS)
    plain = finetune(model, train, tmp_path / "plain", config=_cfg(epochs=1), progress=False)
    lwf = finetune(model, train, tmp_path / "lwf", unlabelled=UNLABELLED,
                   config=_cfg(epochs=1, lwf_weight=5.0, lwf_batch_size=1), progress=False)
    assert lwf.runs[0]["train_loss"][0] != pytest.approx(plain.runs[0]["train_loss"][0], rel=1e-6)
    a = torch.load(plain.checkpoint, map_location="cpu", weights_only=True)
    b = torch.load(lwf.checkpoint, map_location="cpu", weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    side = read_sidecar(lwf.checkpoint)
    assert side["data"]["unlabelled"]["count"] == 13 and side["hyperparameters"]["lwf_weight"] == 5.0
    assert lwf.version != plain.version


def test_lr_grid_chooses_by_val_miou(model, tmp_path: Path) -> None:
    train = LabelledFolder(VOC, TRAIN_STEMS[:2])
    val = LabelledFolder(VOC, VAL_STEMS)
    res = finetune(model, train, tmp_path / "grid", val=val, config=_cfg(epochs=1, lrs=(1e-5, 5e-2)),
                   progress=False)
    assert [r["lr"] for r in res.runs] == [1e-5, 5e-2]
    # the LR is chosen by ground-truth-class mIoU on val (robust to one spurious class)
    best = max(res.runs, key=lambda r: r["val_gt_miou"])
    assert res.lr == best["lr"] and res.val_miou == best["val_miou"]
    assert all(0.0 <= r["val_gt_miou"] <= 1.0 for r in res.runs)
    side = json.loads((tmp_path / "grid" / "model.pth.json").read_text())
    assert side["lr"] == res.lr and len(side["metrics"]["runs"]) == 2
    assert side["data"]["val"]["stems"] == VAL_STEMS


def test_finetune_bad_requests(model, tmp_path: Path) -> None:
    train = LabelledFolder(VOC, TRAIN_STEMS[:2])
    with pytest.raises(MadsegError, match="needs a validation set"):
        finetune(model, train, tmp_path / "x", config=FinetuneConfig(epochs=1, lrs=(1e-5, 1e-4)),
                 progress=False)
    tfl = load_model("tflite")
    with pytest.raises(MadsegError, match="cannot be fine-tuned"):
        finetune(tfl, train, tmp_path / "y", config=_cfg(), progress=False)
    with pytest.raises(MadsegError, match="learning rates must be positive"):
        finetune(model, train, tmp_path / "z", config=_cfg(lrs=(0.0,)), progress=False)
    folder = _copy_labelled(tmp_path / "bad", ["voc_0"])
    write_mask(folder / "masks" / "voc_0.png", np.full((513, 513), 30, np.uint8))
    with pytest.raises(MaskError, match=r"voc_0\.png: mask has values \[30\]"):
        finetune(model, LabelledFolder(folder), tmp_path / "w", config=_cfg(), progress=False)
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").rglob("*.pth"))


def test_cli_finetune_and_errors(tmp_path: Path, capsys) -> None:
    from projects.cli import main

    train_dir = _copy_labelled(tmp_path / "t", TRAIN_STEMS[:2])
    rc = main(["finetune", "--model", "espnetv2", "--option", "scale=0.5", "--option", f"input_size={SIZE}",
               "--train", str(train_dir), "--out", str(tmp_path / "o"),
               "--epochs", "1", "--lr", "1e-3", "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "new version:    espnetv2-s0.5-128@" in out
    assert (tmp_path / "o" / "model.pth").is_file()
    rc = main(["finetune", "--model", "espnetv2", "--train", str(tmp_path / "missing"),
               "--out", str(tmp_path / "p"), "--lr", "1e-3"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing: no images/ sub-folder" in err and "Traceback" not in err


def test_torchvision_model_finetunes_and_reloads_from_sidecar(tmp_path: Path) -> None:
    tv = load_model("torchvision:lraspp_mobilenet_v3_large", weights=None, input_size=96, device="cpu")
    res = finetune(tv, LabelledFolder(VOC, TRAIN_STEMS[:2]), tmp_path / "tv", config=_cfg(epochs=1),
                   progress=False)
    assert res.spec.options == {"input_size": [96, 96], "num_classes": 21}
    again = load_model("torchvision:lraspp_mobilenet_v3_large", res.checkpoint)  # options from the sidecar
    assert again.version == res.version != tv.version and again.input_size == (96, 96)


# ------------------------------------------------------------------------------------------------
# stability: gradient clipping and the non-finite guard
# ------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_the_run_and_writes_no_checkpoint(model, tmp_path: Path, monkeypatch) -> None:
    import ml_backend.finetune as ft

    real = ft.segmentation_loss
    calls = {"n": 0}

    def nan_on_third(logits, masks):
        calls["n"] += 1
        loss = real(logits, masks)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(ft, "segmentation_loss", nan_on_third)
    train = LabelledFolder(VOC, TRAIN_STEMS)  # 2 steps per epoch: the third call is epoch 2, step 1
    with pytest.raises(ft.NonFiniteLossError, match=r"loss became nan in run lr0_0\.001 .*epoch 2/3, step 1"):
        finetune(model, train, tmp_path / "nan", config=_cfg(epochs=3), progress=False)
    assert not list((tmp_path / "nan").rglob("model.pth"))
    # positive control: the same run without the forced NaN finishes and writes its checkpoint
    monkeypatch.setattr(ft, "segmentation_loss", real)
    res = finetune(model, train, tmp_path / "ok", config=_cfg(epochs=3), progress=False)
    assert res.checkpoint.is_file()


def test_unclipped_divergence_is_caught_and_clipping_keeps_it_finite(model, tmp_path: Path) -> None:
    """At LR 0.02 the unclipped run diverges (NaN, caught with a clear error, no model.pth); the
    default global-norm clip keeps the very same run finite."""
    train = LabelledFolder(VOC, TRAIN_STEMS)
    with pytest.raises(MadsegError, match=r"(loss|gradient norm) became (nan|inf) in run lr0_0\.02"):
        finetune(model, train, tmp_path / "raw", config=_cfg(epochs=4, lrs=(0.02,), clip_grad_norm=None),
                 progress=False)
    assert not list((tmp_path / "raw").rglob("model.pth"))
    res = finetune(model, train, tmp_path / "clip", config=_cfg(epochs=4, lrs=(0.02,)), progress=False)
    assert all(np.isfinite(v) for v in res.runs[0]["train_loss"])


def test_clipping_bounds_the_update(model, tmp_path: Path) -> None:
    """One plain SGD step (no momentum/decay) moves the weights by lr * min(||g||, clip) exactly."""
    train = LabelledFolder(VOC, TRAIN_STEMS[:2])
    before = {k: v.float() for k, v in model.checkpoint_state().items()}

    def step_norm(clip: float | None, name: str) -> float:
        cfg = _cfg(epochs=1, lrs=(0.01,), momentum=0.0, weight_decay=0.0, clip_grad_norm=clip)
        res = finetune(model, train, tmp_path / name, config=cfg, progress=False)
        after = torch.load(res.checkpoint, map_location="cpu", weights_only=True)
        return float(torch.sqrt(sum(((after[k].float() - before[k]) ** 2).sum() for k in before
                                    if before[k].is_floating_point() and "running" not in k)))

    free = step_norm(None, "free")
    clipped = step_norm(0.5, "clipped")
    assert free > 0.01 * 0.5 * 2  # the raw gradient norm is well above the clip (positive control)
    assert clipped == pytest.approx(0.01 * 0.5, rel=1e-3)


def test_lwf_with_its_default_weight_stays_finite(model, tmp_path: Path) -> None:
    """LwF (default weight 1, T = 2) on a few shared images at a high LR: finite for 4 epochs."""
    train = LabelledFolder(VOC, TRAIN_STEMS)
    cfg = _cfg(epochs=4, lrs=(0.01,))
    assert cfg.lwf_weight == 1.0
    res = finetune(model, train, tmp_path / "lwf", unlabelled=UNLABELLED, config=cfg, progress=False)
    losses = res.runs[0]["train_loss"]
    assert len(losses) == 4 and all(np.isfinite(v) and v < 10 for v in losses), losses


# ------------------------------------------------------------------------------------------------
# learning more from each label
# ------------------------------------------------------------------------------------------------


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_encoder_lr_mult_zero_trains_only_the_decoder(model, tmp_path: Path) -> None:
    train = LabelledFolder(VOC, TRAIN_STEMS[:2])
    res = finetune(model, train, tmp_path / "dec", config=_cfg(epochs=1, encoder_lr_mult=0.0), progress=False)
    before, after = model.checkpoint_state(), _weights(res.checkpoint)
    enc = [k for k in before if k.startswith("base_net.") and before[k].is_floating_point()]
    dec = [k for k in before if not k.startswith("base_net.") and "running" not in k
           and before[k].is_floating_point()]
    assert enc and dec
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    # positive control: with the default multiplier the encoder moves too
    res2 = finetune(model, train, tmp_path / "all", config=_cfg(epochs=1), progress=False)
    assert any(not torch.equal(before[k], _weights(res2.checkpoint)[k]) for k in enc)


def test_l2sp_keeps_the_weights_closer_to_the_parent(model, tmp_path: Path) -> None:
    train = LabelledFolder(VOC, TRAIN_STEMS)
    before = {k: v.float() for k, v in model.checkpoint_state().items()}

    def dist(res) -> float:
        w = _weights(res.checkpoint)
        return float(sum(((w[k].float() - before[k]) ** 2).sum() for k in before if "running" not in k))

    plain = finetune(model, train, tmp_path / "p", config=_cfg(epochs=3), progress=False)
    sp = finetune(model, train, tmp_path / "sp", config=_cfg(epochs=3, l2sp_weight=100.0), progress=False)
    assert dist(sp) < 0.8 * dist(plain)


def test_ema_result_differs_from_the_last_weights(model, tmp_path: Path) -> None:
    train = LabelledFolder(VOC, TRAIN_STEMS)
    plain = finetune(model, train, tmp_path / "p", config=_cfg(epochs=2), progress=False)
    ema = finetune(model, train, tmp_path / "e", config=_cfg(epochs=2, ema_decay=0.5), progress=False)
    a, b, parent = _weights(plain.checkpoint), _weights(ema.checkpoint), model.checkpoint_state()
    k = next(k for k in a if k.startswith("bu_dec_l4") and a[k].is_floating_point())
    # the average lies between the parent and the last weights: closer to the parent than plain
    assert float((b[k] - parent[k]).norm()) < float((a[k] - parent[k]).norm())


def test_balanced_weights_and_plan() -> None:
    from ml_backend.finetune import balanced_weights

    w = balanced_weights([[0, 15], [0, 15], [0, 15], [0, 8]])
    assert w == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert balanced_weights([[0], [0, 3]]) == pytest.approx([0.5, 0.5])
    cfg = FinetuneConfig(batch_size=2, seed=1)
    plan = epoch_plan(4, 0, 0, cfg, 0, weights=np.array([0.0, 0.0, 0.0, 1.0]))
    assert len(plan) == 2 and all((p["train"] == 3).all() for p in plan)


def test_pseudo_labels_from_agreement_and_training_with_them(model, tmp_path: Path) -> None:
    from ml_backend.pseudolabels import agreement_label, write_agreement_labels

    a = np.array([[1, 1], [2, 0]])
    b = np.array([[1, 3], [2, 0]])
    assert agreement_label([a, b]).tolist() == [[1, 255], [2, 0]]
    with pytest.raises(MadsegError, match="at least 2"):
        agreement_label([a])
    imgs = [VOC / "images" / f"{s}.png" for s in VAL_STEMS]
    from ml_backend.imageio import read_rgb

    preds = []
    for p in imgs:
        h, w = read_rgb(p).shape[:2]
        m1 = np.zeros((h, w), np.uint8)
        m2 = m1.copy()
        m2[: h // 4] = 5  # they disagree on the top quarter only
        preds.append([m1, m2])
    stems = write_agreement_labels(imgs, preds, tmp_path / "pseudo", min_coverage=0.5)
    assert stems == VAL_STEMS
    pf = LabelledFolder(tmp_path / "pseudo")
    mask = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(pf.pairs[0][1]))
    assert (mask[:1] == 255).all() and (mask[-1:] == 0).all()
    assert write_agreement_labels(imgs, preds, tmp_path / "none", min_coverage=0.9) == []
    train = LabelledFolder(VOC, TRAIN_STEMS[:2])
    plain = finetune(model, train, tmp_path / "plain", config=_cfg(epochs=1), progress=False)
    res = finetune(model, train, tmp_path / "ps", pseudo=pf, config=_cfg(epochs=1), progress=False)
    assert read_sidecar(res.checkpoint)["data"]["pseudo"]["count"] == 2
    assert res.runs[0]["train_loss"][0] != pytest.approx(plain.runs[0]["train_loss"][0], rel=1e-6)


def test_presets_are_one_source_and_cli_uses_them(tmp_path: Path, capsys) -> None:
    from ml_backend.finetune import PRESETS, preset_config
    from projects.experiment import FINETUNE_PRESETS

    assert set(PRESETS) == {"demo", "paper"} == set(FINETUNE_PRESETS)
    for name, cfg in PRESETS.items():
        cfg.validate()
        assert FINETUNE_PRESETS[name]["lrs"] == tuple(cfg.lrs)
        assert FINETUNE_PRESETS[name]["epochs"] == cfg.epochs
        assert FINETUNE_PRESETS[name]["scale_range"] == tuple(cfg.scale_range)
    assert PRESETS["paper"].epochs == 80 and PRESETS["paper"].lrs == (1e-5, 5e-5, 1e-4)
    assert preset_config("paper", epochs=3).epochs == 3 and PRESETS["paper"].epochs == 80
    with pytest.raises(MadsegError, match="preset 'nope' unknown"):
        preset_config("nope")
    with pytest.raises(MadsegError, match="unknown setting"):
        preset_config("demo", bogus=1)

    from projects.cli import main

    train_dir = _copy_labelled(tmp_path / "t", TRAIN_STEMS[:2])
    rc = main(["finetune", "--model", "espnetv2", "--option", "scale=0.5", "--option", f"input_size={SIZE}",
               "--train", str(train_dir), "--out", str(tmp_path / "o"), "--preset", "paper",
               "--epochs", "1", "--lr", "1e-3", "--encoder-lr-mult", "0.1", "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    hp = read_sidecar(tmp_path / "o" / "model.pth")["hyperparameters"]
    assert hp["epochs"] == 1 and hp["lrs"] == [1e-3] and hp["encoder_lr_mult"] == 0.1
    assert hp["scale_range"] == list(PRESETS["paper"].scale_range)
    # the demo preset counts steps; an explicit --epochs replaces them, --steps sets them
    assert PRESETS["demo"].steps == 40
    rc = main(["finetune", "--model", "espnetv2", "--option", "scale=0.5", "--option", f"input_size={SIZE}",
               "--train", str(train_dir), "--out", str(tmp_path / "d"), "--steps", "3", "--no-progress",
               "--device", "cpu"])
    hp = read_sidecar(tmp_path / "d" / "model.pth")["hyperparameters"]
    assert rc == 0 and hp["steps"] == 3 and hp["epochs"] == 3 and hp["lrs"] == list(PRESETS["demo"].lrs)


def test_steps_replace_epochs(model, tmp_path: Path) -> None:
    """``steps`` = 5 SGD steps over 4 pairs in batches of 2 (2 steps per epoch) -> 3 epochs."""
    res = finetune(model, LabelledFolder(VOC, TRAIN_STEMS), tmp_path / "s", config=_cfg(epochs=1, steps=5),
                   progress=False)
    assert len(res.runs[0]["train_loss"]) == 3
    assert read_sidecar(res.checkpoint)["hyperparameters"]["epochs"] == 3
    with pytest.raises(MadsegError, match="steps must be >= 1"):
        FinetuneConfig(steps=0).validate()
