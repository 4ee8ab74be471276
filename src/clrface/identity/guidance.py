"""Masked identity guidance of the latent prior (paper Sec. 3.3, Eq. 11).

At every denoiser call the estimate x0 = D(z_t; sigma, z^d) is decoded to a face (G(Q(.)), the quantizer
passed straight through), embedded by the face recogniser and compared with the identity e_id of the IRN
output; the gradient of the cosine distance moves x0, but only where the latent mask M_l = f_M(z_t) allows:

    x0' = x0 - scale * M_l(z_t, sigma) * grad_x0 (1 - cos(phi(G(Q(x0))), e_id))

The wrapper has the signature of the denoiser it wraps, so every sampler works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrface.checkpoint import load_weights, read_config
from clrface.diffusion.sampler import Denoise
from clrface.errors import CheckpointError

MaskFn = Callable[[Tensor, Tensor], Tensor]
"""(z_t [B,C,h,w], sigma [B]) -> mask [B,1 or C,h,w] in [0, 1]."""


@dataclass(frozen=True)
class MaskConfig:
    """f_M: ``num_layers`` 3x3 convs with SiLU between them, a sigmoid at the end.

    use_sigma: append c_noise = ln(sigma)/4 as a constant input channel, so the mask may depend on the
    noise level. out_channels: 1 (one weight per latent position, shared by the channels) or latent_channels.
    """

    latent_channels: int = 3
    hidden_channels: int = 32
    num_layers: int = 3
    use_sigma: bool = True
    out_channels: int = 1

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.out_channels not in (1, self.latent_channels):
            raise ValueError(f"out_channels must be 1 or latent_channels ({self.latent_channels}), "
                             f"got {self.out_channels}")


class LatentMask(nn.Module):
    """M_l = f_M(z_t): where identity guidance may change the latent (paper Sec. 3.3).

    forward(x [B,C,h,w] current (noisy, normalised) latent, sigma [B] or scalar or None) -> [B,out,h,w] in (0, 1).
    """

    def __init__(self, cfg: MaskConfig):
        super().__init__()
        self.config = cfg
        cin = cfg.latent_channels + int(cfg.use_sigma)
        layers: list[nn.Module] = []
        for i in range(cfg.num_layers):
            last = i == cfg.num_layers - 1
            layers.append(nn.Conv2d(cin, cfg.out_channels if last else cfg.hidden_channels, 3, padding=1))
            if not last:
                layers.append(nn.SiLU())
            cin = cfg.hidden_channels
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        h = x
        if self.config.use_sigma:
            if sigma is None:
                raise ValueError("this mask depends on sigma: pass it")
            s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
            c_noise = (s.clamp(min=1e-20).log() / 4).to(x.dtype).view(-1, 1, 1, 1)
            h = torch.cat([x, c_noise.expand(-1, 1, *x.shape[2:])], dim=1)
        return torch.sigmoid(self.net(h))


def load_mask(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LatentMask:
    """A frozen LatentMask (eval mode) from a checkpoint folder of kind ``"mask"``."""
    try:
        cfg, _ = read_config(folder, "mask", MaskConfig)
    except ValueError as e:
        raise CheckpointError(f"{folder}: invalid mask config ({e})") from None
    model = load_weights(folder, LatentMask(cfg))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def identity_guided(
    denoise: Denoise,
    mask_net: MaskFn | None,
    decode: Callable[[Tensor], Tensor],
    facerec_embed: Callable[[Tensor], Tensor],
    e_id: Tensor,
    scale: float | Tensor,
) -> Denoise:
    """Wraps ``denoise`` with masked identity guidance (paper Sec. 3.3, Eq. 11); same signature as ``denoise``.

    decode: latent [B,C,h,w] in the sampler's space -> face [B,3,S,S] in [-1,1], differentiable (for the
    prior: ``vqgan.decode(prior.denormalize(z))``, Q straight-through). facerec_embed: face -> [B,D].
    e_id: [B,D] target identity (normalised here). mask_net(x, sigma) -> [B,1|C,h,w]; None means M_l = 1
    (unmasked guidance). scale: one number, or one per face [B] (a face guided by a reference photo is pushed
    harder than one guided by its own IRN output). scale = 0 returns ``denoise``'s output untouched (no decode,
    no gradient).
    Runs under the caller's ``no_grad``; the gradient is taken in an ``enable_grad`` island (which is why the
    sampler must not run under ``inference_mode``).
    """
    target = e_id.detach()
    target = F.normalize(target.to(torch.promote_types(target.dtype, torch.float32)), dim=-1)

    per_face = isinstance(scale, Tensor)
    off = not bool(torch.as_tensor(scale).any())

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        x0 = denoise(x, sigma)
        if off:
            return x0
        with torch.enable_grad():
            x0g = x0.detach().requires_grad_(True)
            e = facerec_embed(decode(x0g))
            e = F.normalize(e.to(torch.promote_types(e.dtype, torch.float32)), dim=-1)
            # Summed over the batch: each face's loss depends only on its own latent, so the gradient
            # of the sum is the per-face gradient.
            loss = (1 - (e * target.to(e.device, e.dtype)).sum(-1)).sum()
            (grad,) = torch.autograd.grad(loss, x0g)
        m = 1.0 if mask_net is None else mask_net(x, sigma).to(x0.dtype)
        w = scale.to(x0.device, x0.dtype).view(-1, 1, 1, 1) if per_face else scale
        return x0 - w * m * grad.to(x0.dtype)

    return guided
