"""The model zoo: one interface for every segmentation model madseg uses as target or competitor.

``load_model(name, checkpoint=None, *, device=None, **options) -> SegmentationModel`` with names
``espnetv2``, ``dicenet``, ``tflite``, ``torchvision:<builder>``, ``onnx`` (``onnx:<file>``), ``hf``
(``hf:<local folder>``) or a path to a TorchScript / ``torch.export`` / ``.onnx`` file; every entry
takes ``class_map=`` to predict in another class list. See docs/architecture.md.
"""

from ..modelspec import ModelSpec  # torch-free; re-exported as the zoo's vocabulary
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessor,
    SegmentationModel,
    TorchSegmentationModel,
    resolve_device,
)
from .checkpoints import read_sidecar, sidecar_path
from .classmap import ClassMap, apply_class_map, read_class_map, shipped_class_maps
from .hashing import file_sha256
from .hf_entry import load_hf
from .onnx_entry import OnnxSegmentationModel, load_onnx
from .options import check_options, option_problem
from .registry import (
    known_names,
    list_models,
    load_model,
    load_model_spec,
    model_spec_from_table,
    read_model_specs,
    shared_model_specs,
)
from .tflite import TFLiteSegmentationModel, check_tflite_io
from .torch_entries import TORCHVISION_BUILDERS

__all__ = [
    "ClassMap",
    "OnnxSegmentationModel",
    "apply_class_map",
    "check_options",
    "load_hf",
    "load_onnx",
    "model_spec_from_table",
    "option_problem",
    "read_class_map",
    "shipped_class_maps",
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
