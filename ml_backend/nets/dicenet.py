"""DiCENet semantic segmentation network (Mehta et al. 2019, dimension-wise convolutions).

Parameter names match the published EdgeNets checkpoints (``dicenet_s_<s>_pascal_<H>x<W>.pth``),
so they load with ``strict=True``; facts: ``shared/models/DICENET_SEG.md``. The decoder is the
ESPNetv2 one (see :mod:`ml_backend.nets.common`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .common import (
    DECODER_PLANES,
    PYRAMID_PROJ,
    EfficientPWConv,
    EfficientPyrPool,
    SeqBR,
    SeqCBR,
    bn_prelu,
    channel_shuffle,
    check_input,
    decode,
    init_weights,
    resize_bilinear,
)

#: Encoder widths (c0, c1, c2, c3) per scale.
DICENET_WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.2: (16, 16, 32, 64),
    0.5: (24, 24, 48, 96),
    0.75: (24, 24, 86, 172),
    1.0: (24, 24, 116, 232),
    1.25: (24, 24, 144, 288),
    1.75: (24, 24, 210, 420),
}
#: Supported width scales, ascending.
DICENET_SCALES: tuple[float, ...] = tuple(sorted(DICENET_WIDTHS))
#: Input height and width must be multiples of this for the skip connections to line up
#: (the published network was used with multiples of 32).
SIZE_MULTIPLE = 16
#: Height/width the dimension-wise convolutions were built for (a 224x224 input): level 3, level 4.
DESIGN_SIZE_L3 = 28
DESIGN_SIZE_L4 = 14

_NAME_RE = re.compile(r"^dicenet_s_(\d+(?:\.\d+)?)_[A-Za-z0-9]+_(\d+)x(\d+)\.pth$")


def parse_checkpoint_name(path: str | Path) -> tuple[float, tuple[int, int]] | None:
    """Read ``(scale, (H, W))`` from a file name like ``dicenet_s_1.0_pascal_384x384.pth``.

    Returns None when the base name does not follow that pattern.
    """
    m = _NAME_RE.match(Path(path).name)
    if m is None:
        return None
    return float(m.group(1)), (int(m.group(2)), int(m.group(3)))


def _resize_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Resize one spatial dim (2 = height, 3 = width) of ``[B, C, H, W]`` to ``size``.

    Up-sizing is bilinear with ``align_corners=True``, down-sizing is adaptive average pooling;
    the other spatial dim is kept.
    """
    cur = int(x.shape[dim])
    if cur == size:
        return x
    target = (size, int(x.shape[3])) if dim == 2 else (int(x.shape[2]), size)
    if cur < size:
        return resize_bilinear(x, target)
    return F.adaptive_avg_pool2d(x, target)


class DICE(nn.Module):
    """Dimension-wise convolution unit: ``[B, cin, H, W] -> [B, cout, H, W]``.

    Depthwise 3x3 convs along channels, height and width (the latter two at the design size
    ``height`` x ``width``), fused by BN+PReLU, a 3-way channel shuffle and a grouped 1x1, then a
    grouped 3x3 projection gated by a squeeze-excitation-like channel weight.
    """

    def __init__(self, cin: int, cout: int, height: int, width: int) -> None:
        super().__init__()
        self.height = height
        self.width = width
        self.conv_channel = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.conv_width = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.conv_height = nn.Conv2d(height, height, 3, padding=1, groups=height, bias=False)
        self.br_act = SeqBR(3 * cin)
        self.weight_avg_layer = SeqCBR(3 * cin, cin, 1, groups=cin)
        self.proj_layer = SeqCBR(cin, cout, 3, groups=math.gcd(cin, cout))
        self.linear_comb_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cin, cin // 4, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin // 4, cout, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[2]), int(x.shape[3])
        out_c = self.conv_channel(x)
        # height-wise: [B, C, h', W] -> [B, h', C, W], conv over (C, W) planes, one per row
        y = _resize_dim(x, 2, self.height).transpose(1, 2)
        out_h = _resize_dim(self.conv_height(y).transpose(1, 2), 2, h)
        # width-wise: [B, C, H, w'] -> [B, w', H, C], conv over (H, C) planes, one per column
        y = _resize_dim(x, 3, self.width).transpose(1, 3)
        out_w = _resize_dim(self.conv_width(y).transpose(1, 3), 3, w)
        out = self.br_act(torch.cat([out_c, out_h, out_w], dim=1))
        out = self.weight_avg_layer(channel_shuffle(out, 3))
        return self.proj_layer(out) * self.linear_comb_layer(out)


