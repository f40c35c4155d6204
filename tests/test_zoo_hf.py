"""``hf`` zoo entries: tiny randomly initialised SegFormer and UperNet(ConvNeXt) folders saved with
``save_pretrained`` and loaded back offline: shapes, the image processor's normalisation, content
versions, a fine-tune step through ml_backend.finetune and its reload."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from ml_backend.classes import VOC_CLASSES
from ml_backend.datasets import LabelledFolder
from ml_backend.errors import ModelError
from ml_backend.finetune import FinetuneConfig, finetune
from ml_backend.shared import shared_dir
from ml_backend.zoo import TorchSegmentationModel, load_model, load_model_spec
from ml_backend.zoo.hf_entry import processor_settings

VOC = shared_dir() / "data" / "voc_samples"
ID2LABEL = dict(enumerate(VOC_CLASSES))

pytestmark = pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")


def _segformer(folder: Path, seed: int = 0, size: int = 64, labels: dict[int, str] = ID2LABEL) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        num_attention_heads=[1, 1], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=16, num_labels=len(labels),
        id2label=labels, label2id={v: k for k, v in labels.items()},
    )
    transformers.SegformerForSemanticSegmentation(cfg).save_pretrained(folder)
    transformers.SegformerImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def _upernet(folder: Path) -> Path:
    torch.manual_seed(1)
    backbone = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.UperNetConfig(backbone_config=backbone, hidden_size=16, use_auxiliary_head=False,
                                     num_labels=21, id2label=ID2LABEL,
                                     label2id={v: k for k, v in ID2LABEL.items()})
    transformers.UperNetForSemanticSegmentation(cfg).save_pretrained(folder)
    # UperNet checkpoints on the Hub ship a SegFormer-style processor; normalise like it, 0.5/0.5 here
    transformers.SegformerImageProcessor(size={"height": 96, "width": 64}, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def segformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _segformer(tmp_path_factory.mktemp("hf") / "segformer-tiny")


def test_segformer_loads_offline_and_predicts_at_original_size(segformer: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("hf", segformer, device="cpu")
    assert isinstance(model, TorchSegmentationModel) and model.trainable
    assert model.input_size == (64, 64) and model.num_classes == 21 and model.class_names == VOC_CLASSES
    assert model.version.startswith("hf-segformer-tiny-64@")
    assert model.spec.options["pretrained"] == str(segformer.resolve())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model.module(x)
    assert logits.shape == (2, 21, 64, 64)  # SegFormer's 1/4-size logits, upsampled by the wrapper
    probs = model.forward(x)
    assert torch.allclose(probs.sum(1), torch.ones(2, 64, 64), atol=1e-5)
    images = [np.zeros((30, 50, 3), np.uint8), np.full((77, 13, 3), 200, np.uint8)]
    assert [p.shape for p in model.predict(images)] == [(30, 50), (77, 13)]
    proba = model.predict_proba(images[:1])[0]
    assert proba.shape == (21, 30, 50) and np.allclose(proba.sum(0), 1, atol=1e-4)
    assert load_model(f"hf:{segformer}").version == model.version


def test_preprocessing_is_the_image_processors(segformer: Path) -> None:
    model = load_model("hf", segformer)
    proc = transformers.AutoImageProcessor.from_pretrained(str(segformer), local_files_only=True)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # at the model's size
    ours = model.preprocessor()(image)
    theirs = torch.as_tensor(np.asarray(proc(images=image, return_tensors="np")["pixel_values"][0]))
    assert torch.allclose(ours, theirs.float(), atol=1e-4)
    # rescale/normalise settings other than the default map to the same affine transform
    settings = {"size": {"shortest_edge": 32}, "do_rescale": False, "do_normalize": True,
                "image_mean": [100.0] * 3, "image_std": [50.0] * 3}
    size, mean, std = processor_settings(settings)
    p = 200.0
    assert size == (32, 32) and abs((p / 255 - mean[0]) / std[0] - (p - 100.0) / 50.0) < 1e-9


def test_versions_are_content_hashes(segformer: Path, tmp_path: Path) -> None:
    a = load_model("hf", segformer)
    moved = tmp_path / "segformer-tiny"
    shutil.copytree(segformer, moved)
    assert load_model("hf", moved).version == a.version  # same files, other path
    other_weights = _segformer(tmp_path / "w" / "segformer-tiny", seed=5)
    assert load_model("hf", other_weights).version != a.version
    assert load_model("hf", segformer, input_size=128).version != a.version  # output-affecting option
    other_proc = _segformer(tmp_path / "p" / "segformer-tiny", size=96)  # same seed, other processor
    assert load_model("hf", other_proc).version != a.version


def test_upernet_convnext(tmp_path: Path) -> None:
    model = load_model("hf", _upernet(tmp_path / "upernet-convnext-tiny"))
    assert model.input_size == (96, 64) and model.mean == pytest.approx((0.5,) * 3)
    with torch.no_grad():
        assert model.module(torch.randn(1, 3, 96, 64)).shape == (1, 21, 96, 64)
    assert model.predict([np.zeros((40, 70, 3), np.uint8)])[0].shape == (40, 70)
    assert model.version.startswith("hf-upernet-convnext-tiny-96x64@")


@pytest.mark.slow
def test_finetune_step_and_reload(segformer: Path, tmp_path: Path) -> None:
    model = load_model("hf", segformer)
    before = {k: v.clone() for k, v in model.checkpoint_state().items()}
    assert set(before) == set(model.module.net.state_dict())  # the transformers model's own keys
    train = LabelledFolder(VOC, ["voc_0", "voc_1"])
    cfg = FinetuneConfig(epochs=1, batch_size=2, lrs=(1e-2,), num_workers=0, crop_size=(64, 64))
    res = finetune(model, train, tmp_path / "ft", config=cfg, progress=False)
    assert res.checkpoint.is_file() and res.version != model.version
    assert res.spec.name == "hf" and res.spec.options["pretrained"] == str(segformer.resolve())
    tuned = load_model_spec({"name": "hf", "checkpoint": str(res.checkpoint),
                             "options": dict(res.spec.options)})
    assert tuned.version == res.version
    after = tuned.checkpoint_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step changed weights
    # the sidecar alone names the folder: checkpoint= without pretrained= reloads too
    assert load_model("hf", res.checkpoint).version == res.version


def test_bad_hf_inputs(tmp_path: Path, segformer: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match=r"hf: .*nowhere not found; give a local model folder"):
        load_model("hf", str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"empty has no config\.json"):
        load_model("hf", empty)
    broken = tmp_path / "broken"
    shutil.copytree(segformer, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match=r"broken does not load as a semantic-segmentation model"):
        load_model("hf", broken)
    no_proc = tmp_path / "noproc"
    shutil.copytree(segformer, no_proc)
    (no_proc / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match=r"noproc has no image processor.*pass input_size, mean and std"):
        load_model("hf", no_proc)
    assert load_model("hf", no_proc, input_size=64, mean=[0.5] * 3, std=[0.5] * 3).input_size == (64, 64)
    with pytest.raises(ModelError, match=r"has 21 labels but class_names has 2"):
        load_model("hf", segformer, class_names=["a", "b"])
    with pytest.raises(ModelError, match=r"trust_remote_code is not supported"):
        load_model("hf", segformer, trust_remote_code=True)
    with pytest.raises(ModelError, match=r"hf: no model folder given"):
        load_model("hf")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ModelError, match=r"need the transformers package; install it with `pip install"):
        load_model("hf", segformer)
