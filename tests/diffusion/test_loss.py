"""edm_loss checks. With data N(mu, sd^2) and sigma_data = sd, the ideal denoiser is exactly the
zero-output net under EDM preconditioning (D = c_skip x), and lambda(sigma) * E|D - z0|^2 = 1 at every
sigma: the weighted error sqrt(lambda) (D - z0) is then a standard normal per element."""

import pytest
import torch
from torch import nn

from clrface.diffusion.loss import denoiser_loss, edm_loss, start_state_noise
from clrface.diffusion.precond import Precond, edm_scalings

F64 = torch.float64


class _Const(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c, dtype=F64))

    def forward(self, x, c_noise, cond=None):
        return self.c.expand_as(x)


class _CondIdeal(nn.Module):
    """Ideal F for z0 = cond + N(0, 1): D = cond + (x - cond) c_skip, i.e. F = cond (1 - c_skip) / c_out."""

    def forward(self, x, c_noise, cond=None):
        sigma = (4 * c_noise).exp().view(-1, 1, 1, 1)
        c_skip, c_out, _, _ = edm_scalings(sigma, 1.0)
        return cond * (1 - c_skip) / c_out


def _draw(seed, b=64, shape=(3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g, dtype=F64), torch.randn(b, *shape, generator=g, dtype=F64)


@pytest.mark.parametrize("sd", [0.5, 1.0])
@pytest.mark.parametrize("sigma", [0.01, 0.3, 1.0, 5.0, 20.0])
def test_ideal_gaussian_loss_is_one(sd, sigma):
    z, noise = _draw(0)
    z0 = sd * z
    pre = Precond(_Const(0.0), sigma_data=sd)
    loss = edm_loss(pre, z0, torch.zeros_like(z0), torch.full((64,), sigma, dtype=F64), noise)
    assert loss.shape == (64,)
    # each entry is a mean of 3072 squared standard normals: mean 1, std sqrt(2/3072) = 0.0255
    assert loss.mean().item() == pytest.approx(1.0, abs=0.015)
    assert (loss - 1).abs().max().item() < 0.13


def test_loss_is_raw_output_mse():
    # lambda |D - z0|^2 = |F - (z0 - c_skip x)/c_out|^2 exactly, for any net output
    z0, noise = _draw(1, b=4, shape=(2, 5, 5))
    cond = torch.randn_like(z0)
    sigma = torch.tensor([0.05, 0.7, 3.0, 40.0], dtype=F64)
    net = _CondIdeal()
    pre = Precond(net, sigma_data=1.0)
    s = sigma.view(-1, 1, 1, 1)
    x = z0 + s * noise
    c_skip, c_out, c_in, c_noise = edm_scalings(s, 1.0)
    f = net(c_in * x, c_noise.flatten(), cond=cond)
    target = (z0 - c_skip * x) / c_out
    torch.testing.assert_close(edm_loss(pre, z0, cond, sigma, noise), (f - target).square().flatten(1).mean(1))


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_constant_bias_costs_c_squared(c):
    # F = c instead of the ideal 0: expected loss 1 + c^2 (lambda c_out^2 = 1) at every sigma
    z0, noise = _draw(2)
    pre = Precond(_Const(c), sigma_data=1.0)
    for sigma in (0.1, 1.0, 10.0):
        loss = edm_loss(pre, z0, z0, torch.full((64,), sigma, dtype=F64), noise)
        assert loss.mean().item() == pytest.approx(1 + c**2, abs=0.02 * (1 + c))


def test_condition_matters():
    # z0 = cond + N(0, 1): the cond-aware ideal denoiser scores 1; ignoring cond (F = 0) scores
    # 1 + sigma^2/(1 + sigma^2) E[cond^2]
    g = torch.Generator().manual_seed(3)
    cond = 2.0 * torch.randn(64, 3, 16, 16, generator=g, dtype=F64)
    z0 = cond + torch.randn(64, 3, 16, 16, generator=g, dtype=F64)
    noise = torch.randn(64, 3, 16, 16, generator=g, dtype=F64)
    for sigma in (0.5, 2.0, 10.0):
        sig = torch.full((64,), sigma, dtype=F64)
        ideal = edm_loss(Precond(_CondIdeal(), 1.0), z0, cond, sig, noise).mean().item()
        blind = edm_loss(Precond(_Const(0.0), 1.0), z0, cond, sig, noise).mean().item()
        assert ideal == pytest.approx(1.0, abs=0.02)
        expect = 1 + sigma**2 / (1 + sigma**2) * cond.square().mean().item()
        assert blind == pytest.approx(expect, rel=0.03)


def test_pure_and_differentiable():
    z0, noise = _draw(4, b=8, shape=(3, 4, 4))
    net = _Const(0.3)
    pre = Precond(net, 1.0)
    sigma = torch.full((8,), 2.0, dtype=F64)
    a = edm_loss(pre, z0, z0, sigma, noise)
    b = edm_loss(pre, z0, z0, sigma, noise)
    assert torch.equal(a, b)
    a.mean().backward()
    # d/dc E|c - target|^2 = 2 (c - mean target) ~ 2 * 0.3 (target mean ~ 0)
    assert net.c.grad.item() == pytest.approx(0.6, abs=0.1)


def test_denoiser_loss_is_edm_loss_at_the_noised_point():
    g = torch.Generator().manual_seed(3)
    z0, cond, noise = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([0.1, 1.0, 7.0])
    precond = lambda x, s, c: 0.5 * x + 0.1 * c  # noqa: E731
    x = z0 + sigma.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(denoiser_loss(precond, x, sigma, cond, z0), edm_loss(precond, z0, cond, sigma, noise))
    # a denoiser that returns the target has zero loss whatever x is
    assert denoiser_loss(lambda x, s, c: c, x, sigma, cond, cond).abs().max() == 0


def test_start_state_noise_moves_the_noisy_input_to_the_start_latent():
    g = torch.Generator().manual_seed(0)
    z0, z_start, eps = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([0.05, 0.5, 4.0])
    n = start_state_noise(z0, z_start, sigma, eps)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(z0 + s * n, z_start + s * eps)
    assert torch.equal(start_state_noise(z0, z0, sigma, eps), eps)
