"""Benchmark: ``sampler.select.mad_select`` on N = 1e6 synthetic images, m = 5 competitors, C = 21.

Prints the seconds of one full selection (n3 = 20, bounds [0.01, 0.5] for every class), and of the
worst case where every class is rare (each problem ranks its few eligible images). Synthetic
areas: each image predicts background plus ~3 random foreground classes (Dirichlet fractions);
distances uniform in [0, 1] rounded to 3 decimals (so ties occur).

    .venv/bin/python benchmarks/selection.py [--n 1000000] [--m 5] [--classes 21] [--n3 20]
"""

import argparse
import time

import numpy as np


def synthetic_areas(rng: np.random.Generator, n: int, c: int, k: int = 3) -> np.ndarray:
    """(n, c) float32 area fractions: background + k random foreground classes per image."""
    areas = np.zeros((n, c), np.float32)
    cls = rng.integers(1, c, size=(n, k))
    frac = rng.dirichlet(np.ones(k + 1), size=n).astype(np.float32)
    areas[:, 0] = frac[:, 0]
    rows = np.arange(n)[:, None]
    np.add.at(areas, (np.broadcast_to(rows, cls.shape), cls), frac[:, 1:])
    return areas


def synthetic_inputs(n: int, m: int, c: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    target = synthetic_areas(rng, n, c)
    comps = np.stack([synthetic_areas(rng, n, c) for _ in range(m)])
    dist = np.round(rng.random((m, n)), 3)
    bounds = np.tile(np.array([[0.01, 0.5]]), (c, 1))
    return target, comps, dist, bounds


def time_mad_select(
    n: int = 1_000_000, m: int = 5, c: int = 21, n3: int = 20, repeats: int = 1, rare: bool = False
) -> float:
    """Best-of-``repeats`` seconds of one ``mad_select`` call on synthetic inputs.

    ``rare``: bounds that almost no image meets, so every problem takes the rare-class path.
    """
    from sampler.select import mad_select

    target, comps, dist, bounds = synthetic_inputs(n, m, c)
    if rare:
        bounds[:, 0], bounds[:, 1] = 0.7, 0.7001
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        rec = mad_select(target, comps, dist, bounds, n3)
        best = min(best, time.perf_counter() - t0)
    if not rare:
        assert len(rec) == m * (c - 1) * 2 * n3, len(rec)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=5)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--n3", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    s = time_mad_select(a.n, a.m, a.classes, a.n3, a.repeats)
    print(f"mad_select N={a.n:,} m={a.m} C={a.classes} n3={a.n3}: {s:.2f} s "
          f"(best of {a.repeats}; target < 5 s)")
    s = time_mad_select(a.n, a.m, a.classes, a.n3, a.repeats, rare=True)
    print(f"  worst case (every class rare, bounds [0.7, 0.7001]): {s:.2f} s")


if __name__ == "__main__":
    main()
