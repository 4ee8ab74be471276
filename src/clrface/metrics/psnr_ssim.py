"""PSNR and SSIM, per image, on RGB or on the BT.601 luma (Y) channel.

Inputs are ``[B,3,H,W]`` tensors, either float in [-1, 1] (the package convention) or ``uint8`` in [0, 255];
both are mapped to [0, 1] in float64 before any arithmetic. Float inputs are *not* quantised to 8 bit (so a
validation call during training sees the network output as is); files read by ``evaluate_folders`` are uint8.

Protocol, as in BasicSR's ``calculate_psnr_pt`` / ``calculate_ssim_pt`` that VQFR and PMRF call with
``crop_border=0, test_y_channel=False``: the headline PSNR/SSIM rows of our tables are **RGB** (SSIM averaged
over the three channels); ``psnr_y`` / ``ssim_y`` are the Y-channel variants (``Y = 16 + 65.481 R + 128.553 G +
24.966 B`` on [0, 1] RGB, divided by 255, BasicSR ``rgb2ycbcr_pt``), reported in separate rows.

PSNR of identical images is infinite; we cap every per-image value at ``PSNR_CAP_DB`` = 100 dB so that means
over a folder and the JSON output stay finite (two 8-bit 128 px images differing by one grey level in one pixel
still give 95.1 dB < 100).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrface.metrics.meter import MeanMeter

PSNR_CAP_DB = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

_Y_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601 for [0, 1] RGB -> Y in [16, 235]


def to_unit(x: Tensor) -> Tensor:
    """[B,3,H,W] uint8 in [0,255] or float in [-1,1] -> float64 in [0,1] (floats clamped)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float64) / 255.0
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {x.dtype}")
    return ((x.detach().to(torch.float64) + 1.0) / 2.0).clamp(0.0, 1.0)


def rgb_to_y(x: Tensor) -> Tensor:
    """[B,3,H,W] RGB in [0,1] -> [B,1,H,W] BT.601 luma in [16/255, 235/255] (BasicSR ``rgb2ycbcr_pt``)."""
    w = x.new_tensor(_Y_WEIGHTS).view(1, 3, 1, 1)
    return ((x * w).sum(1, keepdim=True) + 16.0) / 255.0


def _pair(pred: Tensor, gt: Tensor, y: bool) -> tuple[Tensor, Tensor]:
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected two [B,3,H,W] images of equal shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    a, b = to_unit(pred), to_unit(gt)
    return (rgb_to_y(a), rgb_to_y(b)) if y else (a, b)


def psnr(pred: Tensor, gt: Tensor, *, y_channel: bool = False, cap_db: float = PSNR_CAP_DB) -> Tensor:
    """Per-image PSNR in dB, ``10 log10(1 / MSE)`` on [0,1] intensities. pred, gt: [B,3,H,W]. Returns [B] float64.

    RGB (MSE over all three channels) unless ``y_channel``; values are capped at ``cap_db`` (identical -> cap).
    """
    a, b = _pair(pred, gt, y_channel)
    mse = (a - b).pow(2).mean((1, 2, 3))
    out = torch.full_like(mse, float(cap_db))
    nz = mse > 0
    out[nz] = (-10.0 * torch.log10(mse[nz])).clamp(max=cap_db)
    return out


def psnr_y(pred: Tensor, gt: Tensor, *, cap_db: float = PSNR_CAP_DB) -> Tensor:
    """``psnr`` on the BT.601 Y channel. Returns [B]."""
    return psnr(pred, gt, y_channel=True, cap_db=cap_db)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype: torch.dtype = torch.float64) -> Tensor:
    """[size, size] normalised Gaussian, the outer product of a sampled 1-D Gaussian (as ``cv2.getGaussianKernel``)."""
    t = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: Tensor, gt: Tensor, *, y_channel: bool = False) -> Tensor:
    """Per-image SSIM (Wang et al. 2004, Eq. 13): 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, L = 1.

    Statistics over 'valid' window positions only (no padding, as BasicSR ``_ssim_pth``); the SSIM map is
    averaged over positions and over channels (RGB) or taken on Y (``y_channel``). pred, gt: [B,3,H,W] with
    H, W >= 11. Returns [B] float64; identical images give exactly 1.
    """
    a, b = _pair(pred, gt, y_channel)
    c = a.shape[1]
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}")
    g = gaussian_window(dtype=a.dtype).to(a.device)
    g1 = g.sum(0)  # the window is separable: two 1-D passes (22 instead of 121 taps)
    wv = g1.view(1, 1, -1, 1).expand(c, 1, SSIM_WINDOW, 1)
    wh = g1.view(1, 1, 1, -1).expand(c, 1, 1, SSIM_WINDOW)
    c1, c2 = SSIM_K1**2, SSIM_K2**2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(x, wv, groups=c), wh, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean((1, 2, 3))


def ssim_y(pred: Tensor, gt: Tensor) -> Tensor:
    """``ssim`` on the BT.601 Y channel. Returns [B]."""
    return ssim(pred, gt, y_channel=True)


class PSNR(MeanMeter):
    """Mean per-image PSNR (RGB, or Y with ``y_channel=True``), capped at 100 dB."""

    def __init__(self, y_channel: bool = False) -> None:
        super().__init__(psnr_y if y_channel else psnr)


class SSIM(MeanMeter):
    """Mean per-image SSIM (RGB channel mean, or Y with ``y_channel=True``)."""

    def __init__(self, y_channel: bool = False) -> None:
        super().__init__(ssim_y if y_channel else ssim)
