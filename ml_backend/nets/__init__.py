"""Segmentation network architectures whose parameter names match the published checkpoints.

- :class:`ESPNetv2Seg` (scales :data:`ESPNETV2_SCALES`), files ``espnetv2_s_<s>_pascal_<H>x<W>.pth``;
- :class:`DiCENetSeg` (scales :data:`DICENET_SCALES`), files ``dicenet_s_<s>_pascal_<H>x<W>.pth``.

Both map a normalised batch ``[B, 3, H, W]`` to logits ``[B, num_classes, H, W]``.
"""

from .dicenet import DICENET_SCALES, DiCENetSeg
from .dicenet import parse_checkpoint_name as parse_dicenet_name
from .espnetv2 import ESPNETV2_SCALES, ESPNetv2Seg
from .espnetv2 import parse_checkpoint_name as parse_espnetv2_name

__all__ = [
    "DICENET_SCALES",
    "ESPNETV2_SCALES",
    "DiCENetSeg",
    "ESPNetv2Seg",
    "parse_dicenet_name",
    "parse_espnetv2_name",
]
