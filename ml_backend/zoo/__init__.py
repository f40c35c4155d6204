"""The model zoo: one interface for every segmentation model madseg uses as target or competitor.

``load_model(name, checkpoint=None, *, device=None, **options) -> SegmentationModel`` with names
``espnetv2``, ``dicenet``, ``tflite``, ``torchvision:<builder>`` or a path to a TorchScript /
``torch.export`` file. See docs/architecture.md.
"""

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    Preprocessor,
    SegmentationModel,
    TorchSegmentationModel,
    resolve_device,
)
from .checkpoints import read_sidecar, sidecar_path
from .hashing import file_sha256
from .registry import (
    known_names,
    list_models,
    load_model,
    load_model_spec,
    read_model_specs,
    shared_model_specs,
)
from .tflite import TFLiteSegmentationModel, check_tflite_io
from .torch_entries import TORCHVISION_BUILDERS

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCHVISION_BUILDERS",
    "ModelSpec",
    "Preprocessor",
    "SegmentationModel",
    "TFLiteSegmentationModel",
    "TorchSegmentationModel",
    "check_tflite_io",
    "file_sha256",
    "known_names",
    "list_models",
    "load_model",
    "load_model_spec",
    "read_model_specs",
    "read_sidecar",
    "resolve_device",
    "shared_model_specs",
    "sidecar_path",
]
