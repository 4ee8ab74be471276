from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clrface.checkpoint import save_checkpoint
from clrface.diffusion.prior import LatentPrior, PriorConfig
from clrface.diffusion.unet import UNetConfig
from clrface.identity.irn import IRN, IRNConfig
from clrface.vqgan.model import VQGAN, VQGANConfig

TINY_VQ = VQGANConfig(resolution=32, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, codebook_size=64)
TINY_UNET = UNetConfig(resolution=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                       head_channels=16, norm_groups=8)


@pytest.fixture
def tiny_models(tmp_path: Path) -> dict[str, Path]:
    """A folder of 12 smooth 32 px 'faces' and tiny random vqgan/prior/irn checkpoints."""
    torch.manual_seed(0)
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    for i in range(12):
        c = rng.uniform(0, 1, 3)
        img = (255 * np.clip(c[None, None] * (0.5 + 0.5 * np.sin(6 * xx + i)[..., None] * yy[..., None]), 0, 1)).astype(np.uint8)
        Image.fromarray(img).save(faces / f"f{i:02d}.png")
    out = {"faces": faces, "unet_cfg": TINY_UNET}
    out["vqgan"] = save_checkpoint(tmp_path / "vqgan", VQGAN(TINY_VQ), TINY_VQ, "vqgan")
    pcfg = PriorConfig(unet=TINY_UNET)
    out["prior"] = save_checkpoint(tmp_path / "prior", LatentPrior(pcfg), pcfg, "prior")
    icfg = IRNConfig(channels=(8, 16), blocks=(1, 1))
    out["irn"] = save_checkpoint(tmp_path / "irn", IRN(icfg), icfg, "irn")
    return out
