"""The VQGAN objective's terms (clrface.vqgan.losses) against closed forms."""

import pytest
import torch

from clrface.vqgan.losses import (
    adaptive_weight,
    detail_energy_l1,
    generator_adv_loss,
    gradient_l1,
    hinge_d_loss,
    laplacian_energy,
)


def test_gradient_l1_of_a_ramp_is_its_slope():
    x = torch.arange(8.0).mul(0.25).expand(2, 3, 8, 8)  # d/dx = 0.25, d/dy = 0
    assert float(gradient_l1(x, torch.zeros_like(x))) == pytest.approx(0.25)
    assert float(gradient_l1(x.transpose(-1, -2), torch.zeros_like(x))) == pytest.approx(0.25)
    assert float(gradient_l1(x, x + 3.0)) == 0.0  # a constant offset has no gradient


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # real: relu(1 - 2) = 0, relu(1 - 0.5) = 0.5; fake: relu(1 - 2) = 0, relu(1 + 0) = 1
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0))) == 0.0  # confident and right
    assert float(generator_adv_loss(torch.tensor([1.0, -3.0, 5.0]))) == pytest.approx(-1.0)


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (3.0 * w).sum()  # gradient (3, 3): norm 3 sqrt 2
    adv = (0.5 * w * w).sum()  # gradient w = (1, 2): norm sqrt 5
    lam = adaptive_weight(rec, adv, w)
    assert float(lam) == pytest.approx(3 * 2**0.5 / (5**0.5 + 1e-4))
    assert not lam.requires_grad
    assert float(adaptive_weight((1e6 * w).sum(), (1e-3 * w).sum(), w, max_weight=10.0)) == 10.0


def test_laplacian_energy_of_a_checkerboard():
    # a +-1 checkerboard has Laplacian -+8 inside; the replicate border changes only the outer pixels
    x = (torch.arange(16)[:, None] + torch.arange(16)).remainder(2).float().mul(2).sub(1).expand(1, 3, 16, 16)
    e = laplacian_energy(x, 8)
    assert e.shape == (1, 3, 2, 2)
    assert float(laplacian_energy(x, 2)[0, 0, 3, 3]) == pytest.approx(8.0, rel=1e-4)  # an interior block
    assert float(laplacian_energy(torch.full((1, 1, 8, 8), 0.3), 8)) == pytest.approx(1e-3, rel=1e-3)  # sqrt(eps)


def test_detail_energy_ignores_where_texture_sits_but_not_blur():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    shifted = x.roll(1, dims=-1)  # the same texture one pixel over
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert float(detail_energy_l1(x, x)) == 0.0
    # position: gradient L1 sees a shift as large as the texture itself, the block energy barely
    assert float(detail_energy_l1(shifted, x)) < 0.1 * float(gradient_l1(shifted, x))
    # strength: a blur removes most of the Laplacian energy and is charged for it
    assert float(detail_energy_l1(blurred, x)) > 0.7 * float(laplacian_energy(x, 8).mean())
