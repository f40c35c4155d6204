"""Building blocks shared by the ESPNetv2 and DiCENet segmentation networks.

The pretrained checkpoints spell the same blocks in two ways, so both spellings exist here:

- *attribute* spelling (ESPNetv2 encoder, ``base_net.*``): :class:`CBR`, :class:`CB`, :class:`BR`
  with submodules ``conv`` / ``bn`` / ``act``;
- *sequential* spelling (both decoders, the whole DiCENet): :class:`SeqCBR` (``cbr.0`` conv,
  ``cbr.1`` BN, ``cbr.2`` PReLU) and :class:`SeqBR` (``br.0`` BN, ``br.1`` PReLU).

All tensors are NCHW: ``[B, C, H, W]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

#: Scales of the efficient pyramid pooling branches, in the order of ``stages.0..4``.
PYRAMID_SCALES: tuple[float, ...] = (2.0, 1.5, 1.0, 0.5, 0.1)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """A bias-free ``k x k`` convolution with "same" padding ``(k - 1) // 2 * dilation``."""
    return nn.Conv2d(
        cin, cout, k, stride=stride, padding=(k - 1) // 2 * dilation, dilation=dilation, groups=groups,
        bias=False,
    )


class CBR(nn.Module):
    """Conv (no bias) -> BatchNorm -> PReLU, attribute spelling (``conv``, ``bn``, ``act``).

    ``[B, cin, H, W] -> [B, cout, ceil(H / stride), ceil(W / stride)]`` (odd ``k``).
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, k, stride, groups)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class CB(nn.Module):
    """Conv (no bias) -> BatchNorm, attribute spelling (``conv``, ``bn``)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, k, stride, groups)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BR(nn.Module):
    """BatchNorm -> PReLU, attribute spelling (``bn``, ``act``); shape preserving."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class SeqCBR(nn.Module):
    """Conv (no bias) -> BatchNorm -> PReLU held in a Sequential named ``cbr``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.cbr = nn.Sequential(_conv(cin, cout, k, stride, groups), nn.BatchNorm2d(cout), nn.PReLU(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbr(x)


class SeqBR(nn.Module):
    """BatchNorm -> PReLU held in a Sequential named ``br``; shape preserving."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.br = nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.br(x)


def bn_prelu(channels: int) -> nn.Sequential:
    """A bare ``Sequential(BatchNorm2d, PReLU)`` (parameter names ``0.*`` and ``1.*``)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU(channels))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel groups: view ``[B, g, C/g, H, W]``, swap dims 1 and 2, flatten.

    ``[B, C, H, W] -> [B, C, H, W]``; output channel ``j * g + i`` is input channel ``i * C/g + j``.
    """
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ChannelShuffle(nn.Module):
    """Module form of :func:`channel_shuffle` (no parameters)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True``: ``[B, C, H, W] -> [B, C, size[0], size[1]]``."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 up-sampling with ``align_corners=True``: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class EfficientPyrPool(nn.Module):
    """Efficient pyramid pooling (the ESPNetv2/DiCENet decoder stage).

    Projects ``[B, in_planes, H, W]`` to ``proj_planes`` channels, runs one 3x3 depthwise conv per
    pyramid scale (up-sampled / pooled to ``max(5, ceil(H * s))`` and back), merges the five maps
    and returns ``[B, out_planes, H, W]``.
    """

    def __init__(
        self, in_planes: int, proj_planes: int, out_planes: int, last_layer_br: bool = True,
        scales: Sequence[float] = PYRAMID_SCALES,
    ) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        n = len(self.scales)
        self.stages = nn.ModuleList(
            _conv(proj_planes, proj_planes, 3, groups=proj_planes) for _ in self.scales
        )
        self.projection_layer = SeqCBR(in_planes, proj_planes, 1)
        self.merge_layer = nn.Sequential(
            SeqBR(proj_planes * n),
            ChannelShuffle(n),
            SeqCBR(proj_planes * n, proj_planes, 3, groups=proj_planes),
            nn.Conv2d(proj_planes, out_planes, 1, bias=not last_layer_br),
        )
        self.last_layer_br = last_layer_br
        if last_layer_br:
            self.br = SeqBR(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection_layer(x)
        height, width = int(x.shape[2]), int(x.shape[3])
        branches = []
        for scale, stage in zip(self.scales, self.stages, strict=True):
            # same float arithmetic as the published network (ceil of a Python float product)
            hs = max(5, int(math.ceil(height * scale)))
            ws = max(5, int(math.ceil(width * scale)))
            if scale < 1.0:
                y = resize_bilinear(stage(F.adaptive_avg_pool2d(x, (hs, ws))), (height, width))
            elif scale > 1.0:
                y = F.adaptive_avg_pool2d(stage(resize_bilinear(x, (hs, ws))), (height, width))
            else:
                y = stage(x)
            branches.append(y)
        out = self.merge_layer(torch.cat(branches, dim=1))
        return self.br(out) if self.last_layer_br else out


class EfficientPWConv(nn.Module):
    """Encoder-to-decoder projection: a grouped 3x3 CBR scaled by a per-channel sigmoid gate.

    ``[B, nin, H, W] -> [B, nout, H, W]``; the gate comes from the global average of the input.
    """

    def __init__(self, nin: int, nout: int) -> None:
        super().__init__()
        self.wt_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(nin, nout, 1, bias=False), nn.Sigmoid()
        )
        self.expansion_layer = SeqCBR(nin, nout, 3, groups=math.gcd(nin, nout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expansion_layer(x) * self.wt_layer(x)


#: Decoder widths after each pyramid stage (PASCAL variant) before the class layer.
DECODER_PLANES: tuple[int, int, int] = (64, 48, 32)
#: Projection width of the pyramid pooling in the PASCAL variant.
PYRAMID_PROJ: int = 10


def decode(
    feats: Sequence[torch.Tensor],
    pools: Sequence[nn.Module],
    merges: Sequence[nn.Module],
    norms: Sequence[nn.Module],
    out_size: tuple[int, int],
) -> torch.Tensor:
    """Bottom-up decoder shared by both networks.

    ``feats`` = encoder outputs at 1/2, 1/4, 1/8, 1/16 of the input; ``pools`` = 4 pyramid stages
    (deepest first); ``merges`` / ``norms`` = the 3 encoder projections and BN+PReLU layers (1/8
    first). Returns logits ``[B, num_classes, *out_size]``.
    """
    e1, e2, e3, e4 = feats
    d = pools[0](e4)
    for enc, merge, norm, pool in zip((e3, e2, e1), merges, norms, pools[1:], strict=True):
        d = pool(norm(upsample2(d) + merge(enc)))
    return resize_bilinear(d, out_size)


def check_input(x: torch.Tensor, multiple: int, net: str) -> None:
    """Raise :class:`ModelError` unless ``x`` is ``[B, 3, H, W]`` with H and W multiples of ``multiple``."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ModelError(f"{net}: expected a normalised image batch [B, 3, H, W], got shape {tuple(x.shape)}")
    h, w = int(x.shape[2]), int(x.shape[3])
    if h % multiple or w % multiple:
        raise ModelError(
            f"{net}: input height and width must be multiples of {multiple}, got {h}x{w}; "
            "resize or pad the image first"
        )


def init_weights(module: nn.Module) -> None:
    """Initialise like the published networks: Kaiming-normal (fan-out) convs, BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
