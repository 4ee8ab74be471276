"""Denoising score matching for the conditional prior (paper Eq. 9, in the EDM form of Karras et al. 2022, Eq. 8)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from clrface.diffusion.schedule import loss_weight

# (x [B,C,H,W], sigma [B], cond [B,Cc,H,W]) -> D(x; sigma | cond); a ``Precond`` is one.
CondDenoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def denoiser_loss(precond: CondDenoiser, x: Tensor, sigma: Tensor, cond: Tensor, target: Tensor) -> Tensor:
    """Per-sample weighted regression ``lambda(sigma) * mean_chw |D(x; sigma, cond) - target|^2`` -> [B].

    x: [B,C,H,W] at noise level sigma [B]; target: what D should return there (the clean z0 for denoising
    score matching, the teacher's ODE end point for distillation). lambda = 1/c_out^2 (``loss_weight``), read
    from ``precond.sigma_data`` (1.0 if absent), so the loss is the MSE of the raw net output against its
    target (target - c_skip x)/c_out. Computed in fp32 (fp64 for fp64 inputs) whatever autocast the net runs under.
    """
    dtype = torch.promote_types(target.dtype, torch.float32)
    sigma = sigma.to(device=x.device, dtype=dtype).reshape(-1)
    denoised = precond(x.to(dtype), sigma, cond).to(dtype)
    sigma_data = float(getattr(precond, "sigma_data", 1.0))
    err = (denoised - target.to(dtype)).square().flatten(1).mean(1)
    return loss_weight(sigma, sigma_data) * err


def edm_loss(precond: CondDenoiser, z0: Tensor, cond: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """Denoising score matching (paper Eq. 9): ``denoiser_loss`` at x = z0 + sigma * noise with target z0 -> [B].

    z0: [B,C,H,W] clean (normalised) latents; cond: [B,Cc,H,W] the degraded latent z^d, passed to the
    net unnoised; sigma: [B] (e.g. ``sample_train_sigma``); noise: [B,C,H,W] standard normal.
    Pure: the caller supplies sigma and noise. Sits near 1 for an untrained net on unit-variance data.
    """
    dtype = torch.promote_types(z0.dtype, torch.float32)
    s = sigma.to(device=z0.device, dtype=dtype).reshape(-1, *([1] * (z0.ndim - 1)))
    return denoiser_loss(precond, z0.to(dtype) + s * noise.to(dtype), sigma, cond, z0)


def start_state_noise(z0: Tensor, z_start: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """The ``noise`` that makes ``edm_loss``'s input z0 + sigma * noise equal z_start + sigma * noise_given.

    Training on the states the sampler really starts from (the IRN output's latent plus noise at sigma_start)
    needs no other loss: the target stays z0, only the noisy input moves, so ``edm_loss(.., sigma, returned)``
    is the EDM loss at x = z_start + sigma * noise. z0, z_start, noise: [B,C,H,W]; sigma: [B] > 0.
    """
    s = sigma.to(z0.dtype).reshape(-1, *([1] * (z0.ndim - 1)))
    return noise + (z_start - z0) / s
