import math

import pytest
import torch
from torch import nn

from clrface.diffusion.precond import Precond, edm_scalings


def test_scalings_at_sigma_data_one_exact():
    # sigma = 1, sigma_data = 1: c_skip = 1/2, c_out = c_in = 1/sqrt(2), c_noise = 0
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(1.0, dtype=torch.float64), 1.0)
    assert c_skip.item() == pytest.approx(0.5, abs=1e-15)
    assert c_out.item() == pytest.approx(2**-0.5, abs=1e-15)
    assert c_in.item() == pytest.approx(2**-0.5, abs=1e-15)
    assert c_noise.item() == 0.0
    # sigma = 3: c_skip = 1/10, c_out = 3/sqrt(10), c_in = 1/sqrt(10), c_noise = ln(3)/4
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(3.0, dtype=torch.float64), 1.0)
    assert (c_skip.item(), c_out.item(), c_in.item()) == pytest.approx((0.1, 3 / 10**0.5, 1 / 10**0.5), abs=1e-15)
    assert c_noise.item() == pytest.approx(torch.tensor(3.0).log().item() / 4, abs=1e-7)


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_scaling_identities(sd):
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sd)
    torch.testing.assert_close(c_in * (sigma**2 + sd**2).sqrt(), torch.ones_like(sigma))
    # c_skip + (c_out/sd)^2 = 1, and the net target (y - c_skip x)/c_out has unit variance for var(y) = sd^2
    # (Karras et al. 2022, App. B.6): (1 - c_skip)^2 sd^2 + c_skip^2 sigma^2 = c_out^2
    torch.testing.assert_close(c_skip + (c_out / sd) ** 2, torch.ones_like(sigma))
    torch.testing.assert_close((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2, c_out**2)
    torch.testing.assert_close(c_noise, sigma.log() / 4)


def test_sigma_to_zero_limits():
    c_skip, c_out, _, c_noise = edm_scalings(torch.tensor([1e-8, 0.0], dtype=torch.float64), 1.0)
    assert c_skip.tolist() == pytest.approx([1.0, 1.0], abs=1e-15)
    assert c_out.tolist() == pytest.approx([1e-8, 0.0], abs=1e-15)
    # ln(sigma) / 4, sigma floored at 1e-20, so a net is never fed -inf
    assert c_noise.tolist() == pytest.approx([math.log(1e-8) / 4, math.log(1e-20) / 4], rel=1e-12)


class _Affine(nn.Module):
    """F(x_in, c_noise; cond) = 2 x_in + cond + c_noise, to check exactly what Precond feeds the net."""

    def forward(self, x, c_noise, cond=None):
        return 2 * x + cond + c_noise.view(-1, 1, 1, 1)


def test_precond_formula_and_limit():
    net = _Affine()
    pre = Precond(net, sigma_data=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    expect = x / (s**2 + 1) + s / (s**2 + 1).sqrt() * (2 * x / (s**2 + 1).sqrt() + cond + s.log() / 4)
    torch.testing.assert_close(pre(x, sigma, cond), expect)
    # a scalar sigma broadcasts over the batch
    torch.testing.assert_close(pre(x, torch.tensor(1.0), cond), pre(x, torch.ones(3), cond))
    # D(x; sigma) -> x as sigma -> 0
    torch.testing.assert_close(pre(x, torch.full((3,), 1e-7), cond), x, atol=1e-5, rtol=0)
    assert torch.equal(pre(x, torch.zeros(3), cond), x)


class _Bf16Probe(nn.Module):
    def forward(self, x, c_noise, cond=None):
        self.seen = (x.dtype, c_noise.dtype)
        return torch.nn.functional.conv2d(x, torch.ones(3, 3, 1, 1))  # runs in bf16 under autocast


def test_precond_sigma_math_fp32_under_autocast():
    net = _Bf16Probe()
    pre = Precond(net, sigma_data=1.0)
    x = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pre(x, torch.tensor([1e-3, 5.0]), None)
    assert out.dtype == torch.float32
    assert net.seen == (torch.float32, torch.float32)
    # at sigma = 1e-3, D = c_skip x + O(1e-3): the skip path kept fp32 precision (bf16 would be off by ~4e-3 relative)
    c_skip = 1 / (1 + 1e-6)
    f = x[:1].sum(1, keepdim=True).expand(1, 3, 4, 4) * (1 / (1 + 1e-6) ** 0.5)
    c_out = 1e-3 / (1 + 1e-6) ** 0.5
    torch.testing.assert_close(out[:1], c_skip * x[:1] + c_out * f, atol=3e-5, rtol=0)
