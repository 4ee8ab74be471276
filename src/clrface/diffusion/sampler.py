"""Solvers for the reverse probability-flow ODE of the prior (paper Eq. 10): dx/dsigma = (x - D(x; sigma)) / sigma.

All samplers share one signature ``(denoise, x, sigmas, *, callback=None) -> x``; conditioning and
guidance live inside ``denoise``. ``sigmas`` is a descending ``[N+1]`` schedule ending in 0 (see
``schedule.py``); ``x`` must be at noise level ``sigmas[0]``.

Function evaluations (NFE) for N steps with a final sigma of 0 (``nfe``):
  heun      2N - 1   (second-order except the last step to 0, which is Euler; Karras et al. 2022, Alg. 2)
  euler     N
  dpmpp_2m  N        (DPM-Solver++(2M), Lu et al. 2022, Alg. 2; reuses the previous D)
The paper samples with Heun, 40 steps (79 NFE).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from clrface.diffusion.schedule import ScheduleConfig, sigmas_from

Denoise = Callable[[Tensor, Tensor], Tensor]
"""(x [B,...], sigma [B]) -> x0_hat [B,...]: the (conditioned, maybe guided) denoiser D(x; sigma)."""

Callback = Callable[[int, Tensor, Tensor], None]
"""callback(i, sigma_next, x_next): called after step i, with x now at noise level sigma_next."""


def _sigma_batch(s: Tensor, x: Tensor) -> Tensor:
    return s.to(x.device).reshape(1).expand(x.shape[0])


def heun(
    denoise: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Karras et al. 2022, Alg. 2 (Heun's 2nd-order method). x: [B,...] at sigmas[0] -> x at sigmas[-1].

    The default is no churn (Alg. 1, deterministic). With ``s_churn > 0`` each step whose sigma lies in
    [s_tmin, s_tmax] first raises the noise to sigma_hat = sigma (1 + gamma), gamma = min(s_churn/N, sqrt2 - 1),
    adding fresh noise drawn from ``generator`` (required then). NFE: 2N - 1 when sigmas end in 0.
    """
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_churn > 0 and s_tmin <= float(s) <= s_tmax else 0.0
        if gamma > 0:
            if generator is None:
                raise ValueError("heun with s_churn > 0 draws noise: pass a generator")
            s_hat = s * (1 + gamma)
            eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
            x = x + (s_hat**2 - s**2).sqrt() * s_noise * eps
            s = s_hat
        d = (x - denoise(x, _sigma_batch(s, x))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:  # trapezoid correction; the last step to 0 stays Euler (d is undefined at 0)
            d_next = (x_next - denoise(x_next, _sigma_batch(s_next, x))) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        if callback is not None:
            callback(i, s_next, x_next)
        x = x_next
    return x


def euler(denoise: Denoise, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None) -> Tensor:
    """First-order Euler steps of Eq. 10 (Karras et al. 2022, Alg. 1 without the correction). NFE: N."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, _sigma_batch(s, x))) / s
        x = x + (s_next - s) * d
        if callback is not None:
            callback(i, s_next, x)
    return x


def dpmpp_2m(denoise: Denoise, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) for sigma(t) = t, in the variable lambda = -ln sigma. NFE: N.

    Each step is the exact exponential-integrator update x' = (s'/s) x + (1 - s'/s) D_eff, where
    D_eff = D_i for the first step (DDIM) and the step to 0, else the linear extrapolation
    D_eff = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i, h_i = ln(s_i / s_{i+1}).
    Formulated as in k-diffusion's ``sample_dpmpp_2m`` (Crowson, MIT); written anew here.
    """
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, _sigma_batch(s, x))
        if s_next == 0:
            x = denoised  # the exact update's limit: (0/s) x + (1 - 0) D
            h = None
        else:
            h = (s / s_next).log()
            d_eff = denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                d_eff = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            ratio = s_next / s
            x = ratio * x + (1 - ratio) * d_eff
        old_denoised, h_last = denoised, h
        if callback is not None:
            callback(i, s_next, x)
    return x


SAMPLERS = {"heun": heun, "euler": euler, "dpmpp_2m": dpmpp_2m}


def nfe(sampler: str, steps: int, *, ends_in_zero: bool = True) -> int:
    """Denoiser evaluations of ``SAMPLERS[sampler]`` over ``steps`` steps (see the module docstring)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    if steps == 0:
        return 0
    if sampler == "heun":
        return 2 * steps - 1 if ends_in_zero else 2 * steps
    return steps


class CountingDenoise:
    """Wraps a Denoise and counts its calls (``.nfe``)."""

    def __init__(self, denoise: Denoise):
        self.denoise = denoise
        self.nfe = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.nfe += 1
        return self.denoise(x, sigma)


def sample(
    sampler: Callable[..., Tensor],
    denoise: Denoise,
    x_init: Tensor,
    sigmas: Tensor | ScheduleConfig,
    *,
    sigma_start: float | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Runs ``sampler`` from x = x_init + sigma_start * eps down to sigma 0; x_init: [B,...] -> [B,...].

    ``sigma_start=None`` means ``sigmas[0]`` (for a ScheduleConfig: its sigma_max) and the whole
    schedule; with ``x_init = 0`` that is ordinary sampling from noise. Otherwise the schedule is cut or
    rebuilt by ``sigmas_from`` (a tensor keeps its steps below sigma_start, a ScheduleConfig gets
    ``steps`` fresh steps from sigma_start) — the paper's start from an initial latent (Sec. 3.3).
    ``sigma_start = 0`` returns a copy of x_init untouched (no noise, no NFE).
    eps is ``noise`` when given, else drawn from ``generator`` in x_init's dtype.
    """
    if sigma_start is None:
        if isinstance(sigmas, ScheduleConfig):
            sigma_start = sigmas.sigma_max
            schedule = sigmas.sigmas()
        else:
            sigma_start = float(sigmas[0])
            schedule = sigmas
    else:
        schedule = sigmas_from(sigmas, float(sigma_start))
    if sigma_start == 0:
        return x_init.clone()
    if noise is None:
        gen_device = generator.device if generator is not None else x_init.device
        noise = torch.randn(x_init.shape, generator=generator, device=gen_device, dtype=x_init.dtype)
    schedule = schedule.to(x_init.device)
    x = x_init + float(sigma_start) * noise.to(device=x_init.device, dtype=x_init.dtype)
    return sampler(denoise, x, schedule, callback=callback)
