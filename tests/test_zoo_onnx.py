"""``onnx`` zoo entries (onnxruntime): an ESPNetv2 export made here matches its torch module; layouts,
output kinds, fixed batch and bad files are handled as documented in ml_backend/zoo/onnx_entry.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ml_backend.errors import ModelError
from ml_backend.imageio import read_rgb
from ml_backend.shared import shared_dir
from ml_backend.zoo import OnnxSegmentationModel, load_model
from ml_backend.zoo.onnx_entry import looks_like_probabilities, resolve_io, scores_to_probs

SHARED = shared_dir()
ESP = SHARED / "models" / "espnetv2" / "espnetv2_s_0.5_pascal_256x256.pth"
VOC = SHARED / "data" / "voc_samples" / "images"

#: ONNX Runtime vs the torch module on the same normalised input, ESPNetv2 s=0.5 @256 (real weights):
#: max |logit difference| must stay below this (measured: ~1e-5; float32 kernels differ in order).
LOGIT_ATOL = 1e-3

pytestmark = pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")


@pytest.fixture(scope="module")
def espnet_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """ESPNetv2 s=0.5 @256 exported with torch.onnx (dynamo), dynamic batch: (file, torch module)."""
    torch.set_num_threads(1)
    model = load_model("espnetv2", ESP, device="cpu")
    net = model.module.eval()
    path = tmp_path_factory.mktemp("onnx") / "espnetv2_s05.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(net, (torch.zeros(2, 3, 256, 256),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    return path, net


@pytest.mark.slow
def test_espnetv2_export_matches_torch(espnet_onnx: tuple[Path, torch.nn.Module]) -> None:
    path, net = espnet_onnx
    model = load_model("onnx", path, device="cpu")
    assert isinstance(model, OnnxSegmentationModel) and not model.trainable and model.module is None
    assert model.input_size == (256, 256) and model.num_classes == 21 and model.output_kind == "logits"
    assert model.class_names[15] == "person" and model.providers == ["CPUExecutionProvider"]
    assert model.spec.options["layout"] == "NCHW" and model.spec.options["input_name"] == "image"
    images = [read_rgb(VOC / "voc_0.png"), read_rgb(VOC / "voc_1.png")[10:200, 30:330]]
    prep = model.preprocessor()
    x = torch.stack([prep(im) for im in images])
    with torch.no_grad():
        ref = net(x)
    got = model.run_raw(x)
    assert got.shape == tuple(ref.shape)
    diff = float(np.abs(got - ref.numpy()).max())
    assert diff < LOGIT_ATOL, diff
    assert float(ref.abs().max()) > 1.0  # real logits, not a trivially small output
    # the zoo contract: probabilities sum to 1, predictions at the original size, same labels as torch
    probs = model.forward(x)
    assert torch.allclose(probs.sum(1), torch.ones(2, 256, 256), atol=1e-5)
    torch_model = load_model("espnetv2", ESP, device="cpu")
    preds, ref_preds = model.predict(images, batch_size=2), torch_model.predict(images, batch_size=2)
    assert [p.shape for p in preds] == [im.shape[:2] for im in images]
    agree = np.mean([np.mean(a == b) for a, b in zip(preds, ref_preds, strict=True)])
    assert agree > 0.999, agree
    proba = model.predict_proba(images[1:])[0]
    assert proba.shape == (21, *images[1].shape[:2]) and np.allclose(proba.sum(0), 1, atol=1e-4)


@pytest.mark.slow
def test_espnetv2_export_names_and_versions(
    espnet_onnx: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, _ = espnet_onnx
    a = load_model("onnx", path, device="cpu")
    assert load_model(f"onnx:{path}", device="cpu").version == a.version
    assert load_model(str(path), device="cpu").version == a.version  # a bare .onnx path
    data = path.with_name(path.name + ".data")
    assert data.is_file()  # the exporter keeps the weights next to the graph: both are hashed
    other = tmp_path / "espnetv2_s05.onnx"
    shutil.copy(path, other)
    shutil.copy(data, tmp_path / data.name)
    assert load_model("onnx", other).version == a.version  # content, not path
    weights = bytearray((tmp_path / data.name).read_bytes())
    weights[100] ^= 1  # one bit of one weight
    (tmp_path / data.name).write_bytes(bytes(weights))
    assert load_model("onnx", other).version != a.version
    assert a.version.startswith("onnx-espnetv2_s05-256@")
    assert load_model("onnx", path, mean=[0.5, 0.5, 0.5]).version != a.version  # normalisation matters
    reloaded = load_model("onnx", a.spec.checkpoint, **dict(a.spec.options))  # the spec reloads it
    assert reloaded.version == a.version
    with pytest.raises(ModelError, match=r"input_size=128 but the model's input is fixed at 256x256"):
        load_model("onnx", path, input_size=128)
    with pytest.raises(ModelError, match=r"onnx:.*drop checkpoint="):
        load_model(f"onnx:{path}", str(path))


# ------------------------------------------------------------------------------------------------
# small hand-built ONNX graphs: layouts, output kinds, fixed batch, uint8 input
# ------------------------------------------------------------------------------------------------


def _save(graph: onnx.GraphProto, path: Path, metadata: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _conv_weights(classes: int) -> np.ndarray:
    """1x1 conv: class k+1 = channel k (k < 3), class 0 = 0."""
    w = np.zeros((classes, 3, 1, 1), np.float32)
    for k in range(min(3, classes - 1)):
        w[k + 1, k] = 1.0
    return w


def _tiny(path: Path, *, layout: str = "NCHW", head: str = "logits", batch: int | str = "N",
          size: tuple[int, int] | None = (8, 8), classes: int = 4, dtype: int = TensorProto.FLOAT,
          metadata: dict[str, str] | None = None) -> Path:
    """A 1x1-conv segmentation model; ``head``: logits, softmax (probabilities) or argmax (labels)."""
    h, w = size if size is not None else ("H", "W")
    in_shape = [batch, 3, h, w] if layout == "NCHW" else [batch, h, w, 3]
    nodes, x = [], "image"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["image"], ["imagef"], to=TensorProto.FLOAT))
        x = "imagef"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes.append(helper.make_node("Conv", [x, "w"], ["scores"]))
    out, out_type, out_shape = "scores", TensorProto.FLOAT, [batch, classes, h, w]
    if head == "softmax":
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1))
        out = "probs"
    elif head == "argmax":
        nodes.append(helper.make_node("ArgMax", ["scores"], ["labels"], axis=1, keepdims=0))
        out, out_type, out_shape = "labels", TensorProto.INT64, [batch, h, w]
    if layout == "NHWC" and head != "argmax":
        nodes.append(helper.make_node("Transpose", [out], ["out_nhwc"], perm=[0, 2, 3, 1]))
        out, out_shape = "out_nhwc", [batch, h, w, classes]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", dtype, in_shape)],
        [helper.make_tensor_value_info(out, out_type, out_shape)],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [classes, 3, 1, 1],
                                        _conv_weights(classes).ravel().tolist())],
    )
    return _save(graph, path, metadata)


def _colours() -> list[np.ndarray]:
    red, green = np.zeros((20, 30, 3), np.uint8), np.zeros((5, 7, 3), np.uint8)
    red[..., 0] = 255
    green[..., 1] = 255
    return [red, green]


@pytest.mark.parametrize(("layout", "head"), [("NCHW", "logits"), ("NHWC", "logits"), ("NHWC", "softmax"),
                                              ("NCHW", "argmax")])
def test_layouts_and_output_kinds(tmp_path: Path, layout: str, head: str) -> None:
    path = _tiny(tmp_path / f"{layout}_{head}.onnx", layout=layout, head=head)
    opts = {"num_classes": 4} if head == "argmax" else {}
    model = load_model("onnx", path, device="cpu", mean=[0, 0, 0], std=[1, 1, 1], **opts)
    expected_kind = {"logits": "logits", "softmax": "probabilities", "argmax": "labels"}[head]
    assert model.output_kind == expected_kind and model.spec.options["layout"] == layout
    assert model.input_size == (8, 8) and model.num_classes == 4
    p_red, p_green = model.predict(_colours(), batch_size=2)
    assert p_red.shape == (20, 30) and (p_red == 1).all()
    assert p_green.shape == (5, 7) and (p_green == 2).all()
    probs = model.forward(torch.stack([model.preprocessor()(im) for im in _colours()]))
    assert torch.allclose(probs.sum(1), torch.ones(2, 8, 8), atol=1e-5)


def test_dynamic_size_fixed_batch_uint8_and_metadata(tmp_path: Path) -> None:
    # dynamic H, W: input_size decides (default 512)
    dyn = _tiny(tmp_path / "dyn.onnx", size=None)
    assert load_model("onnx", dyn).input_size == (512, 512)
    small = load_model("onnx", dyn, input_size="16x24", mean=[0, 0, 0], std=[1, 1, 1])
    assert small.input_size == (16, 24) and (small.predict(_colours())[0] == 1).all()
    # a batch dimension fixed to 1 runs image by image
    one = load_model("onnx", _tiny(tmp_path / "b1.onnx", batch=1), mean=[0, 0, 0], std=[1, 1, 1])
    assert [p.shape for p in one.predict(_colours(), batch_size=2)] == [(20, 30), (5, 7)]
    # uint8 input: raw pixels are fed; metadata gives the class names
    meta = {"class_names": '["bg", "r", "g", "b"]'}
    raw = load_model("onnx", _tiny(tmp_path / "u8.onnx", layout="NHWC", dtype=TensorProto.UINT8,
                                   metadata=meta))
    assert raw.class_names == ("bg", "r", "g", "b") and raw.mean == (0.0, 0.0, 0.0)
    x = raw.preprocessor()(np.full((8, 8, 3), 200, np.uint8))
    assert torch.allclose(x, torch.full_like(x, 200.0), atol=1e-3)  # 0..255 reaches the model
    assert (raw.predict(_colours())[1] == 2).all()


def test_pure_helpers() -> None:
    logits = np.random.default_rng(0).normal(size=(2, 5, 3, 4)).astype(np.float32)
    p = scores_to_probs(logits, "logits", "NCHW", 5)
    assert torch.allclose(p, torch.softmax(torch.from_numpy(logits), 1))
    assert not looks_like_probabilities(logits, "NCHW") and looks_like_probabilities(p.numpy(), "NCHW")
    labels = np.array([[[0, 3], [255, 1]]])
    one = scores_to_probs(labels, "labels", "NCHW", 4)
    assert one.shape == (1, 4, 2, 2) and one[0, 3, 0, 1] == 1
    assert torch.allclose(one[0, :, 1, 0], torch.full((4,), 0.25))  # 255: no opinion
    with pytest.raises(ModelError, match=r"m\.onnx: cannot tell the layout of input x \['N', 4, 8, 8\]"):
        resolve_io([("x", ["N", 4, 8, 8], "tensor(float)")], [("y", ["N", 2, 8, 8], "tensor(float)")], {}, {},
                   "m.onnx")
    x_nhwc, y_nhwc = ("x", ["N", 8, 8, 3], "tensor(float)"), ("y", ["N", 8, 8, 2], "tensor(float)")
    io = resolve_io([x_nhwc], [y_nhwc], {}, {}, "m.onnx")
    assert io.layout == io.output_layout == "NHWC" and io.input_size == (8, 8) and not io.fixed_batch
    opts = {"layout": "nhwc", "input_size": 32}
    x_dyn, y_dyn = ("x", ["N", "H", "W", "C"], "tensor(float16)"), ("y", ["N", "H", "W", 5], "tensor(float)")
    io = resolve_io([x_dyn], [y_dyn], opts, {}, "m.onnx")  # the shape cannot tell: the option decides
    assert io.layout == "NHWC" and io.input_size == (32, 32) and io.input_dtype == np.float16 and not opts


def test_bad_onnx_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(ModelError, match=r"junk\.onnx: cannot be loaded by onnxruntime"):
        load_model("onnx", junk)
    with pytest.raises(ModelError, match=r"missing\.onnx: file not found"):
        load_model("onnx", tmp_path / "missing.onnx")
    labels = _tiny(tmp_path / "labels.onnx", head="argmax")
    with pytest.raises(ModelError, match=r"labels\.onnx outputs labels; pass num_classes= or class_names="):
        load_model("onnx", labels)
    two = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3, 8, 8])])
    with pytest.raises(ModelError, match=r"two\.onnx: expected one image input of rank 4"):
        load_model("onnx", _save(two, tmp_path / "two.onnx"))
    with pytest.raises(ModelError, match=r"no input named 'pixels'"):
        load_model("onnx", _tiny(tmp_path / "t.onnx"), input_name="pixels")
    with pytest.raises(ModelError, match=r"option layout must be \"NCHW\" or \"NHWC\", got 'CHW'"):
        load_model("onnx", _tiny(tmp_path / "t2.onnx"), layout="CHW")
    with pytest.raises(ModelError, match=r"provider='cuda' but this onnxruntime has only"):
        load_model("onnx", _tiny(tmp_path / "t3.onnx"), provider="cuda")
