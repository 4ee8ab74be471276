"""Samplers against closed forms: linear toy denoisers (pinned by hand), Gaussian and shifted Gaussian
data (the ODE solution is x(0) = mu + (x_T - mu) sd / sqrt(sd^2 + sigma_max^2)), and a 1-d Gaussian
mixture, whose probability-flow ODE is the monotone transport x_0 = F_0^{-1}(F_{sigma_max}(x_T))."""

import functools

import pytest
import torch

from clrface.diffusion.sampler import SAMPLERS, CountingDenoise, dpmpp_2m, euler, heun, nfe, sample
from clrface.diffusion.schedule import ScheduleConfig, karras_sigmas

F64 = torch.float64


def _bcast(s, x):
    return s.view(-1, *([1] * (x.ndim - 1)))


def gaussian_denoiser(sd, mu=0.0):
    """Ideal D for data N(mu, sd^2) per element: E[y | y + sigma eps = x]."""
    return lambda x, s: mu + (x - mu) * sd**2 / (sd**2 + _bcast(s, x) ** 2)


def gaussian_ode_solution(x_t, sd, sigma_t, mu=0.0):
    return mu + (x_t - mu) * sd / (sd**2 + sigma_t**2) ** 0.5


# 1-d mixture: 0.3 N(-2, 0.5^2) + 0.7 N(1.5, 0.3^2)
MIX_W = torch.tensor([0.3, 0.7], dtype=F64)
MIX_MU = torch.tensor([-2.0, 1.5], dtype=F64)
MIX_SD = torch.tensor([0.5, 0.3], dtype=F64)


def mixture_denoiser(x, s):
    s2 = _bcast(s, x)[..., None] ** 2
    v = MIX_SD**2 + s2  # marginal variance of each component at noise level s
    logp = MIX_W.log() - 0.5 * (x[..., None] - MIX_MU) ** 2 / v - 0.5 * v.log()
    post = logp.softmax(-1)
    comp_mean = MIX_MU + (x[..., None] - MIX_MU) * MIX_SD**2 / v
    return (post * comp_mean).sum(-1)


def mixture_cdf(x, sigma):
    std = (MIX_SD**2 + sigma**2).sqrt()
    return (MIX_W * torch.special.ndtr((x[..., None] - MIX_MU) / std)).sum(-1)


def mixture_transport(x_t, sigma_t):
    """x_0 = F_0^{-1}(F_sigma_t(x_t)) by bisection."""
    target = mixture_cdf(x_t, torch.tensor(sigma_t, dtype=F64))
    lo, hi = torch.full_like(x_t, -10.0), torch.full_like(x_t, 10.0)
    for _ in range(80):
        mid = (lo + hi) / 2
        below = mixture_cdf(mid, torch.tensor(0.0, dtype=F64)) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


# --- pinned runs with the linear denoiser D(x; s) = x / (1 + s^2) (ideal for N(0, 1) data), x_T = 2 eps ---
# eps = torch.randn(1, 4, generator=manual_seed(0), dtype=float64)
EPS0 = [1.5409961, -0.2934289, -2.1787894, 0.5684313]


def _linear(x, s):
    return x / (1 + _bcast(s, x) ** 2)


def test_heun_two_steps_pinned():
    # By hand, sigmas (2, 0.5, 0): step 1 Euler gives 0.4x, the trapezoid 0.58x; step 2 is Euler to 0:
    # D(0.58x; 0.5) = 0.464x. Started from x = 2 eps: 0.928 eps. NFE 3 = 2*2 - 1.
    g = torch.Generator().manual_seed(0)
    den = CountingDenoise(_linear)
    out = sample(heun, den, torch.zeros(1, 4, dtype=F64), torch.tensor([2.0, 0.5, 0.0], dtype=F64), generator=g)
    expect = torch.tensor([[1.43004439, -0.27230202, -2.02191655, 0.52750423]], dtype=F64)
    torch.testing.assert_close(out, expect, atol=1e-8, rtol=0)
    torch.testing.assert_close(out, 0.928 * torch.tensor([EPS0], dtype=F64), atol=1e-6, rtol=0)
    assert den.nfe == 3 == nfe("heun", 2)


