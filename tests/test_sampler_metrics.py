"""Unit tests of sampler.metrics: map distances (numpy and batched torch), areas, entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampler.metrics import (
    area_fractions_torch,
    batch_confusion_torch,
    labels_from_probs_torch,
    map_distance,
    map_distances_torch,
    mean_entropy_torch,
    prediction_confusion_torch,
)


def _miou_reference(a: np.ndarray, b: np.ndarray, c: int, ignore: int = 255) -> float:
    """Loop-based reference of 1 - mIoU over classes present in either map."""
    valid = (a != ignore) & (b != ignore)
    if not valid.any():
        return 0.0
    ious = []
    for k in range(c):
        inter = np.sum((a == k) & (b == k) & valid)
        union = np.sum(((a == k) | (b == k)) & valid)
        if union:
            ious.append(inter / union)
    return 1.0 - float(np.mean(ious))


def test_identical_maps_have_zero_distance():
    a = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    assert map_distance(a, a, 3) == 0.0
    assert map_distance(a, a, 3, metric="pixel_accuracy") == 0.0


def test_hand_computed_miou_and_pixel_accuracy():
    a = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    b = np.array([[0, 1, 1, 1]], dtype=np.uint8)
    # class 0: inter 1, union 2 -> 0.5; class 1: inter 2, union 3 -> 2/3; class 2 absent
    assert map_distance(a, b, 3) == pytest.approx(1 - (0.5 + 2 / 3) / 2)
    assert map_distance(a, b, 3, metric="pixel_accuracy") == pytest.approx(0.25)


def test_disjoint_maps_have_distance_one():
    a = np.zeros((4, 4), np.uint8)
    b = np.ones((4, 4), np.uint8)
    assert map_distance(a, b, 2) == 1.0
    assert map_distance(a, b, 2, metric="pixel_accuracy") == 1.0


def test_ignore_pixels_are_excluded_in_either_map():
    a = np.array([[0, 1, 255, 1]], dtype=np.uint8)
    b = np.array([[0, 255, 2, 1]], dtype=np.uint8)
    # valid pixels: 0 and 3, both agree; class 2 only occurs at an ignored pixel
    assert map_distance(a, b, 3) == 0.0
    assert map_distance(a, b, 3, metric="pixel_accuracy") == 0.0


def test_no_valid_pixel_gives_zero():
    a = np.full((3, 3), 255, np.uint8)
    b = np.zeros((3, 3), np.uint8)
    assert map_distance(a, b, 21) == 0.0
    assert map_distance(a, b, 21, metric="pixel_accuracy") == 0.0


def test_shape_mismatch_and_bad_metric_raise():
    with pytest.raises(ValueError, match="shape"):
        map_distance(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="metric"):
        map_distance(np.zeros((2, 2)), np.zeros((2, 2)), 2, metric="dice")


def test_numpy_matches_reference_and_torch_batch_on_random_maps():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, size=(7, 13, 11)).astype(np.uint8)
    b = rng.integers(0, 6, size=(7, 13, 11)).astype(np.uint8)
    a[rng.random(a.shape) < 0.1] = 255
    b[rng.random(b.shape) < 0.1] = 255
    b[3] = a[3]  # one identical pair
    b[5] = 255  # one pair without valid pixels
    batch = {m: map_distances_torch(torch.from_numpy(a), torch.from_numpy(b), 6, m).numpy()
             for m in ("miou", "pixel_accuracy")}
    for i in range(a.shape[0]):
        ref = _miou_reference(a[i], b[i], 6)
        assert map_distance(a[i], b[i], 6) == pytest.approx(ref, abs=1e-12)
        assert batch["miou"][i] == pytest.approx(ref, abs=1e-12)
        valid = (a[i] != 255) & (b[i] != 255)
        pa = 0.0 if not valid.any() else 1 - np.mean(a[i][valid] == b[i][valid])
        assert batch["pixel_accuracy"][i] == pytest.approx(pa, abs=1e-12)
        assert map_distance(a[i], b[i], 6, "pixel_accuracy") == pytest.approx(pa, abs=1e-12)
    assert batch["miou"][3] == 0.0 and batch["miou"][5] == 0.0


def test_distance_is_symmetric():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(9, 9))
    b = rng.integers(0, 4, size=(9, 9))
    assert map_distance(a, b, 4) == pytest.approx(map_distance(b, a, 4))


def test_area_fractions_and_entropy():
    maps = torch.tensor([[[0, 0], [1, 2]], [[2, 2], [2, 2]]], dtype=torch.uint8)
    areas = area_fractions_torch(maps, 3)
    assert areas.shape == (2, 3)
    assert torch.allclose(areas, torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]]))
    uniform = torch.full((1, 4, 2, 2), 0.25)
    onehot = torch.zeros((1, 4, 2, 2))
    onehot[:, 1] = 1.0
    ent = mean_entropy_torch(torch.cat([uniform, onehot]))
    assert ent[0].item() == pytest.approx(np.log(4), rel=1e-6)
    assert ent[1].item() == 0.0


def test_fast_prediction_paths_match_the_general_ones():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 21, 17, 19, generator=g), 1)
    lab = labels_from_probs_torch(probs)
    assert lab.dtype == torch.uint8 and torch.equal(lab.long(), probs.argmax(1))
    other = torch.roll(lab, 2, dims=2)
    assert torch.equal(prediction_confusion_torch(lab, other, 21), batch_confusion_torch(lab, other, 21))
