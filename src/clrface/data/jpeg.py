"""Baseline JPEG (libjpeg's defaults, as PIL writes them) as batched tensor arithmetic, for degrading on a GPU.

PIL's codec runs one image at a time on the CPU; on a GPU that round trip (copy out, encode, decode, copy
back) costs more than the rest of a training step. The codec's loss is all in a few linear steps and one
rounding, so it is reproduced here on [B, 3, H, W] tensors with one quality per image:

    RGB -> YCbCr (JFIF, BT.601 full range) -> Cb, Cr 2x2 averaged (4:2:0)
    -> 8x8 DCT -> coefficients rounded to multiples of the IJG tables scaled to q -> inverse DCT
    -> Cb, Cr upsampled with libjpeg's "fancy" triangle filter (bilinear x2) -> RGB, rounded to 8 bits

Images are padded by edge replication to whole 16x16 MCUs, as the encoder does. It differs from libjpeg only
in integer rounding inside the DCTs and colour conversion (tests: > 40 dB to PIL's output at q 30-90).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-T T.81 Annex K tables, the ones libjpeg scales by quality
_LUMA_Q = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
_CHROMA_Q = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32),
)


@functools.lru_cache(maxsize=8)
def _constants(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(DCT matrix, luma table, chroma table) on ``device``, made once: on a GPU every host-to-device copy waits
    for the queue. The orthonormal 8-point DCT-II D gives JPEG's F(u,v) = 1/4 C(u)C(v) sum f cos cos as D f D^T."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    luma, chroma = (torch.tensor(t, dtype=torch.float32).view(1, 8, 8) for t in (_LUMA_Q, _CHROMA_Q))
    return d.to(torch.float32).to(device), luma.to(device), chroma.to(device)


def quant_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    """IJG quality scaling (libjpeg's jpeg_quality_scaling, baseline-clamped to 1..255).
    quality: [B] integers in 1..100 -> (luma [B,8,8], chroma [B,8,8]) float32 on quality's device."""
    q = quality.to(torch.float32).clamp(1, 100)
    scale = torch.where(q < 50, torch.floor(5000 / q), 200 - 2 * q).view(-1, 1, 1)
    _, luma, chroma = _constants(q.device)
    return tuple(torch.floor((base * scale + 50) / 100).clamp(1, 255) for base in (luma, chroma))


def _quantise_planes(x: Tensor, table: Tensor) -> Tensor:
    """x: [B, C, H, W] level-shifted samples, H and W multiples of 8; table: [B, 8, 8] -> the decoded planes."""
    b, c, h, w = x.shape
    d = _constants(x.device)[0]
    blocks = x.reshape(b, c, h // 8, 8, w // 8, 8).transpose(3, 4)  # [B, C, nh, nw, 8, 8]
    coef = d @ blocks @ d.T
    t = table.view(b, 1, 1, 1, 8, 8)
    coef = torch.round(coef / t) * t
    return (d.T @ coef @ d).transpose(3, 4).reshape(b, c, h, w)


def jpeg_roundtrip(x: Tensor, quality: Tensor) -> Tensor:
    """Encodes and decodes each image at its quality. x: [B, 3, H, W] on the 0-255 scale (any float dtype,
    any device); quality: [B] integers -> float32 [B, 3, H, W] with integer values in 0..255."""
    if x.ndim != 4 or x.shape[1] != 3 or quality.shape != (x.shape[0],):
        raise ValueError(f"expected [B,3,H,W] and [B] qualities, got {tuple(x.shape)} and {tuple(quality.shape)}")
    h, w = x.shape[-2:]
    x = x.to(torch.float32)
    x = F.pad(x, (0, -w % 16, 0, -h % 16), mode="replicate")
    r, g, b = x.unbind(1)
    y = torch.round(0.299 * r + 0.587 * g + 0.114 * b)
    cb = torch.round(-0.168736 * r - 0.331264 * g + 0.5 * b + 128)
    cr = torch.round(0.5 * r - 0.418688 * g - 0.081312 * b + 128)
    chroma = torch.round(F.avg_pool2d(torch.stack([cb, cr], 1), 2))
    luma_t, chroma_t = quant_tables(quality.to(x.device))
    y = torch.round(_quantise_planes(y[:, None] - 128, luma_t) + 128).clamp(0, 255)
    chroma = torch.round(_quantise_planes(chroma - 128, chroma_t) + 128).clamp(0, 255)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False) - 128
    cb, cr = chroma.unbind(1)
    y = y[:, 0]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return torch.round(rgb).clamp(0, 255)[..., :h, :w]
