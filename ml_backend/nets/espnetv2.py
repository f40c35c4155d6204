"""ESPNetv2 semantic segmentation network (Mehta et al., CVPR 2019), PASCAL VOC decoder variant.

Parameter names match the published EdgeNets checkpoints (``espnetv2_s_<s>_pascal_<H>x<W>.pth``),
so they load with ``strict=True``; facts: ``shared/models/ESPNETV2_SEG.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .common import (
    BR,
    CB,
    CBR,
    DECODER_PLANES,
    PYRAMID_PROJ,
    EfficientPWConv,
    EfficientPyrPool,
    bn_prelu,
    check_input,
    decode,
    init_weights,
)

#: Encoder widths (level1..level4) per scale.
ESPNETV2_WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.5: (16, 32, 64, 128),
    1.0: (32, 64, 128, 256),
    1.5: (32, 96, 192, 384),
    2.0: (32, 128, 256, 512),
}
#: Supported width scales, ascending.
ESPNETV2_SCALES: tuple[float, ...] = tuple(sorted(ESPNETV2_WIDTHS))
#: Input height and width must be multiples of this (the skip connections must line up).
SIZE_MULTIPLE = 16

_BRANCHES = 4
_DILATION_OF_KSIZE = {3: 1, 5: 2, 7: 3, 9: 4}
_NAME_RE = re.compile(r"^espnetv2_s_(\d+(?:\.\d+)?)_[A-Za-z0-9]+_(\d+)x(\d+)\.pth$")


def parse_checkpoint_name(path: str | Path) -> tuple[float, tuple[int, int]] | None:
    """Read ``(scale, (H, W))`` from a file name like ``espnetv2_s_2.0_pascal_384x384.pth``.

    Returns None when the base name does not follow that pattern.
    """
    m = _NAME_RE.match(Path(path).name)
    if m is None:
        return None
    return float(m.group(1)), (int(m.group(2)), int(m.group(3)))


def _dilations(r_lim: int) -> list[int]:
    """Dilation rates of the 4 EESP branches: kernel sizes 3,5,7,9 capped at ``r_lim`` (-> 3), sorted."""
    ksizes = sorted(k if k <= r_lim else 3 for k in (3 + 2 * i for i in range(_BRANCHES)))
    return [_DILATION_OF_KSIZE[k] for k in ksizes]


class _DilatedDW(nn.Module):
    """3x3 depthwise dilated conv held as ``conv`` (the ``spp_dw.i`` spelling)."""

    def __init__(self, channels: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            channels, channels, 3, stride=stride, padding=dilation, dilation=dilation, groups=channels,
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class EESP(nn.Module):
    """Extremely efficient spatial pyramid unit: ``[B, cin, H, W] -> [B, cout, H/stride, W/stride]``.

    With ``stride == 2`` the block returns the merged branches as they are (the down-sampler adds
    its own activation); otherwise it adds the input when shapes match and applies PReLU.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, r_lim: int = 7) -> None:
        super().__init__()
        if cout % _BRANCHES:
            raise ModelError(f"EESP: output width {cout} is not divisible by {_BRANCHES} branches")
        n = cout // _BRANCHES
        self.stride = stride
        self.proj_1x1 = CBR(cin, n, 1, groups=_BRANCHES)
        self.spp_dw = nn.ModuleList(_DilatedDW(n, stride, d) for d in _dilations(r_lim))
        self.conv_1x1_exp = CB(cout, cout, 1, groups=_BRANCHES)
        self.br_after_cat = BR(cout)
        self.module_act = nn.PReLU(cout)
        if stride == 2:
            # kept for checkpoint compatibility but never used by a down-sampling block: freeze it so
            # that optimisers and DistributedDataParallel do not see a parameter without gradient
            self.module_act.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj_1x1(x)
        outs = [self.spp_dw[0](p)]
        for branch in self.spp_dw[1:]:
            outs.append(branch(p) + outs[-1])  # hierarchical feature fusion
        y = self.conv_1x1_exp(self.br_after_cat(torch.cat(outs, dim=1)))
        if self.stride == 2:
            return y
        if y.shape == x.shape:
            y = y + x
        return self.module_act(y)


