"""VQGAN training objective (paper Eq. 2): L1 + perceptual + adversarial (adaptive weight, Esser et al. 2021)
+ codebook (EMA, see quantizer.py) + commitment."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrface.metrics.noref import laplacian


def gradient_l1(x: Tensor, y: Tensor) -> Tensor:
    """Mean L1 between finite-difference image gradients; sharpens an L1-trained decoder cheaply."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(x) - dx(y)).abs().mean() + (dy(x) - dy(y)).abs().mean()


def laplacian_energy(x: Tensor, window: int) -> Tensor:
    """RMS of the per-channel 3x3 Laplacian over non-overlapping ``window`` x ``window`` blocks:
    x [B,C,H,W] -> [B,C,H/window,W/window]."""
    b, c, h, w = x.shape
    lap = laplacian(F.pad(x, (1, 1, 1, 1), mode="replicate").flatten(0, 1)).view(b, c, h, w)
    return (F.avg_pool2d(lap.square(), window) + 1e-6).sqrt()


def detail_energy_l1(x: Tensor, y: Tensor, window: int = 8) -> Tensor:
    """Mean L1 between the local Laplacian energies of x and y. Blind to where inside a block a pore or hair
    falls, so unlike L1 or gradient L1 it does not reward averaging away detail the latent leaves uncertain:
    a decoder trained with it is paid for drawing texture of the right strength."""
    return (laplacian_energy(x, window) - laplacian_energy(y, window)).abs().mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """lambda = ||grad_G_L(rec)|| / (||grad_G_L(adv)|| + eps) at the decoder's last layer (Esser et al. 2021, Eq. 7)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
