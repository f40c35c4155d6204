"""Baseline selections on the same score store (pure logic: numpy only).

- ``entropy_select(entropy, n)``: the ``n`` images with the largest mean per-pixel softmax
  entropy of the target (ties: smaller image index first), in that order.
- ``random_select(num_images, n, seed)``: ``n`` distinct image indices drawn uniformly with
  ``numpy.random.default_rng(seed)``; the same (num_images, n, seed) always gives the same list.

Both return int64 arrays of image indices (at most ``n``; fewer when the pool is smaller).
"""

from __future__ import annotations

import numpy as np


def entropy_select(entropy: np.ndarray, n: int) -> np.ndarray:
    """Indices of the top-``n`` entries of ``entropy`` (N,), largest first, ties by index."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    e = np.asarray(entropy, dtype=np.float64)
    if e.ndim != 1:
        raise ValueError(f"entropy must be (N,), got shape {e.shape}")
    if np.isnan(e).any():
        raise ValueError("entropy contains NaN")
    order = np.argsort(-e, kind="stable")
    return order[: min(n, e.size)].astype(np.int64)


def random_select(num_images: int, n: int, seed: int = 0) -> np.ndarray:
    """``min(n, num_images)`` distinct indices in ``0..num_images-1``, seeded."""
    if n < 0 or num_images < 0:
        raise ValueError(f"n and num_images must be >= 0, got n={n}, num_images={num_images}")
    rng = np.random.default_rng(seed)
    return rng.choice(num_images, size=min(n, num_images), replace=False).astype(np.int64)