class DownSampler(nn.Module):
    """Strided EESP + average pooling, reinforced with the raw image.

    ``x: [B, cin, H, W]``, ``image: [B, 3, H0, W0]`` -> ``[B, cout, H/2, W/2]``.
    """

    def __init__(self, cin: int, cout: int, r_lim: int) -> None:
        super().__init__()
        self.eesp = EESP(cin, cout - cin, stride=2, r_lim=r_lim)
        self.inp_reinf = nn.Sequential(CBR(3, 3, 3), CB(3, cout, 1))
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        avg = F.avg_pool2d(x, 3, stride=2, padding=1)
        out = torch.cat([avg, self.eesp(x)], dim=1)
        target_w = avg.shape[3]
        while True:  # at least one halving: the image is always larger than this level
            image = F.avg_pool2d(image, 3, stride=2, padding=1)
            if image.shape[3] <= target_w:
                break
        if image.shape[2:] != avg.shape[2:]:
            raise ModelError(
                f"ESPNetv2: input image reinforcement {tuple(image.shape[2:])} does not line up with "
                f"features {tuple(avg.shape[2:])}; use sides that are multiples of {SIZE_MULTIPLE}"
            )
        return self.act(out + self.inp_reinf(image))


class ESPNetv2Encoder(nn.Module):
    """The ``base_net`` of the segmentation network; returns features at 1/2, 1/4, 1/8, 1/16."""

    def __init__(self, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        c1, c2, c3, c4 = widths
        self.level1 = CBR(3, c1, 3, stride=2)
        self.level2_0 = DownSampler(c1, c2, r_lim=13)
        self.level3_0 = DownSampler(c2, c3, r_lim=11)
        self.level3 = nn.ModuleList(EESP(c3, c3, r_lim=9) for _ in range(3))
        self.level4_0 = DownSampler(c3, c4, r_lim=9)
        self.level4 = nn.ModuleList(EESP(c4, c4, r_lim=7) for _ in range(7))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        e1 = self.level1(x)
        e2 = self.level2_0(e1, x)
        e3 = self.level3_0(e2, x)
        for layer in self.level3:
            e3 = layer(e3)
        e4 = self.level4_0(e3, x)
        for layer in self.level4:
            e4 = layer(e4)
        return e1, e2, e3, e4


class ESPNetv2Seg(nn.Module):
    """ESPNetv2 segmentation network.

    ``forward(x)``: ``x`` = normalised RGB ``[B, 3, H, W]`` (ImageNet mean/std, H and W multiples
    of 16) -> logits ``[B, num_classes, H, W]``.
    """

    size_multiple: int = SIZE_MULTIPLE

    def __init__(self, scale: float, num_classes: int = 21) -> None:
        super().__init__()
        scale = float(scale)
        if scale not in ESPNETV2_WIDTHS:
            raise ModelError(
                f"ESPNetv2: unsupported scale {scale}; choose one of {', '.join(map(str, ESPNETV2_SCALES))}"
            )
        if int(num_classes) < 1:
            raise ModelError(f"ESPNetv2: num_classes must be >= 1, got {num_classes}")
        self.scale = scale
        self.num_classes = int(num_classes)
        widths = ESPNETV2_WIDTHS[scale]
        c1, c2, c3, c4 = widths
        d1, d2, d3 = DECODER_PLANES
        p = PYRAMID_PROJ
        self.base_net = ESPNetv2Encoder(widths)
        self.bu_dec_l1 = EfficientPyrPool(c4, p, d1)
        self.bu_dec_l2 = EfficientPyrPool(d1, p, d2)
        self.bu_dec_l3 = EfficientPyrPool(d2, p, d3)
        self.bu_dec_l4 = EfficientPyrPool(d3, p, self.num_classes, last_layer_br=False)
        self.merge_enc_dec_l2 = EfficientPWConv(c3, d1)
        self.merge_enc_dec_l3 = EfficientPWConv(c2, d2)
        self.merge_enc_dec_l4 = EfficientPWConv(c1, d3)
        self.bu_br_l2 = bn_prelu(d1)
        self.bu_br_l3 = bn_prelu(d2)
        self.bu_br_l4 = bn_prelu(d3)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, SIZE_MULTIPLE, "ESPNetv2")
        feats = self.base_net(x)
        return decode(
            feats,
            (self.bu_dec_l1, self.bu_dec_l2, self.bu_dec_l3, self.bu_dec_l4),
            (self.merge_enc_dec_l2, self.merge_enc_dec_l3, self.merge_enc_dec_l4),
            (self.bu_br_l2, self.bu_br_l3, self.bu_br_l4),
            (int(x.shape[2]), int(x.shape[3])),
        )
