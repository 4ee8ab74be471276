"""EDM preconditioning around any net (Karras et al. 2022, Table 1 and Eq. 7).

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma); cond), with the
condition z^d handed to F unchanged (never noised, never scaled; paper Sec. 3.2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# c_noise = ln(sigma)/4 is -inf at sigma = 0; a floor keeps F finite there, where c_out = 0 anyway.
_SIGMA_FLOOR = 1e-20


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Karras et al. 2022, Table 1: ``(c_skip, c_out, c_in, c_noise)``, each the shape of ``sigma``.

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (sigma floored at 1e-20).
    Computed in ``sigma``'s dtype; pass fp32 or fp64.
    """
    r = (sigma**2 + sigma_data**2).rsqrt()
    c_skip = sigma_data**2 * r**2
    c_out = sigma * sigma_data * r
    c_noise = sigma.clamp(min=_SIGMA_FLOOR).log() / 4
    return c_skip, c_out, r, c_noise


class Precond(nn.Module):
    """Wraps ``net(x_in [B,C,H,W], c_noise [B], cond=...) -> [B,C,H,W]`` into the denoiser D(x; sigma).

    The sigma math runs in fp32 (fp64 when x is fp64), outside any autocast region; only the net runs
    under the caller's autocast, and its output is cast back before the skip connection.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 1.0):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """x: [B,C,H,W] noisy latent; sigma: scalar or [B]; cond: [B,Cc,H,W] -> D(x; sigma) [B,C,H,W] in x.dtype."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype)
        sigma = sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        xf = x.to(dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
            x_in = c_in * xf
        f = self.net(x_in, c_noise.flatten(), cond=cond)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return (c_skip * xf + c_out * f.to(dtype)).to(x.dtype)