def test_euler_and_dpmpp_three_steps_pinned():
    sig = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=F64)
    x0 = torch.zeros(1, 4, dtype=F64)
    eps = torch.tensor([EPS0], dtype=F64)
    # Euler by hand: 0.6x, then 0.75 of that, then D(.; 0.5) = 0.8 of that: 0.36x = 0.72 eps
    out = sample(euler, _linear, x0, sig, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.tensor([[1.10951720, -0.21126881, -1.56872836, 0.40927052]], dtype=F64))
    torch.testing.assert_close(out, 0.72 * eps, atol=1e-6, rtol=0)
    # DPM++(2M) by hand: x1 = 0.5x + 0.5 D0 = 0.6x (D0 = x/5); h = ln 2 both steps so r = 1,
    # D_eff = 1.5 D1 - 0.5 D0 = 0.45x - 0.1x, x2 = 0.5*0.6x + 0.5*0.35x = 0.475x; x3 = D(x2; 0.5) = 0.38x = 0.76 eps
    den = CountingDenoise(_linear)
    out = sample(dpmpp_2m, den, x0, sig, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.tensor([[1.17115704, -0.22300597, -1.65587993, 0.43200777]], dtype=F64))
    torch.testing.assert_close(out, 0.76 * eps, atol=1e-6, rtol=0)
    assert den.nfe == 3 == nfe("dpmpp_2m", 3)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("mu", [0.0, 1.5])
def test_gaussian_closed_form(name, mu):
    sd, smax, n = 0.5, 80.0, 40
    x = mu + torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64) * smax
    den = CountingDenoise(gaussian_denoiser(sd, mu))
    out = SAMPLERS[name](den, x, karras_sigmas(n, 0.002, smax, dtype=F64))
    exact = gaussian_ode_solution(x, sd, smax, mu)
    # relative to the output scale sd: Heun/DPM++ at 40 steps ~1%, Euler ~7% (measured 0.98/1.04/7.0%)
    tol = {"heun": 0.02, "dpmpp_2m": 0.02, "euler": 0.1}[name] * sd * 4
    assert (out - exact).abs().max().item() < tol
    assert den.nfe == nfe(name, n) == {"heun": 79, "euler": 40, "dpmpp_2m": 40}[name]


def test_convergence_orders():
    # Heun and DPM++(2M) are second order, Euler first: halving the step cuts the error ~4x vs ~2x
    sd, smax = 1.0, 20.0
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2), dtype=F64) * smax
    exact = gaussian_ode_solution(x, sd, smax)

    def err(name, n):
        out = SAMPLERS[name](gaussian_denoiser(sd), x, karras_sigmas(n, 0.002, smax, dtype=F64))
        return (out - exact).abs().max().item()

    for name, lo, hi in (("heun", 3.3, 5.0), ("dpmpp_2m", 3.0, 5.0), ("euler", 1.7, 2.3)):
        ratio = err(name, 40) / err(name, 80)
        assert lo < ratio < hi, (name, ratio)
    # DPM++ 10 steps is closer to the exact ODE solution than Euler 10 steps
    assert err("dpmpp_2m", 10) < 0.7 * err("euler", 10)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_moments_from_pure_noise(name):
    # x_init = 0, sigma_start = sigma_max: ordinary sampling. Data N(mu, sd^2) per element.
    sd, mu, smax = 0.5, 0.7, 80.0
    n_samples = 20_000  # std standard error sd/sqrt(2N) = 0.0025, mean standard error 0.0035
    x_init = torch.full((n_samples,), mu, dtype=F64)  # the mean as x_init: ODE maps N(mu, smax^2) to N(mu, ~sd^2)
    out = sample(SAMPLERS[name], gaussian_denoiser(sd, mu), x_init, karras_sigmas(40, 0.002, smax, dtype=F64),
                 generator=torch.Generator().manual_seed(3))
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    # measured std 0.5076 (Heun), 0.5079 (DPM++), 0.4674 (Euler, 40 steps)
    assert out.std().item() == pytest.approx(sd, rel=0.03 if name != "euler" else 0.1)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_mixture_transport(name):
    smax = 20.0
    g = torch.Generator().manual_seed(4)
    # exact draws from p_smax: data + smax * eps
    comp = (torch.rand(4000, generator=g, dtype=F64) < MIX_W[1]).long()
    y = MIX_MU[comp] + MIX_SD[comp] * torch.randn(4000, generator=g, dtype=F64)
    x = y + smax * torch.randn(4000, generator=g, dtype=F64)
    out = SAMPLERS[name](mixture_denoiser, x, karras_sigmas(64, 0.002, smax, dtype=F64))
    exact = mixture_transport(x, smax)
    err = (out - exact).abs()
    # per sample: Heun/DPM++ median error measured ~1e-3, Euler ~3e-2; worst cases sit between the modes
    tol = {"heun": 0.01, "dpmpp_2m": 0.01, "euler": 0.1}[name]
    assert err.median().item() < tol
    # output law: the mode weights and the mode spreads of the data
    right = out > 0
    # measured: right-mode fraction 0.686 (exact transport 0.68675, law 0.7, SE 0.007), right std 0.300,
    # left mean -1.999 (Heun) / -1.956 (Euler)
    assert right.double().mean().item() == pytest.approx(0.7, abs=0.03)
    assert right.double().mean().item() == pytest.approx((exact > 0).double().mean().item(), abs=0.005)
    assert out[right].std().item() == pytest.approx(0.3, rel=0.1)
    assert out[~right].mean().item() == pytest.approx(-2.0, abs=0.02 if name != "euler" else 0.1)