class StridedDICE(nn.Module):
    """Down-sampling DICE unit: ``[B, cin, H, W] -> [B, 2 * cin, H/2, W/2]``."""

    def __init__(self, cin: int, height: int, width: int) -> None:
        super().__init__()
        self.left_layer = nn.Sequential(SeqCBR(cin, cin, 3, stride=2, groups=cin), SeqCBR(cin, cin, 1))
        self.right_layer = nn.Sequential(
            nn.AvgPool2d(3, stride=2, padding=1),
            DICE(cin, cin, height, width),
            SeqCBR(cin, cin, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left_layer(x), self.right_layer(x)], dim=1), 2)


class ShuffleDICEBlock(nn.Module):
    """ShuffleNetv2-style split unit with a DICE branch: ``[B, cin, H, W] -> [B, cout, H, W]``."""

    def __init__(self, cin: int, cout: int, height: int, width: int) -> None:
        super().__init__()
        self.left = round(0.5 * cin)
        right_out = cout - self.left
        self.layer_right = nn.Sequential(
            SeqCBR(cin - self.left, right_out, 1),
            DICE(right_out, right_out, height, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x[:, : self.left], x[:, self.left :]
        return channel_shuffle(torch.cat([left, self.layer_right(right)], dim=1), 2)


class DiCENetEncoder(nn.Module):
    """The ``base_net`` of the segmentation network; returns features at 1/2, 1/4, 1/8, 1/16."""

    def __init__(self, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        c0, c1, c2, c3 = widths
        s3, s4 = DESIGN_SIZE_L3, DESIGN_SIZE_L4
        self.level1 = SeqCBR(3, c0, 3, stride=2)
        self.level2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.level3 = nn.Sequential(
            StridedDICE(c1, s3, s3),
            ShuffleDICEBlock(2 * c1, c2, s3, s3),
            *(ShuffleDICEBlock(c2, c2, s3, s3) for _ in range(2)),
        )
        self.level4 = nn.Sequential(
            StridedDICE(c2, s4, s4),
            ShuffleDICEBlock(2 * c2, c3, s4, s4),
            *(ShuffleDICEBlock(c3, c3, s4, s4) for _ in range(6)),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        e1 = self.level1(x)
        e2 = self.level2(e1)
        e3 = self.level3(e2)
        e4 = self.level4(e3)
        return e1, e2, e3, e4


class DiCENetSeg(nn.Module):
    """DiCENet segmentation network.

    ``forward(x)``: ``x`` = normalised RGB ``[B, 3, H, W]`` (ImageNet mean/std, H and W multiples
    of 16; the checkpoints were trained at multiples of 32) -> logits ``[B, num_classes, H, W]``.
    """

    size_multiple: int = SIZE_MULTIPLE

    def __init__(self, scale: float, num_classes: int = 21) -> None:
        super().__init__()
        scale = float(scale)
        if scale not in DICENET_WIDTHS:
            raise ModelError(
                f"DiCENet: unsupported scale {scale}; choose one of {', '.join(map(str, DICENET_SCALES))}"
            )
        if int(num_classes) < 1:
            raise ModelError(f"DiCENet: num_classes must be >= 1, got {num_classes}")
        self.scale = scale
        self.num_classes = int(num_classes)
        widths = DICENET_WIDTHS[scale]
        c0, c1, c2, c3 = widths
        d1, d2, d3 = DECODER_PLANES
        p = PYRAMID_PROJ
        self.base_net = DiCENetEncoder(widths)
        self.eff_pool_16x16 = EfficientPyrPool(c3, p, d1)
        self.eff_pool_32x32 = EfficientPyrPool(d1, p, d2)
        self.eff_pool_64x64 = EfficientPyrPool(d2, p, d3)
        self.eff_pool_128x128 = EfficientPyrPool(d3, p, self.num_classes, last_layer_br=False)
        self.proj_enc_32x32 = EfficientPWConv(c2, d1)
        self.proj_enc_64x64 = EfficientPWConv(c1, d2)
        self.proj_enc_128x128 = EfficientPWConv(c0, d3)
        self.bu_br_32x32 = bn_prelu(d1)
        self.bu_br_64x64 = bn_prelu(d2)
        self.bu_br_128x128 = bn_prelu(d3)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, SIZE_MULTIPLE, "DiCENet")
        feats = self.base_net(x)
        return decode(
            feats,
            (self.eff_pool_16x16, self.eff_pool_32x32, self.eff_pool_64x64, self.eff_pool_128x128),
            (self.proj_enc_32x32, self.proj_enc_64x64, self.proj_enc_128x128),
            (self.bu_br_32x32, self.bu_br_64x64, self.bu_br_128x128),
            (int(x.shape[2]), int(x.shape[3])),
        )
