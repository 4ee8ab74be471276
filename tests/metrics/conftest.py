"""Real faces for the metric tests (skipped when the shared data is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clrface.data.io import DATA_ENV, data_root, to_model_range

DATA = data_root()


@pytest.fixture(scope="session")
def val_dir() -> Path:
    d = DATA / "faces128" / "val"
    if not d.is_dir():
        pytest.skip(f"shared data not found at {DATA} (set {DATA_ENV})")
    return d


@pytest.fixture(scope="session")
def real_val_faces(val_dir) -> torch.Tensor:
    """[8,3,128,128] in [-1,1]: the first 8 val faces."""
    files = sorted(val_dir.glob("*.jpg"))[:8]
    a = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return to_model_range(a)
