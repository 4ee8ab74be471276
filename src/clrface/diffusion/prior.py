"""The conditional latent prior as one loadable module (paper Sec. 3.2): D(z_t; sigma, z^d) on normalised latents.

The prior runs on VQGAN latents E(x) standardised per channel with statistics measured on the training set,
so that sigma_data = 1 is a fair guess for the EDM scalings. The statistics live in the config (not in the
weights), because they describe the data the prior was trained on, not a parameter of the net.

Checkpoint folder (kind ``"prior"``): ``config.json`` holds ``asdict(PriorConfig)``, ``model.safetensors``
the state of :class:`LatentPrior` (keys ``precond.net.*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from clrface.checkpoint import load_weights, read_config
from clrface.diffusion.precond import Precond
from clrface.diffusion.schedule import ScheduleConfig
from clrface.diffusion.unet import UNet, UNetConfig
from clrface.errors import CheckpointError


@dataclass(frozen=True)
class PriorConfig:
    """Everything needed to rebuild the prior and to move between VQGAN latents and the prior's space.

    latent_mean/latent_std: per-channel statistics of E(x) on the training faces (length unet.latent_channels);
    z_norm = (z - mean) / std. schedule: the sampling schedule the prior was tuned for.
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    sigma_data: float = 1.0
    latent_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    latent_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        # config.json gives nested dicts and lists; keep the frozen config typed and hashable.
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig(**self.unet))
        if isinstance(self.schedule, dict):
            object.__setattr__(self, "schedule", ScheduleConfig(**self.schedule))
        object.__setattr__(self, "latent_mean", tuple(float(v) for v in self.latent_mean))
        object.__setattr__(self, "latent_std", tuple(float(v) for v in self.latent_std))
        c = self.unet.latent_channels
        if len(self.latent_mean) != c or len(self.latent_std) != c:
            raise ValueError(f"latent_mean/latent_std need {c} entries, "
                             f"got {len(self.latent_mean)}/{len(self.latent_std)}")
        if min(self.latent_std) <= 0:
            raise ValueError(f"latent_std must be positive, got {self.latent_std}")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")


class LatentPrior(nn.Module):
    """``precond = Precond(UNet(cfg.unet), sigma_data)`` plus the latent standardisation.

    forward(x [B,C,h,w] normalised noisy latent, sigma [B] or scalar, cond [B,C,h,w] normalised z^d)
    -> D(x; sigma, cond) [B,C,h,w] (Karras et al. 2022, Eq. 7).
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.config = cfg
        self.precond = Precond(UNet(cfg.unet), cfg.sigma_data)
        c = cfg.unet.latent_channels
        # Not persistent: the config is their single source of truth.
        self.register_buffer("latent_mean", torch.tensor(cfg.latent_mean).view(1, c, 1, 1), persistent=False)
        self.register_buffer("latent_std", torch.tensor(cfg.latent_std).view(1, c, 1, 1), persistent=False)

    def normalize(self, z: Tensor) -> Tensor:
        """VQGAN latent E(x) [B,C,h,w] -> the prior's space (z - mean) / std."""
        return (z - self.latent_mean.to(z.dtype)) / self.latent_std.to(z.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: z * std + mean."""
        return z * self.latent_std.to(z.dtype) + self.latent_mean.to(z.dtype)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        return self.precond(x, sigma, cond=cond)


def load_prior(folder: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LatentPrior:
    """A frozen LatentPrior (eval mode) from a checkpoint folder of kind ``"prior"``.

    Raises CheckpointError for a missing folder, another kind, a config that does not fit PriorConfig or
    weights of another shape.
    """
    try:
        cfg, _ = read_config(folder, "prior", PriorConfig)
    except (ValueError, TypeError) as e:  # __post_init__ checks of the nested configs
        raise CheckpointError(f"{folder}: invalid prior config ({e})") from None
    model = load_weights(folder, LatentPrior(cfg))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

