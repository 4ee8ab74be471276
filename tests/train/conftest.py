from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clrface.diffusion.prior import load_prior


@pytest.fixture
def tiny_models(tmp_path: Path, tiny_model_builder) -> dict[str, Path]:
    """A folder of 12 smooth 32 px 'faces' and the tiny random vqgan/prior/irn checkpoints of the root conftest."""
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    for i in range(12):
        c = rng.uniform(0, 1, 3)
        shade = 0.5 + 0.5 * np.sin(6 * xx + i)[..., None] * yy[..., None]
        img = (255 * np.clip(c[None, None] * shade, 0, 1)).astype(np.uint8)
        Image.fromarray(img).save(faces / f"f{i:02d}.png")
    model = tiny_model_builder(tmp_path / "model", mask=False)
    out = {"faces": faces, **{stage: model / stage for stage in ("vqgan", "prior", "irn")}}
    out["unet_cfg"] = load_prior(out["prior"]).config.unet
    return out
