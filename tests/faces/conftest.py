"""Shared fixtures for the face geometry tests: synthetic photos and (optional) the shared real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clrface.data.io import DATA_ENV, data_root

DATA = data_root()


def smooth_photo(h: int, w: int, seed: int = 0, fmax: float = 0.08) -> np.ndarray:
    """uint8 [h, w, 3] band-limited texture (sum of random low-frequency sinusoids)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w].astype(np.float64)
    out = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(6):
            fx, fy = rng.uniform(-fmax, fmax, 2)
            out[..., c] += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6.3))
    return np.clip(128 + 20 * out, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (DATA / "faces128" / "val").is_dir():
        pytest.skip(f"shared data not found at {DATA} (set {DATA_ENV})")
    return DATA


@pytest.fixture(scope="session")
def make_photo():
    return smooth_photo
