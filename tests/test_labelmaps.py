"""The one nearest-neighbour label-map resize (ml_backend.labelmaps.resize_labels)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ml_backend.errors import MadsegError
from ml_backend.labelmaps import resize_labels


def test_integer_upscaling_repeats_each_label() -> None:
    lm = np.array([[0, 15], [255, 3]], np.uint8)
    out = resize_labels(lm, (4, 6))
    assert out.dtype == np.uint8 and out.shape == (4, 6)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(lm, 2, axis=0), 3, axis=1))


def test_same_as_pil_nearest_for_any_size() -> None:
    rng = np.random.default_rng(0)
    lm = rng.integers(0, 21, (37, 53)).astype(np.uint8)
    for shape in [(10, 11), (100, 7), (37, 53), (64, 64)]:
        ref = np.asarray(Image.fromarray(lm, mode="L").resize((shape[1], shape[0]), Image.NEAREST))
        np.testing.assert_array_equal(resize_labels(lm, shape), ref)
    # labels only: no value appears that was not in the input
    assert set(np.unique(resize_labels(lm, (91, 13)))) <= set(np.unique(lm))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(MadsegError, match=r"\(H, W\) array"):
        resize_labels(np.zeros((2, 2, 3), np.uint8), (4, 4))
    with pytest.raises(MadsegError, match="both sides"):
        resize_labels(np.zeros((2, 2), np.uint8), (0, 4))
    assert resize_labels(np.zeros((2, 2), np.int64), (2, 2)).dtype == np.uint8  # positive control
