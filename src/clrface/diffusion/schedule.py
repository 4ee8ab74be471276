"""Noise levels of the conditional latent prior (paper Sec. 3.2, EDM formulation).

The paper's forward SDE has f(z, t) = 0 and g(t) = sqrt(2t), so the noise level is sigma(t) = t and
z_t = z_0 + t * eps. Training draws sigma log-normally, sampling walks the Karras et al. (2022) schedule
(their Eq. 5) down to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ScheduleConfig:
    """The ``schedule:`` section of a prior config; YAML maps onto it (``ScheduleConfig(**cfg["schedule"])``).

    sigma_min/sigma_max/rho/steps define the sampling schedule, p_mean/p_std the training noise
    distribution ln(sigma) ~ N(p_mean, p_std^2).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2
    steps: int = 40

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.steps < 1 or self.p_std <= 0 or self.rho <= 0:
            raise ValueError(f"need steps >= 1, p_std > 0, rho > 0: {self}")

    def sigmas(
        self, steps: int | None = None, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The full sampling schedule, ``[steps + 1]`` ending in 0."""
        return karras_sigmas(
            self.steps if steps is None else steps, self.sigma_min, self.sigma_max, self.rho, device=device, dtype=dtype
        )


def karras_sigmas(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Karras et al. 2022, Eq. 5: ``[n + 1]`` sigmas, sigma_max down to sigma_min, then a final 0.

    Computed in float64 and cast, so the endpoints are exact in any dtype. ``n == 1`` gives
    ``[sigma_max, 0]`` (one step that jumps straight to the denoised estimate).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if n == 1:
        s = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        s = (hi + ramp * (lo - hi)) ** rho
        s[0], s[-1] = sigma_max, sigma_min  # the power round trip is off by an ulp otherwise
    return torch.cat([s, s.new_zeros(1)]).to(device=device, dtype=dtype)


def sample_train_sigma(
    batch: int,
    p_mean: float,
    p_std: float,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """EDM training noise levels: ``ln sigma ~ N(p_mean, p_std^2)``, shape ``[batch]``.

    ``generator`` decides the device of the draw when given; the result is moved to ``device``.
    """
    gen_device = generator.device if generator is not None else device
    ln = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float32)
    return (p_mean + p_std * ln).exp().to(device=device, dtype=dtype)


def loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.

    It equals 1 / c_out(sigma)^2, so the weighted loss is the plain MSE of the raw net output against
    its effective target (Karras et al. 2022, Eq. 8 and Table 1).
    """
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sigmas_from(sigmas_or_params: Tensor | ScheduleConfig, sigma_start: float, steps: int | None = None) -> Tensor:
    """A schedule that starts at ``sigma_start`` and ends in 0 (for starting from a given latent, paper Sec. 3.3).

    - ``ScheduleConfig``: a fresh Karras schedule of ``steps`` (default ``cfg.steps``) steps from
      sigma_start down to sigma_min, then 0; rho as configured. sigma_start <= sigma_min gives the
      single step ``[sigma_start, 0]``. sigma_start may exceed sigma_max.
    - a schedule tensor ``[N+1]`` (descending, ending in 0): the steps below sigma_start, with
      sigma_start prepended, i.e. the tail of the same schedule (SDEdit-style truncation, so fewer
      steps than N). A sigma equal to sigma_start (within 1e-6 relative) is not repeated.

    ``sigma_start == 0`` returns ``[0]``: zero steps, the sampler returns its input.
    Result dtype/device: the tensor's, or float32 on CPU for a config.
    """
    if sigma_start < 0:
        raise ValueError(f"sigma_start must be >= 0, got {sigma_start}")
    if isinstance(sigmas_or_params, ScheduleConfig):
        cfg = sigmas_or_params
        n = cfg.steps if steps is None else steps
        if sigma_start == 0:
            return torch.zeros(1)
        if sigma_start <= cfg.sigma_min:
            return torch.tensor([float(sigma_start), 0.0])
        return karras_sigmas(n, cfg.sigma_min, sigma_start, cfg.rho)
    sigmas = sigmas_or_params
    if steps is not None:
        raise ValueError("steps applies to a ScheduleConfig only; a schedule tensor keeps its own steps")
    if sigmas.ndim != 1 or sigmas[-1] != 0:
        raise ValueError("expected a 1-d schedule ending in 0")
    start = sigmas.new_tensor([sigma_start])
    if sigma_start == 0:
        return sigmas.new_zeros(1)
    tail = sigmas[sigmas < sigma_start * (1 - 1e-6)]
    return torch.cat([start, tail])
