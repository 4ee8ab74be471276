import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clrface.data.jpeg import _CHROMA_Q, _LUMA_Q, jpeg_roundtrip, quant_tables


def textured_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs, a hard edge and fine noise texture: uint8 [h, w, 3] with every JPEG band busy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3)) + 40
    for _ in range(5):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
        img += rng.uniform(20, 90, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))[..., None]
    img += 50 * (xx > 0.6)[..., None] + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def pil_jpeg(img: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    return np.asarray(Image.open(buf).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def roundtrip(img: np.ndarray, q: int) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    return jpeg_roundtrip(x, torch.tensor([q]))[0].permute(1, 2, 0).numpy()


def test_quant_tables_follow_the_ijg_scaling():
    luma, chroma = quant_tables(torch.tensor([50, 100, 10, 90]))
    assert luma.shape == chroma.shape == (4, 8, 8)
    assert luma[0].flatten().tolist() == list(_LUMA_Q) and chroma[0].flatten().tolist() == list(_CHROMA_Q)
    assert luma[1].eq(1).all() and chroma[1].eq(1).all()  # q 100: scale 0, clamped to 1
    assert luma[2, 0, 0] == 80 and chroma[2].max() == 255  # q 10: scale 500 (16 * 5), clamped to 255
    assert luma[3, 0, 0] == 3  # q 90: scale 20, (16 * 20 + 50) // 100


@pytest.mark.parametrize("size", [(64, 64), (37, 53), (9, 12)])
@pytest.mark.parametrize("q", [30, 60, 90])
def test_matches_pil_libjpeg(size, q):
    img = textured_image(*size, seed=q)
    ours, pil = roundtrip(img, q), pil_jpeg(img, q)
    assert ours.dtype == np.float32 and np.array_equal(ours, ours.round())
    # the same codec up to integer rounding inside the DCT and colour conversion (measured 43-48 dB on faces)
    assert psnr(ours, pil) > 40
    # and the same loss: within 0.3 dB of libjpeg's distance to the original
    assert abs(psnr(ours, img) - psnr(pil, img)) < 0.3


def test_lower_quality_loses_more_and_each_image_gets_its_own_quality():
    img = textured_image(48, 48)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().repeat(3, 1, 1, 1)
    out = jpeg_roundtrip(x, torch.tensor([20, 50, 95])).permute(0, 2, 3, 1).numpy()
    scores = [psnr(o, img) for o in out]
    assert scores[0] < scores[1] < scores[2]
    assert np.array_equal(out[1], roundtrip(img, 50))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected \[B,3,H,W\]"):
        jpeg_roundtrip(torch.zeros(2, 1, 16, 16), torch.tensor([50, 50]))
    with pytest.raises(ValueError, match=r"and \[B\] qualities"):
        jpeg_roundtrip(torch.zeros(2, 3, 16, 16), torch.tensor([50]))
