"""The model zoo: every entry kind loads, predicts at the original size, and fails clearly."""

from __future__ import annotations

import json
import pickle
import shutil
import urllib.error
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as tfl
from torch import nn

from ml_backend.datasets import LabelledFolder
from ml_backend.errors import MadsegError, ModelError
from ml_backend.evaluate import evaluate
from ml_backend.imageio import read_mask, read_rgb
from ml_backend.metrics import dataset_miou
from ml_backend.shared import shared_dir
from ml_backend.zoo import (
    ModelSpec,
    check_tflite_io,
    file_sha256,
    list_models,
    load_model,
    load_model_spec,
    read_model_specs,
    shared_model_specs,
)
from ml_backend.zoo import base as zoo_base
from ml_backend.zoo.base import upsample_labels

SHARED = shared_dir()
VOC = SHARED / "data" / "voc_samples"
ESP = SHARED / "models" / "espnetv2"
TFLITE = SHARED / "models" / "tflite" / "deeplabv3_mnv2_dm05_voc.tflite"


pytestmark = pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")


def _voc(stem: str) -> tuple[np.ndarray, np.ndarray]:
    return read_rgb(VOC / "images" / f"{stem}.png"), read_mask(VOC / "masks" / f"{stem}.png", 21)


# ------------------------------------------------------------------------------------------------
# TFLite
# ------------------------------------------------------------------------------------------------


def test_tflite_shared_model_predicts_a_voc_image() -> None:
    model = load_model("tflite", str(TFLITE), device="cpu")
    assert model.input_size == (513, 513) and model.num_classes == 21 and model.module is None
    image, gt = _voc("voc_1")
    crop = image[40:300, 10:420]  # a non-square crop: output must come back at this size
    pred_full, pred_crop = model.predict([image, crop], batch_size=2)
    assert pred_full.shape == gt.shape and pred_crop.shape == crop.shape[:2]
    valid = gt != 255
    assert (pred_full[valid] == gt[valid]).mean() > 0.85
    gt_classes = set(np.unique(gt[valid]).tolist()) - {0}
    pred_classes = set(np.unique(pred_full).tolist()) - {0}
    assert gt_classes & pred_classes, (gt_classes, pred_classes)
    proba = model.predict_proba([crop])[0]
    assert proba.shape == (21, *crop.shape[:2]) and proba.dtype == np.float32
    assert np.allclose(proba.sum(0), 1.0, atol=1e-4)
    # batched and single-image inference agree
    assert np.array_equal(model.predict([crop], batch_size=1)[0], pred_crop)


def _tiny_tflite(path: Path, in_shape: list[int], n_out: int, reshape_to: list[int] | None = None) -> Path:
    """Write a real .tflite file: a 1x1 CONV_2D (channel k -> class k+1, class 0 = 0) [+ RESHAPE]."""
    cin = in_shape[-1]
    weights = np.zeros((n_out, 1, 1, cin), np.float32)
    for k in range(min(cin, n_out - 1)):
        weights[k + 1, 0, 0, k] = 1.0
    bias = np.zeros(n_out, np.float32)
    buffers = [tfl.BufferT()]

    def buf(arr: np.ndarray) -> int:
        b = tfl.BufferT()
        b.data = np.frombuffer(np.ascontiguousarray(arr).tobytes(), np.uint8).tolist()
        buffers.append(b)
        return len(buffers) - 1

    def tensor(name: str, shape: list[int], buffer: int = 0, dtype: int = tfl.TensorType.FLOAT32) -> object:
        t = tfl.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), dtype, buffer
        return t

    tensors = [tensor("image", in_shape), tensor("w", list(weights.shape), buf(weights)),
               tensor("b", [n_out], buf(bias)), tensor("scores", [*in_shape[:3], n_out])]
    conv_code = tfl.OperatorCodeT()
    conv_code.builtinCode = conv_code.deprecatedBuiltinCode = tfl.BuiltinOperator.CONV_2D
    conv_code.version = 1
    conv = tfl.OperatorT()
    conv.opcodeIndex, conv.inputs, conv.outputs = 0, [0, 1, 2], [3]
    conv.builtinOptionsType = tfl.BuiltinOptions.Conv2DOptions
    opts = tfl.Conv2DOptionsT()
    opts.padding, opts.strideW, opts.strideH = tfl.Padding.SAME, 1, 1
    conv.builtinOptions = opts
    codes, ops, out = [conv_code], [conv], 3
    if reshape_to is not None:
        new_shape = buf(np.array(reshape_to, np.int32))
        tensors += [tensor("shape", [len(reshape_to)], new_shape, tfl.TensorType.INT32),
                    tensor("flat", reshape_to)]
        rcode = tfl.OperatorCodeT()
        rcode.builtinCode = rcode.deprecatedBuiltinCode = tfl.BuiltinOperator.RESHAPE
        rcode.version = 1
        rop = tfl.OperatorT()
        rop.opcodeIndex, rop.inputs, rop.outputs = 1, [3, 4], [5]
        rop.builtinOptionsType = tfl.BuiltinOptions.ReshapeOptions
        ropts = tfl.ReshapeOptionsT()
        ropts.newShape = list(reshape_to)
        rop.builtinOptions = ropts
        codes.append(rcode)
        ops.append(rop)
        out = 5
    sg = tfl.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = tensors, [0], [out], ops, "main"
    model = tfl.ModelT()
    model.version, model.subgraphs, model.operatorCodes, model.buffers = 3, [sg], codes, buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


