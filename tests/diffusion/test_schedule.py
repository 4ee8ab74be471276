import math

import pytest
import torch

from clrface.diffusion.schedule import (
    ScheduleConfig,
    karras_sigmas,
    loss_weight,
    sample_train_sigma,
    sigmas_from,
)


def test_karras_endpoints_and_monotone():
    s = karras_sigmas(40, 0.002, 80.0, 7.0, dtype=torch.float64)
    assert s.shape == (41,)
    assert s[0].item() == 80.0 and s[-2].item() == 0.002 and s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())


def test_karras_matches_eq5_midpoint():
    # Eq. 5 at i = (n-1)/2: (mean of the rho-th roots)^rho
    s = karras_sigmas(3, 0.5, 8.0, rho=2.0, dtype=torch.float64)
    assert s.tolist() == pytest.approx([8.0, ((8**0.5 + 0.5**0.5) / 2) ** 2, 0.5, 0.0], rel=1e-12)
    # rho = 1 is linear in sigma
    assert karras_sigmas(5, 1.0, 5.0, rho=1.0).tolist() == pytest.approx([5, 4, 3, 2, 1, 0])


def test_karras_one_step_and_dtype():
    assert karras_sigmas(1, 0.1, 3.0).tolist() == [3.0, 0.0]
    assert karras_sigmas(4, 0.1, 3.0, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError):
        karras_sigmas(0, 0.1, 3.0)


def test_train_sigma_lognormal_moments():
    g = torch.Generator().manual_seed(0)
    s = sample_train_sigma(200_000, 0.3, 1.2, g)
    assert s.shape == (200_000,) and bool((s > 0).all())
    ln = s.log()
    # standard errors: 1.2/sqrt(2e5) = 0.0027 for the mean, ~0.002 for the std
    assert ln.mean().item() == pytest.approx(0.3, abs=0.015)
    assert ln.std().item() == pytest.approx(1.2, abs=0.01)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(sample_train_sigma(200_000, 0.3, 1.2, g2), s)  # reproducible from the generator


def test_loss_weight_is_inverse_c_out_squared():
    sigma = torch.tensor([0.01, 0.5, 1.0, 7.0], dtype=torch.float64)
    for sd in (0.5, 1.0):
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        torch.testing.assert_close(loss_weight(sigma, sd) * c_out**2, torch.ones_like(sigma))
    assert loss_weight(torch.tensor(1.0), 1.0).item() == pytest.approx(2.0)


def test_sigmas_from_tensor_truncates():
    s = karras_sigmas(10, 0.002, 20.0, dtype=torch.float64)
    cut = sigmas_from(s, 3.0)
    assert cut[0].item() == 3.0 and cut[-1].item() == 0.0
    assert torch.equal(cut[1:], s[s < 3.0])
    # a start equal to a schedule entry is not repeated
    cut2 = sigmas_from(s, s[4].item())
    assert torch.equal(cut2, s[4:])
    assert sigmas_from(s, 0.0).tolist() == [0.0]
    assert torch.equal(sigmas_from(s, 20.0), s)


def test_sigmas_from_config_rebuilds_n_steps():
    cfg = ScheduleConfig(sigma_min=0.002, sigma_max=20.0, rho=7.0, p_mean=0.3, p_std=1.2, steps=40)
    s = sigmas_from(cfg, 2.0, steps=10)
    assert s.shape == (11,)
    assert s[0].item() == pytest.approx(2.0) and s[-2].item() == pytest.approx(0.002) and s[-1].item() == 0
    assert sigmas_from(cfg, 2.0).shape == (41,)
    assert sigmas_from(cfg, 0.001).tolist() == pytest.approx([0.001, 0.0])
    assert sigmas_from(cfg, 0.0).tolist() == [0.0]
    torch.testing.assert_close(cfg.sigmas(), karras_sigmas(40, 0.002, 20.0))
    assert math.isclose(cfg.sigmas(5)[0].item(), 20.0)
