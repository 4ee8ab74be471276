"""Degradations beyond the paper's single round, toward what real photos show.

The paper's model (``degradation.py``) blurs, downsamples, adds noise and compresses once. Real inputs are
often degraded more than once (a print photographed and re-compressed), carry film grain or scan texture,
have faded colours, or are black and white. This module composes those steps around ``degrade_batch``:

    x_t = gray(x) with probability p_gray                      (target and input stay gray)
    x_d = degrade(x_t; first preset)
    x_d = degrade(x_d; second preset) with probability p_2nd  (a second, usually milder, round)
    x_d = fade(x_d) with probability p_fade                    (saturation, contrast, colour cast)
    x_d = x_d + grain with probability p_grain                 (full-resolution grain, after the rest)

Everything is batched on tensors in [-1, 1] and drawn from one ``torch.Generator``, so a training batch is a
pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from clrface.data.degradation import DegradationConfig, degrade_batch

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as the gray preset of degradation.py


@dataclass(frozen=True)
class RealisticConfig:
    second_prob: float = 0.5
    # the second round at 512 px (scaled with the first): mild blur, at most x8 down, less noise, JPEG 40-95
    second: DegradationConfig = DegradationConfig(
        name="second", blur_sigma=(0.1, 4.0), scale=(1.0, 8.0), noise=(0.0, 10.0), jpeg=(40, 95))
    fade_prob: float = 0.3
    saturation: tuple[float, float] = (0.2, 1.0)  # 1 keeps the colours, 0 is gray
    contrast: tuple[float, float] = (0.6, 1.0)  # toward the image mean
    cast: float = 0.08  # max per-channel offset in [-1, 1] units (yellowed or blue-ish prints)
    gray_prob: float = 0.1
    grain_prob: float = 0.2
    grain_sigma: tuple[float, float] = (2.0, 8.0)  # std on the 0-255 scale, luma only

    def __post_init__(self) -> None:
        if isinstance(self.second, dict):  # from YAML
            object.__setattr__(self, "second", DegradationConfig(**self.second))
        for f in ("saturation", "contrast", "grain_sigma"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        for f in ("second_prob", "fade_prob", "gray_prob", "grain_prob"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ValueError(f"{f} must lie in [0, 1], got {getattr(self, f)}")


def to_gray(x: Tensor) -> Tensor:
    """[B,3,H,W] -> the same shape with every channel set to the BT.601 luma."""
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x).contiguous()


def fade(x: Tensor, saturation: Tensor, contrast: Tensor, cast: Tensor) -> Tensor:
    """Faded colours. x: [B,3,H,W] in [-1,1]; saturation, contrast: [B] in [0,1]; cast: [B,3] offsets.

    Saturation blends each pixel toward its luma, contrast blends the image toward its mean, then the cast
    shifts each channel; the result is clamped to [-1, 1]."""
    s, c = saturation.view(-1, 1, 1, 1), contrast.view(-1, 1, 1, 1)
    y = to_gray(x) + s * (x - to_gray(x))
    m = y.mean((1, 2, 3), keepdim=True)
    y = m + c * (y - m)
    return (y + cast[:, :, None, None]).clamp(-1, 1)


def _uniform(n: int, lo_hi: tuple[float, float], g: torch.Generator) -> Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=g)


def degrade_realistic(x: Tensor, first: DegradationConfig, cfg: RealisticConfig,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """x: clean [B,3,H,W] in [-1,1] -> (degraded input, target). ``first`` is scaled to H by the caller; the
    second round is scaled here. The target is ``x``, or its gray version where the input was made gray."""
    g, dev = generator, x.device
    b, _, h, _ = x.shape

    def draw(prob: float) -> Tensor:  # drawn on the generator's CPU, used where x lives
        return (torch.rand(b, generator=g) < prob).to(dev)

    gray = draw(cfg.gray_prob)
    if gray.any():
        x = torch.where(gray.view(-1, 1, 1, 1), to_gray(x), x)
    x_d, _ = degrade_batch(x, first, g)
    second = draw(cfg.second_prob)
    if second.any():
        again, _ = degrade_batch(x_d[second], cfg.second.scale_to(h), g)
        x_d = x_d.clone()
        x_d[second] = again
    faded = draw(cfg.fade_prob) & ~gray
    if faded.any():
        n = int(faded.sum())
        cast = (torch.rand(n, 3, generator=g) * 2 - 1) * cfg.cast
        x_d[faded] = fade(x_d[faded], _uniform(n, cfg.saturation, g).to(dev), _uniform(n, cfg.contrast, g).to(dev),
                          cast.to(dev))
    grain = draw(cfg.grain_prob)
    if grain.any():
        n = int(grain.sum())
        sigma = _uniform(n, cfg.grain_sigma, g).view(-1, 1, 1, 1) / 127.5
        noise = torch.randn(n, 1, h, x.shape[-1], generator=g) * sigma
        x_d[grain] = (x_d[grain] + noise.to(dev)).clamp(-1, 1)
    if gray.any():  # colour noise and chroma subsampling of the rounds above would tint a black-and-white photo
        x_d = torch.where(gray.view(-1, 1, 1, 1), to_gray(x_d), x_d)
    # back on the 8-bit grid, as a real input file is
    x_d = x_d.add(1).mul(127.5).round().div(127.5).sub(1)
    return x_d.to(x.dtype), x


def degrade_mixed(x: Tensor, first: DegradationConfig, cfg: RealisticConfig | None, seed: int) -> tuple[Tensor, Tensor]:
    """(x_d, target) from one seed: the ``first`` round alone when ``cfg`` is None (target ``x``), else
    :func:`degrade_realistic` with a generator seeded ``seed``."""
    if cfg is None:
        return degrade_batch(x, first, generator=seed)[0], x
    return degrade_realistic(x, first, cfg, torch.Generator().manual_seed(seed))
