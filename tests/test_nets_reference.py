"""ESPNetv2 / DiCENet modules: strict loading of the shared checkpoints and reference reproduction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ml_backend.errors import ModelError
from ml_backend.nets import DICENET_SCALES, ESPNETV2_SCALES, DiCENetSeg, ESPNetv2Seg
from ml_backend.nets.common import channel_shuffle
from ml_backend.nets.dicenet import parse_checkpoint_name as parse_dicenet
from ml_backend.nets.espnetv2 import parse_checkpoint_name as parse_espnetv2
from ml_backend.shared import shared_dir

LOGITS_ATOL = 1e-4

ESPNETV2_FILES = [
    f"espnetv2_s_{s}_pascal_{n}x{n}.pth" for s in ("0.5", "1.0", "1.5", "2.0") for n in (256, 384)
]
# (family, scale, side) of every shared reference npz
REFERENCES = [
    ("espnetv2", "0.5", 256),
    ("espnetv2", "1.0", 384),
    ("espnetv2", "1.5", 384),
    ("espnetv2", "2.0", 384),
    ("dicenet", "1.0", 384),
    ("dicenet", "1.75", 384),
]
NETS = {"espnetv2": ESPNetv2Seg, "dicenet": DiCENetSeg}


def _models_dir() -> Path:
    return shared_dir() / "models"


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _build(family: str, path: Path) -> torch.nn.Module:
    parse = parse_espnetv2 if family == "espnetv2" else parse_dicenet
    parsed = parse(path)
    assert parsed is not None, path.name
    net = NETS[family](parsed[0])
    net.load_state_dict(_load(path), strict=True)
    return net.eval()


@pytest.mark.parametrize("name", ESPNETV2_FILES)
def test_espnetv2_checkpoint_loads_strict(name: str) -> None:
    path = _models_dir() / "espnetv2" / name
    net = _build("espnetv2", path)
    scale, (h, w) = parse_espnetv2(path)
    assert net.scale == scale and scale in ESPNETV2_SCALES
    with torch.inference_mode():
        out = net(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 21, 64, 64)
    assert torch.isfinite(out).all()


def test_dicenet_small_checkpoint_loads_strict() -> None:
    path = _models_dir() / "dicenet" / "dicenet_s_0.5_pascal_256x256.pth"
    assert parse_dicenet(path) == (0.5, (256, 256))
    net = _build("dicenet", path)
    with torch.inference_mode():
        out = net(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 21, 64, 64)


@pytest.mark.parametrize(("family", "scale", "side"), REFERENCES, ids=lambda v: str(v))
def test_reference_outputs(family: str, scale: str, side: int) -> None:
    models = _models_dir()
    net = _build(family, models / family / f"{family}_s_{scale}_pascal_{side}x{side}.pth")
    ref = np.load(models / "reference" / f"{family}_s_{scale}_{side}_reference.npz")
    assert ref["input_image"].shape == (1, 3, side, side)
    with torch.inference_mode():
        logits = net(torch.from_numpy(ref["input_random_96"])).numpy()
        image_logits = net(torch.from_numpy(ref["input_image"]))[0]
    diff = np.abs(logits - ref["logits_random_96"]).max()
    assert logits.shape == ref["logits_random_96"].shape
    assert diff <= LOGITS_ATOL, f"max abs diff {diff}"
    argmax = image_logits.argmax(0).numpy().astype(np.uint8)
    np.testing.assert_array_equal(argmax, ref["argmax_image"])
    np.testing.assert_allclose(
        image_logits.mean(dim=(1, 2)).numpy(), ref["logits_image_mean_per_class"], rtol=0, atol=LOGITS_ATOL
    )


@pytest.mark.parametrize(
    ("family", "ckpt", "wrong_scale"),
    [
        ("espnetv2", "espnetv2/espnetv2_s_1.0_pascal_256x256.pth", 0.5),
        ("espnetv2", "espnetv2/espnetv2_s_2.0_pascal_256x256.pth", 1.5),
        ("dicenet", "dicenet/dicenet_s_1.0_pascal_384x384.pth", 1.75),
    ],
)
def test_strict_load_into_wrong_scale_fails(family: str, ckpt: str, wrong_scale: float) -> None:
    net = NETS[family](wrong_scale)
    with pytest.raises(RuntimeError, match="size mismatch"):
        net.load_state_dict(_load(_models_dir() / ckpt), strict=True)


@pytest.mark.parametrize(("cls", "scale"), [(ESPNetv2Seg, 0.5), (DiCENetSeg, 0.5)])
def test_other_class_count_changes_only_the_head(cls: type[torch.nn.Module], scale: float) -> None:
    net = cls(scale, num_classes=5).eval()
    with torch.inference_mode():
        assert net(torch.randn(1, 3, 32, 64)).shape == (1, 5, 32, 64)
    ref = cls(scale).state_dict()
    own = net.state_dict()
    assert own.keys() == ref.keys()
    differing = sorted(k for k in own if own[k].shape != ref[k].shape)
    assert differing and all(k.split(".")[0] in {"bu_dec_l4", "eff_pool_128x128"} for k in differing)
    assert all(".merge_layer.3." in k for k in differing)


@pytest.mark.parametrize(("cls", "scale"), [(ESPNetv2Seg, 0.5), (DiCENetSeg, 0.2)])
def test_train_mode_batch_non_square(cls: type[torch.nn.Module], scale: float) -> None:
    torch.manual_seed(0)
    net = cls(scale, num_classes=4).train()
    x = torch.randn(2, 3, 64, 96)
    out = net(x)
    assert out.shape == (2, 4, 64, 96)
    out.square().mean().backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    net.eval()
    with torch.inference_mode():
        both = net(x)
        second = net(x[1:])
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", [ESPNetv2Seg, DiCENetSeg])
def test_bad_inputs_raise_model_error(cls: type[torch.nn.Module]) -> None:
    with pytest.raises(ModelError, match="unsupported scale"):
        cls(0.33)
    net = cls(0.5).eval()
    with torch.inference_mode():
        with pytest.raises(ModelError, match="multiples of 16"):
            net(torch.zeros(1, 3, 64, 72))
        with pytest.raises(ModelError, match=r"\[B, 3, H, W\]"):
            net(torch.zeros(1, 1, 64, 64))


def test_scales_and_name_parsing() -> None:
    assert ESPNETV2_SCALES == (0.5, 1.0, 1.5, 2.0)
    assert DICENET_SCALES == (0.2, 0.5, 0.75, 1.0, 1.25, 1.75)
    assert parse_espnetv2("/x/espnetv2_s_2.0_pascal_384x384.pth") == (2.0, (384, 384))
    assert parse_espnetv2(Path("espnetv2_s_0.5_pascal_256x320.pth")) == (0.5, (256, 320))
    assert parse_espnetv2("dicenet_s_1.0_pascal_384x384.pth") is None
    assert parse_espnetv2("espnetv2_s_2.0_pascal.pth") is None
    assert parse_dicenet("dicenet_s_1.75_pascal_384x384.pth") == (1.75, (384, 384))
    assert parse_dicenet("espnetv2_s_1.0_pascal_384x384.pth") is None


def test_channel_shuffle_interleaves_groups() -> None:
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 3).flatten().tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]
    assert channel_shuffle(x, 2).flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
