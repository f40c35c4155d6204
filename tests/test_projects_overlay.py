"""Overlay images for the rating project."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ml_backend.classes import voc_palette
from ml_backend.errors import MadsegError
from projects.overlay import blend, write_overlay


def test_blend_colours_objects_and_keeps_background():
    img = np.full((40, 60, 3), 100, np.uint8)
    lm = np.zeros((40, 60), np.uint8)
    lm[10:30, 20:40] = 15  # person
    lm[0:5, 0:5] = 255     # ignore stays unblended
    out = blend(img, lm, alpha=0.5)
    np.testing.assert_array_equal(out[0:5, 0:5], img[0:5, 0:5])
    np.testing.assert_array_equal(out[35, 50], img[35, 50])
    inside = out[20, 30].astype(int)
    expected = (0.5 * 100 + 0.5 * voc_palette()[15].astype(float) + 0.5).astype(int)
    np.testing.assert_array_equal(inside, expected)
    np.testing.assert_array_equal(out[10, 39], voc_palette()[15])  # outline in full colour


def test_blend_resizes_label_map_and_writes_png(tmp_path):
    img = np.zeros((30, 40, 3), np.uint8)
    lm = np.zeros((15, 20), np.uint8)
    lm[:, 10:] = 8
    path = write_overlay(tmp_path / "sub" / "o.png", img, lm, alpha=1.0)
    arr = np.asarray(Image.open(path))
    assert arr.shape == (30, 40, 3)
    np.testing.assert_array_equal(arr[5, 30], voc_palette()[8])
    assert not list((tmp_path / "sub").glob(".*tmp"))


def test_blend_bad_input():
    with pytest.raises(MadsegError, match="alpha"):
        blend(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8), alpha=2)
    with pytest.raises(MadsegError, match="photo"):
        blend(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))
