"""Benchmark: ml_backend.labelstudio.rle (vectorised) against the Label Studio SDK's brush RLE codec.

For every object class in the real 500x375 masks of ``../shared/data/coco_voc`` (plus random
noise), times ``encode(mask)`` against ``mask2rle(np.where(mask != 0, 255, 0).astype(np.uint8))``
and against ``mask2rle`` of a ready 0/255 mask, and ``decode(rle, h, w)`` against
``decode_rle(rle).reshape(h, w, 4)[:, :, 3]`` (best of several runs each), checks the outputs are
equal, and prints the speed-ups. The headline mask is the largest object (the bicycle of
000000370208); the target is >= 20x for both directions.

    python benchmarks/rle.py
"""

from __future__ import annotations

import csv  # noqa: E402
import statistics  # noqa: E402
import sys
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from label_studio_sdk.converter.brush import decode_rle, mask2rle  # noqa: E402
from PIL import Image  # noqa: E402

from ml_backend.classes import IGNORE_INDEX, VOC_CLASSES  # noqa: E402
from ml_backend.labelstudio.rle import decode, encode  # noqa: E402
from ml_backend.shared import shared_dir  # noqa: E402

HEADLINE = ("000000370208", 2)
TARGET = 20.0


def best_time(fn: Callable[[], object], budget_s: float = 0.3, min_runs: int = 5) -> float:
    """Best wall time of ``fn()`` over repeated runs (at least ``min_runs``, about ``budget_s``)."""
    fn()
    best = float("inf")
    runs = 0
    start = time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def compare(mask: np.ndarray) -> dict[str, float]:
    """Timings (s) and speed-ups of ours vs the SDK on one (H, W) mask; asserts equal outputs."""
    h, w = mask.shape
    m255 = np.where(mask != 0, 255, 0).astype(np.uint8)
    rle = mask2rle(m255)
    assert encode(mask) == rle, "encode differs from the SDK"
    assert np.array_equal(decode(rle, h, w), decode_rle(rle).reshape(h, w, 4)[:, :, 3]), "decode differs"
    enc_sdk = best_time(lambda: mask2rle(m255))  # the SDK given a ready 0/255 uint8 mask
    enc_sdk_conv = best_time(lambda: mask2rle(np.where(mask != 0, 255, 0).astype(np.uint8)))  # from `mask`
    enc_ours = best_time(lambda: encode(mask))
    dec_sdk = best_time(lambda: decode_rle(rle).reshape(h, w, 4)[:, :, 3])
    dec_ours = best_time(lambda: decode(rle, h, w))
    return {"bytes": len(rle), "enc_sdk": enc_sdk, "enc_ours": enc_ours, "enc_x": enc_sdk / enc_ours,
            "enc_conv_x": enc_sdk_conv / enc_ours,
            "dec_sdk": dec_sdk, "dec_ours": dec_ours, "dec_x": dec_sdk / dec_ours}


def real_masks() -> list[tuple[str, np.ndarray]]:
    """(name, bool mask) for every object class of every 500x375 coco_voc mask."""
    data = shared_dir() / "data" / "coco_voc"
    out = []
    with open(data / "manifest.tsv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if (row["width"], row["height"]) != ("500", "375"):
                continue
            labels = np.asarray(Image.open(data / "masks" / f"{row['file']}.png"))
            for c in np.unique(labels).tolist():
                if c not in (0, IGNORE_INDEX):
                    out.append((f"{row['file']} {VOC_CLASSES[c]}", labels == c))
    return out


def _line(name: str, r: dict[str, float]) -> str:
    enc = (f"encode {r['enc_sdk'] * 1e3:7.2f} ms -> {r['enc_ours'] * 1e3:6.3f} ms ({r['enc_x']:5.1f}x; "
           f"{r['enc_conv_x']:5.1f}x with np.where)")
    dec = f"decode {r['dec_sdk'] * 1e3:7.2f} ms -> {r['dec_ours'] * 1e3:6.3f} ms ({r['dec_x']:5.1f}x)"
    return f"{name:<32} {r['bytes']:>7} B  {enc}  {dec}"


def main() -> int:
    masks = real_masks()
    results = {}
    for name, mask in masks:
        results[name] = compare(mask)
        print(_line(name, results[name]))
    noise = np.random.default_rng(0).random((375, 500)) < 0.5
    print(_line("random noise 50%", compare(noise)))
    head = f"{HEADLINE[0]} {VOC_CLASSES[HEADLINE[1]]}"
    r = results[head]
    enc = [v["enc_x"] for v in results.values()]
    dec = [v["dec_x"] for v in results.values()]
    print(f"\nheadline ({head}, 500x375): encode {r['enc_x']:.1f}x ({r['enc_conv_x']:.1f}x against "
          f"mask2rle(np.where(mask != 0, 255, 0).astype(np.uint8))), decode {r['dec_x']:.1f}x faster than "
          f"the SDK (target >= {TARGET:.0f}x)")
    print(f"all {len(results)} real 500x375 object masks: encode median {statistics.median(enc):.1f}x "
          f"(min {min(enc):.1f}x), decode median {statistics.median(dec):.1f}x (min {min(dec):.1f}x)")
    return 0 if min(r["enc_x"], r["dec_x"]) >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
