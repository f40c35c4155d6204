"""Brush results, Label Studio's segmentation wire format: the one builder and the one reader.

A brush result paints one region with one label::

    {"from_name": <brush control>, "to_name": <image object>, "type": "brushlabels",
     "original_width": W, "original_height": H, "image_rotation": 0,
     "value": {"format": "rle", "rle": [...], "brushlabels": [<label>]}}

- :func:`brush_region` builds one (the only place this dict is written); :func:`label_map_results`
  (the ML backend's predictions) and :func:`class_map_results` (round pre-annotations, simulated
  annotators) build one result per class of an (H, W) label map.
- :func:`validate_brush_prediction` checks a prediction before it is sent (Label Studio itself
  does not).
- :func:`annotation_mask` turns an exported annotation's brush results back into an (H, W) class map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..classes import IGNORE_INDEX
from ..errors import MadsegError, MaskError
from .configs import BrushControls
from .rle import check as check_rle
from .rle import decode, encode


class AnnotationError(MadsegError):
    """A finished annotation cannot be turned into a mask (unknown label, bad sizes, bad RLE)."""


def brush_region(
    controls: BrushControls, label: str, region: np.ndarray, score: float | None = None
) -> dict[str, Any]:
    """One ``brushlabels`` result painting ``region`` ((H, W) bool) with ``label``; with ``score``
    (e.g. the region's mean max-probability) rounded to 4 decimals."""
    height, width = region.shape
    result: dict[str, Any] = {
        "from_name": controls.from_name,
        "to_name": controls.to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode(region), "brushlabels": [label]},
    }
    if score is not None:
        result["score"] = round(float(score), 4)
    return result


def label_map_results(
    label_map: np.ndarray,
    names: Mapping[int, str],
    controls: BrushControls,
    max_prob: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One result per class of ``names`` (class index -> label) present in ``label_map`` (H, W)
    uint8, in class order; other values are left out. ``max_prob`` (H, W) float (optional) gives
    each result's ``score`` (its pixels' mean)."""
    present = np.flatnonzero(np.bincount(label_map.ravel(), minlength=256))
    results = []
    for idx in present.tolist():
        name = names.get(idx)
        if name is None:
            continue
        mask = label_map == idx
        score = float(max_prob[mask].mean()) if max_prob is not None else None
        results.append(brush_region(controls, name, mask, score))
    return results


def class_map_results(
    label_map: np.ndarray, classes: Sequence[str], controls: BrushControls
) -> list[dict[str, Any]]:
    """One result per class present in ``label_map`` (H, W) uint8 (class k -> ``classes[k]``;
    ignore pixels 255 left out). Other values raise :class:`ml_backend.errors.MaskError`."""
    counts = np.bincount(label_map.reshape(-1), minlength=256)
    bad = [b + len(classes) for b in np.flatnonzero(counts[len(classes):]).tolist()]
    bad = [b for b in bad if b != IGNORE_INDEX]
    if bad:
        raise MaskError(f"label map has values {bad[:5]} outside 0..{len(classes) - 1} and {IGNORE_INDEX}")
    return label_map_results(label_map, dict(enumerate(classes)), controls)


def validate_brush_prediction(
    prediction: Mapping[str, Any],
    controls: BrushControls,
    size: tuple[int, int],
    where: str,
    *,
    decode_rle: bool = True,
) -> None:
    """Check a brush prediction before sending: names, labels, sizes (``size`` = (width, height)
    of the image) and every RLE (fully decoded, or with ``decode_rle=False`` only its bytes and
    header, for RLEs :func:`.rle.encode` just made)."""
    if not isinstance(prediction.get("result"), list):
        raise MadsegError(f"{where}: prediction has no result list")
    score = prediction.get("score")
    if score is not None and not (isinstance(score, (int, float)) and np.isfinite(score)):
        raise MadsegError(f"{where}: prediction score {score!r} is not a finite number")
    w, h = size
    labels = set(controls.labels)
    for r in prediction["result"]:
        if r.get("from_name") != controls.from_name or r.get("to_name") != controls.to_name:
            raise MadsegError(f"{where}: result names {r.get('from_name')!r}->{r.get('to_name')!r}, the "
                              f"project expects {controls.from_name!r}->{controls.to_name!r}")
        if r.get("type") != "brushlabels":
            raise MadsegError(f"{where}: result type {r.get('type')!r}, expected 'brushlabels'")
        if (r.get("original_width"), r.get("original_height")) != (w, h):
            raise MadsegError(f"{where}: result size {r.get('original_width')}x{r.get('original_height')} "
                              f"differs from the image's {w}x{h}")
        value = r.get("value") or {}
        names = value.get("brushlabels")
        if not isinstance(names, list) or len(names) != 1 or names[0] not in labels:
            raise MadsegError(f"{where}: brush labels {names!r} are not one of the project's labels")
        (decode if decode_rle else check_rle)(value.get("rle"), h, w, where=f"{where}, label {names[0]!r}")


def annotation_mask(
    result: Sequence[Mapping[str, Any]], classes: Sequence[str], controls: BrushControls, where: str
) -> np.ndarray | None:
    """The (H, W) uint8 class map of a brush annotation's ``result`` (unpainted pixels 255;
    where regions overlap the later one wins). None if it has no brush regions.

    Regions of other controls are skipped; a region with several or unknown labels, no sizes,
    sizes differing from an earlier region, or bad RLE raises :class:`AnnotationError` /
    :class:`.rle.RLEError` naming ``where`` and the region.
    """
    index = {name: k for k, name in enumerate(classes)}
    mask: np.ndarray | None = None
    size: tuple[int, int] | None = None
    for n, r in enumerate(result):
        if not isinstance(r, Mapping) or r.get("type") != "brushlabels":
            continue
        if r.get("from_name") != controls.from_name:
            continue
        value = r.get("value") if isinstance(r.get("value"), Mapping) else {}
        names = value.get("brushlabels")
        if not isinstance(names, list) or len(names) != 1:
            raise AnnotationError(f"{where}, region {n + 1}: brush region has labels {names!r}; "
                                  "give each region exactly one label in Label Studio")
        if names[0] not in index:
            raise AnnotationError(f"{where}, region {n + 1}: unknown label {names[0]!r}; the project's "
                                  f"classes are {list(classes)} — relabel the region or fix the class list")
        try:
            w, h = int(r["original_width"]), int(r["original_height"])
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(
                f"{where}, region {n + 1}: missing original_width/original_height"
            ) from None
        if size is None:
            size = (w, h)
            mask = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
        elif size != (w, h):
            raise AnnotationError(
                f"{where}: regions of sizes {size[0]}x{size[1]} and {w}x{h} in one annotation"
            )
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise AnnotationError(f"{where}, region {n + 1}: brush region without RLE data")
        alpha = decode(value["rle"], h, w, where=f"{where}, region {n + 1} ({names[0]})")
        assert mask is not None
        mask[alpha > 0] = index[names[0]]
    return mask