def test_sigma_start_zero_returns_input():
    x = torch.randn(2, 3, 4, 4)
    den = CountingDenoise(gaussian_denoiser(1.0))
    for name, f in SAMPLERS.items():
        out = sample(f, den, x, karras_sigmas(10, 0.002, 20.0), sigma_start=0.0,
                     generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, x) and out is not x
    assert den.nfe == 0


def test_sample_from_intermediate_sigma():
    # from x_init = y exactly on the data at sigma_start = 2: x = y + 2 eps, ODE output = closed form
    sd, smax, start = 1.0, 20.0, 2.0
    g = torch.Generator().manual_seed(5)
    y = torch.randn(1000, generator=g, dtype=F64) * sd
    eps = torch.randn(1000, generator=g, dtype=F64)
    for sched in (karras_sigmas(40, 0.002, smax, dtype=F64), ScheduleConfig(sigma_max=smax, steps=20)):
        den = CountingDenoise(gaussian_denoiser(sd))
        out = sample(heun, den, y, sched, sigma_start=start, noise=eps)
        exact = gaussian_ode_solution(y + start * eps, sd, start)
        # measured max error 0.015 (tail of 40, 26 steps) / 0.024 (20 fresh steps) against |x| up to 4.4
        assert (out - exact).abs().max().item() < 0.01 * exact.abs().max().item()
        assert den.nfe == (2 * 20 - 1 if isinstance(sched, ScheduleConfig) else 2 * int((sched[1:] < start).sum()) - 1)


def test_heun_churn():
    sig = karras_sigmas(10, 0.002, 20.0, dtype=F64)
    x = torch.randn(100, dtype=F64) * 20
    with pytest.raises(ValueError):
        heun(gaussian_denoiser(1.0), x, sig, s_churn=5.0)
    # churn = 0 is bitwise the deterministic sampler; with churn, a fixed generator reproduces
    assert torch.equal(heun(gaussian_denoiser(1.0), x, sig, s_churn=0.0), heun(gaussian_denoiser(1.0), x, sig))
    churn = functools.partial(heun, s_churn=10.0, generator=torch.Generator().manual_seed(0))
    a = churn(gaussian_denoiser(1.0), x, sig)
    b = heun(gaussian_denoiser(1.0), x, sig, s_churn=10.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, heun(gaussian_denoiser(1.0), x, sig))
    # churn samples still follow the data law N(0, 1): std of 20k samples
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(6), dtype=F64) * (1 + 20.0**2) ** 0.5
    out = heun(gaussian_denoiser(1.0), x, karras_sigmas(40, 0.002, 20.0, dtype=F64), s_churn=40.0, s_tmin=0.05,
               s_tmax=10.0, generator=torch.Generator().manual_seed(7))
    assert out.std().item() == pytest.approx(1.0, rel=0.05)  # measured 1.024 (no churn: 1.002)


def test_callback_sees_every_step():
    seen = []
    sig = karras_sigmas(5, 0.002, 20.0)
    for f in SAMPLERS.values():
        seen.clear()
        out = f(gaussian_denoiser(1.0), torch.randn(2, 3) * 20, sig,
                callback=lambda i, s, x: seen.append((i, float(s), x)))
        assert [i for i, _, _ in seen] == list(range(5))
        assert [s for _, s, _ in seen] == pytest.approx(sig[1:].tolist())
        assert torch.equal(seen[-1][2], out)


def test_nfe_table():
    assert [nfe("heun", 40), nfe("euler", 40), nfe("dpmpp_2m", 40)] == [79, 40, 40]
    assert nfe("heun", 3, ends_in_zero=False) == 6
    with pytest.raises(ValueError):
        nfe("ddim", 10)