def test_tflite_generic_model_other_size_and_classes(tmp_path: Path) -> None:
    path = _tiny_tflite(tmp_path / "tiny.tflite", [1, 8, 8, 3], 4)
    model = load_model("tflite", path, device="cpu", mean=[0, 0, 0], std=[1, 1, 1])
    assert model.input_size == (8, 8) and model.num_classes == 4
    assert model.class_names == ("class_0", "class_1", "class_2", "class_3")
    red, blue = np.zeros((20, 30, 3), np.uint8), np.zeros((5, 7, 3), np.uint8)
    red[..., 0] = 255
    blue[..., 2] = 255
    p_red, p_blue, p_black = model.predict([red, blue, np.zeros((9, 9, 3), np.uint8)], batch_size=3)
    assert p_red.shape == (20, 30) and (p_red == 1).all()
    assert p_blue.shape == (5, 7) and (p_blue == 3).all()
    assert (p_black == 0).all()  # all-zero logits: argmax picks class 0
    assert load_model("tflite", path, device="cpu", mean=[0, 0, 0], std=[1, 1, 1]).version == model.version
    assert load_model("tflite", path, device="cpu").version != model.version  # normalisation matters


def test_tflite_unexpected_shapes_are_refused(tmp_path: Path) -> None:
    flat = _tiny_tflite(tmp_path / "flat.tflite", [1, 8, 8, 3], 4, reshape_to=[1, 256])
    with pytest.raises(ModelError, match=r"flat\.tflite: unexpected output shape \[1, 256\]"):
        load_model("tflite", flat)
    four_channel = _tiny_tflite(tmp_path / "rgba.tflite", [1, 8, 8, 4], 4)
    with pytest.raises(ModelError, match=r"rgba\.tflite: unexpected input shape \[1, 8, 8, 4\]"):
        load_model("tflite", four_channel)
    label_map = [{"name": "out", "index": 1, "shape": np.array([1, 65, 65]), "dtype": np.int64}]
    image_in = [{"name": "in", "index": 0, "shape": np.array([1, 65, 65, 3]), "dtype": np.float32}]
    with pytest.raises(ModelError, match=r"m\.tflite: unexpected output shape \[1, 65, 65\] \(a label map"):
        check_tflite_io(image_in, label_map, "m.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(ModelError, match=r"junk\.tflite"):
        load_model("tflite", junk)


# ------------------------------------------------------------------------------------------------
# torchvision builders (random weights here: no network)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_torchvision_builders_random_weights(builder: str) -> None:
    model = load_model(f"torchvision:{builder}", weights=None, input_size=64, device="cpu")
    assert model.input_size == (64, 64) and model.num_classes == 21 and model.trainable
    x = torch.stack([model.preprocessor()(np.zeros((30, 50, 3), np.uint8))] * 2)
    assert x.shape == (2, 3, 64, 64)
    probs = model.forward(x)
    assert probs.shape == (2, 21, 64, 64) and torch.allclose(probs.sum(1), torch.ones(2, 64, 64), atol=1e-5)
    with torch.no_grad():
        logits = model.module(x)
    assert logits.shape == (2, 21, 64, 64)
    preds = model.predict([np.zeros((30, 50, 3), np.uint8), np.zeros((17, 9, 3), np.uint8)])
    assert [p.shape for p in preds] == [(30, 50), (17, 9)]
    again = load_model(f"torchvision:{builder}", weights="random", input_size=64, device="cpu")
    assert again.version == model.version
    assert load_model(f"torchvision:{builder}", weights=None, seed=1, input_size=64).version != model.version


def test_torchvision_local_checkpoint_and_mismatch(tmp_path: Path) -> None:
    model = load_model("torchvision:lraspp_mobilenet_v3_large", weights=None, num_classes=5, input_size=64)
    ckpt = tmp_path / "lraspp5.pth"
    torch.save(model.checkpoint_state(), ckpt)
    loaded = load_model("torchvision:lraspp_mobilenet_v3_large", ckpt, input_size=64)
    assert loaded.num_classes == 5  # read from the checkpoint's classifier
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded.forward(x), model.forward(x), atol=1e-6)
    msg = r"lraspp5\.pth does not fit torchvision:deeplabv3_mobilenet_v3_large.*(missing|unexpected|shape)"
    with pytest.raises(ModelError, match=msg):
        load_model("torchvision:deeplabv3_mobilenet_v3_large", ckpt)


def test_torchvision_weights_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No internet here: the download fails and the error says what to do (the download is mocked so
    the test never waits on a network timeout)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError, match=r"could not be downloaded.*checkpoint=.*TORCH_HOME") as err:
        load_model("torchvision:lraspp_mobilenet_v3_large")
    assert "lraspp_mobilenet_v3_large-d234d4ea.pth" in str(err.value)

    # pre-seeding TORCH_HOME with the file makes the same call work offline
    seed = load_model("torchvision:lraspp_mobilenet_v3_large", weights=None, input_size=64)
    target = tmp_path / "torch" / "hub" / "checkpoints" / "lraspp_mobilenet_v3_large-d234d4ea.pth"
    target.parent.mkdir(parents=True)
    torch.save(seed.checkpoint_state(), target)
    model = load_model("torchvision:lraspp_mobilenet_v3_large", input_size=64)
    assert model.class_names[:2] == ("background", "aeroplane")
    assert model.checkpoint == target
    listed = {e["name"]: e for e in list_models()}
    assert listed["torchvision:lraspp_mobilenet_v3_large"]["checkpoints"] == [str(target)]


# ------------------------------------------------------------------------------------------------
# TorchScript and torch.export files
# ------------------------------------------------------------------------------------------------


class TinySeg(nn.Module):
    """A small fully convolutional net: [B, 3, H, W] -> logits [B, 3, H/2, W/2]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


def _reference_probs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = net(x)
    up = torch.nn.functional.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
    return torch.softmax(up, 1)


def test_torchscript_and_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinySeg().eval()
    x = torch.randn(3, 3, 32, 32)
    expected = _reference_probs(net, x)

    ts_path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 32, 32)), str(ts_path))
    ts = load_model(str(ts_path), input_size=32, device="cpu")
    assert ts.num_classes == 3 and ts.input_size == (32, 32) and not ts.trainable
    assert torch.allclose(ts.forward(x), expected, atol=1e-5)

    ep_path = tmp_path / "tiny_static.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 3, 32, 32),)), str(ep_path))
    ep = load_model(str(ep_path), device="cpu")
    assert ep.input_size == (32, 32)  # read from the exported program
    assert torch.allclose(ep.forward(x), expected, atol=1e-5)  # batch 3 through a batch-1 program

    dyn_path = tmp_path / "tiny_dynamic.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},)),
                      str(dyn_path))
    dyn = load_model(str(dyn_path), device="cpu")
    assert torch.allclose(dyn.forward(x), expected, atol=1e-5) and not dyn.per_sample
    image = np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)
    assert dyn.predict([image])[0].shape == (45, 70)
    assert ts.version != ep.version and load_model(str(ep_path)).version == ep.version


def test_bad_model_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match=r"junk\.pt: neither a TorchScript nor a torch.export program"):
        load_model(str(junk))
    with pytest.raises(ModelError, match=r"nothere\.pt2: file not found"):
        load_model(str(tmp_path / "nothere.pt2"))

    class Classifier(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    cls_path = tmp_path / "classifier.pt"
    torch.jit.save(torch.jit.trace(Classifier(), torch.zeros(1, 3, 16, 16)), str(cls_path))
    msg = r"classifier\.pt \(TorchScript\) returned \(1, 3\).*logits \[B, C, h, w\]"
    with pytest.raises(ModelError, match=msg):
        load_model(str(cls_path), input_size=16)


# ------------------------------------------------------------------------------------------------
# ESPNetv2 / DiCENet entries
# ------------------------------------------------------------------------------------------------


def test_espnetv2_predicts_at_original_size_and_agrees_with_preprocessed_path() -> None:
    model = load_model("espnetv2", ESP / "espnetv2_s_0.5_pascal_256x256.pth", device="cpu")
    assert model.spec.options == {"scale": 0.5, "input_size": [256, 256], "num_classes": 21}
    assert model.input_size == (256, 256) and model.class_names[15] == "person"
    coco = sorted((SHARED / "data" / "coco_voc" / "images").glob("*.jpg"))[0]
    images = [read_rgb(coco), _voc("voc_0")[0]]
    preds = model.predict(images, batch_size=2)
    assert [p.shape for p in preds] == [im.shape[:2] for im in images]
    prep = pickle.loads(pickle.dumps(model.preprocessor()))  # DataLoader workers need this
    x = torch.stack([prep(im) for im in images])
    assert x.shape == (2, 3, 256, 256) and x.dtype == torch.float32
    via_input = model.predict_from_input(x, [im.shape[:2] for im in images])
    assert all(np.array_equal(a, b) for a, b in zip(preds, via_input, strict=True))
    # the prediction is sane: most labelled pixels of the VOC image are right
    gt = _voc("voc_0")[1]
    assert (preds[1][gt != 255] == gt[gt != 255]).mean() > 0.8


def test_shared_defaults_scale_inference_and_dicenet(tmp_path: Path) -> None:
    default = load_model("espnetv2", scale=0.5)
    assert default.checkpoint and default.checkpoint.name == "espnetv2_s_0.5_pascal_384x384.pth"
    at256 = load_model("espnetv2", scale=0.5, input_size=256)
    assert at256.checkpoint and at256.checkpoint.name == "espnetv2_s_0.5_pascal_256x256.pth"
    renamed = tmp_path / "weights.pth"
    shutil.copy(ESP / "espnetv2_s_1.0_pascal_256x256.pth", renamed)
    inferred = load_model("espnetv2", renamed)
    assert inferred.spec.options["scale"] == 1.0  # from the parameter shapes
    dice = load_model("dicenet", scale=0.5)
    assert dice.input_size == (256, 256) and dice.version.startswith("dicenet-s0.5-256@")
    assert dice.predict([np.zeros((40, 60, 3), np.uint8)])[0].shape == (40, 60)


def test_versions_are_stable_and_content_based(tmp_path: Path) -> None:
    src = ESP / "espnetv2_s_0.5_pascal_256x256.pth"
    a = load_model("espnetv2", src)
    assert load_model("espnetv2", src).version == a.version
    copy = tmp_path / "espnetv2_s_0.5_pascal_256x256.pth"
    shutil.copy(src, copy)
    assert load_model("espnetv2", copy).version == a.version  # same bytes, other path
    assert load_model("espnetv2", src, input_size=320).version != a.version  # output-affecting option
    assert load_model("espnetv2", ESP / "espnetv2_s_0.5_pascal_384x384.pth").version != a.version
    assert a.version.startswith("espnetv2-s0.5-256@") and len(a.version.split("@")[1]) == 12
    assert load_model("espnetv2", src, bf16=True, device="cpu").version == a.version  # bf16 is CUDA-only
    # the hash cache notices a changed file
    h1 = file_sha256(copy)
    state = torch.load(copy, map_location="cpu", weights_only=True)
    state["bu_dec_l4.merge_layer.3.weight"] += 1
    torch.save(state, copy)
    assert file_sha256(copy) != h1
    assert load_model("espnetv2", copy).version != a.version


def test_bad_model_inputs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"unknown model name 'espnet'; use one of espnetv2, dicenet, tfl"):
        load_model("espnet")
    with pytest.raises(ModelError, match=r"unknown torchvision builder 'resnet50'"):
        load_model("torchvision:resnet50")
    with pytest.raises(ModelError, match=r"unknown option\(s\) colour"):
        load_model("espnetv2", scale=0.5, colour="red")
    big = ESP / "espnetv2_s_2.0_pascal_384x384.pth"
    msg = (r"espnetv2_s_2\.0_pascal_384x384\.pth does not fit espnetv2 scale 0\.5.*shape mismatch.*"
           r"base_net\.level1\.conv\.weight: checkpoint \[32, 3, 3, 3\] vs model \[16, 3, 3, 3\]")
    with pytest.raises(ModelError, match=msg):
        load_model("espnetv2", big, scale=0.5)
    with pytest.raises(ModelError, match=r"does not fit dicenet at any scale"):
        load_model("dicenet", big)
    junk = tmp_path / "broken.pth"
    junk.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelError, match=r"broken\.pth: not a readable PyTorch weights file"):
        load_model("espnetv2", junk)
    with pytest.raises(ModelError, match=r"missing\.pth: file not found"):
        load_model("espnetv2", tmp_path / "missing.pth")
    with pytest.raises(ModelError, match=r"input_size 250x250 must be multiples of 16"):
        load_model("espnetv2", scale=0.5, input_size=250)
    with pytest.raises(ModelError, match=r"unsupported scale 3\.0"):
        load_model("espnetv2", scale=3.0, weights=None)
    with pytest.raises(ModelError, match=r"cuda:99"):
        load_model("espnetv2", scale=0.5, device="cuda:99")
    model = load_model("espnetv2", scale=0.5, input_size=256)
    with pytest.raises(MadsegError, match=r"image 0: expected an \(H, W, 3\) uint8 RGB array"):
        model.predict([np.zeros((10, 10), np.float32)])


def test_specs_toml_and_shared_listing(tmp_path: Path) -> None:
    shutil.copy(ESP / "espnetv2_s_0.5_pascal_256x256.pth", tmp_path / "target.pth")
    cfg = tmp_path / "models.toml"
    cfg.write_text(
        '[[models]]\nname = "espnetv2"\ncheckpoint = "target.pth"\nscale = 0.5\ninput_size = 256\n\n'
        '[[models]]\nname = "tflite"\n[models.options]\nnum_threads = 1\n'
    )
    specs = read_model_specs(cfg)
    assert specs[0] == ModelSpec("espnetv2", str(tmp_path / "target.pth"), {"scale": 0.5, "input_size": 256})
    assert specs[1].options == {"num_threads": 1}
    model = load_model_spec(specs[0].to_dict())
    assert model.spec.checkpoint == str(tmp_path / "target.pth")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[models]]\ncheckpoint = 'x.pth'\n")
    with pytest.raises(ModelError, match=r"bad\.toml, models\[0\]: .* needs a 'name'"):
        read_model_specs(bad)
    names = [Path(s.checkpoint).name for s in shared_model_specs() if s.checkpoint]
    assert len(names) == 12 and "deeplabv3_mnv2_dm05_voc.tflite" in names
    assert sum(n.startswith("dicenet") for n in names) == 3


def test_upsample_labels_chunked_matches_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    probs = torch.softmax(torch.randn(5, 24, 32), 0)
    direct = upsample_labels(probs, (301, 417))
    monkeypatch.setattr(zoo_base, "LARGE_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(zoo_base, "_ROW_CHUNK", 37)
    chunked = upsample_labels(probs, (301, 417))
    assert chunked.shape == (301, 417) and (chunked == direct).float().mean() > 0.999


def test_evaluate_matches_predict_then_metrics() -> None:
    model = load_model("espnetv2", scale=0.5, input_size=256)
    folder = LabelledFolder(VOC, subset=["voc_0", "voc_1", "voc_20"])
    miou, per_class = evaluate(model, folder, batch_size=2, progress=False)
    pairs = [(model.predict([read_rgb(i)])[0], read_mask(m, 21)) for i, m in folder.pairs]
    ref_miou, ref_per_class = dataset_miou(pairs, 21)
    assert miou == pytest.approx(ref_miou) and 0.3 < miou <= 1.0
    assert np.allclose(per_class, ref_per_class, equal_nan=True)


def test_selfcheck_and_models_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from projects.cli import main

    out = tmp_path / "sc.json"
    args = ["selfcheck", "--limit", "2", "--models", "espnetv2_s_0.5_pascal_256x256,tflite",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| deeplabv3_mnv2_dm05_voc | tflite-deeplabv3_mnv2_dm05_voc-513@" in table
    assert "espnetv2_s_0.5_pascal_256x256" in table and "coco_voc mIoU (n)" in table
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 4 and {r["dataset"] for r in rows} == {"coco_voc", "voc_samples"}
    assert all(r["n_images"] == 2 and 0.0 <= r["miou"] <= 1.0 for r in rows)
    tfl_voc = next(r for r in rows if r["name"] == "tflite" and r["dataset"] == "voc_samples")
    assert tfl_voc["miou"] > 0.5
    assert main(args) == 0  # a rerun reuses the finished rows
    assert json.loads(out.read_text())["results"] == rows
    capsys.readouterr()
    assert main(["selfcheck", "--models", "nosuchmodel", "--out", str(out)]) == 2
    assert "matches none of" in capsys.readouterr().err
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "espnetv2_s_2.0_pascal_384x384.pth" in listing and "torchvision:fcn_resnet101" in listing


def test_models_listing_has_an_example_for_every_entry(capsys: pytest.CaptureFixture[str]) -> None:
    from projects.cli import main

    entries = list_models()
    names = [e["name"] for e in entries]
    assert {"onnx", "hf", "class_map=<map>"} <= set(names)
    assert all(e["example"].startswith("{ name = ") for e in entries), entries
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "onnx  [onnx, inference only]" in out and "hf  [transformers, trainable]" in out
    assert out.count("    example: ") == len(entries)
    assert "ade20k-voc, coco-panoptic-voc" in out


def test_model_specs_toml_types_and_relative_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "models.toml"

    def specs(text: str) -> list[ModelSpec]:
        cfg.write_text(text)
        return read_model_specs(cfg)

    got = specs('[[models]]\nname = "onnx:sub/m.onnx"\nclass_map = "maps/mine.toml"\n\n'
                '[[models]]\nname = "hf"\ncheckpoint = "segformer"\noptions = { class_map = "ade20k-voc" }\n')
    assert got[0].name == f"onnx:{tmp_path / 'sub' / 'm.onnx'}"
    assert got[0].options == {"class_map": str(tmp_path / "maps" / "mine.toml")}
    assert got[1] == ModelSpec("hf", str(tmp_path / "segformer"), {"class_map": "ade20k-voc"})  # shipped
    esp = '[[models]]\nname = "espnetv2"\n'
    bad = {
        esp + "checkpoint = 5\n": r"models\[0\]: checkpoint must be a file path string, got 5",
        esp + 'options = "x"\n': r"models\[0\]: options must be a table",
        esp + 'seed = "x"\n': r"models\[0\]: seed must be a non-negative integer, got 'x'",
        '[[models]]\nname = "tflite"\nmean = 5\n': r"models\[0\]: mean must be a list of 3 numbers",
        '[[models]]\nname = 7\n': r"models\[0\]: name must be a model name string, got 7",
        'models = [1]\n': r"models\[0\]: must be a table with a name, got 1",
    }
    for text, match in bad.items():
        with pytest.raises(ModelError, match=rf"model config .*models\.toml, {match}"):
            specs(text)
    # the same checks guard load_model itself (e.g. options from the command line)
    with pytest.raises(ModelError, match=r"espnetv2: option num_classes must be an integer >= 2, got '21'"):
        load_model("espnetv2", num_classes="21")


def test_garbage_checkpoints_are_one_clear_error(tmp_path: Path) -> None:
    """Bytes that made torch.load raise KeyError / IndexError (tracebacks) and non-state-dict pickles."""
    import io
    import random

    def rnd(seed: int) -> bytes:
        r = random.Random(seed)
        return bytes(r.getrandbits(8) for _ in range(r.randint(1, 3000)))

    def saved(obj: object) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    cases = {
        "text": (b"hello world\n" * 50, "not a readable PyTorch weights file"),  # was KeyError
        "rnd4": (rnd(4), "not a readable PyTorch weights file"),  # was IndexError
        "rnd17": (rnd(17), "not a readable PyTorch weights file"),  # was KeyError
        "zeros": (b"\0" * 1000, "not a readable PyTorch weights file"),
        "pickled_list": (pickle.dumps([1, 2, 3]), "not a readable PyTorch weights file"),
        "tensor": (saved(torch.zeros(3)), "does not hold a state dict of tensors"),
        "dict_of_ints": (saved({"a": 1}), "does not hold a state dict of tensors"),
        "other_keys": (saved({"x": torch.zeros(3)}), "does not fit espnetv2 at any scale"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(data)
        with pytest.raises(ModelError, match=rf"{name}\.pth.*{message}|{message}.*{name}"):
            load_model("espnetv2", path)
