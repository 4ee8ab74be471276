import math

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from clrface.metrics.psnr_ssim import (
    PSNR,
    PSNR_CAP_DB,
    SSIM,
    gaussian_window,
    psnr,
    psnr_y,
    rgb_to_y,
    ssim,
    ssim_y,
    to_unit,
)


def _rand(b=2, h=32, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1


def test_psnr_constant_offset_closed_form():
    gt = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    pred = gt + 10  # MSE = (10/255)^2
    assert psnr(pred, gt).item() == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    # float input in [-1,1]: an offset of 0.2 is 0.1 on [0,1] -> 20 dB
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x + 0.2, x).tolist() == pytest.approx([20.0, 20.0], abs=1e-5)


def test_psnr_identical_is_capped_and_meter_means():
    x = _rand()
    assert psnr(x, x).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    m = PSNR()
    m.update(x, x)
    m.update(torch.zeros(1, 3, 8, 8) + 0.2, torch.zeros(1, 3, 8, 8))
    assert m.compute() == pytest.approx((2 * PSNR_CAP_DB + 20.0) / 3, abs=1e-5)


def test_psnr_y_uses_bt601_luma():
    # a pure change of R by 0.1 (on [0,1]) changes Y by 0.1 * 65.481 / 255
    gt = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    pred = gt.clone()
    pred[:, 0] += 0.2
    dy = 0.1 * 65.481 / 255
    assert psnr_y(pred, gt).item() == pytest.approx(-20 * math.log10(dy), abs=1e-9)
    # white/black map to 235/16
    y = rgb_to_y(torch.stack([torch.ones(3, 1, 1), torch.zeros(3, 1, 1)]).double())
    assert (y.flatten() * 255).tolist() == pytest.approx([235.0, 16.0], abs=1e-3)


def test_to_unit_uint8_and_float_agree():
    u = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert to_unit(u).flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert to_unit(u.double() / 127.5 - 1).flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_ssim_identical_is_one():
    x = _rand()
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert ssim_y(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_ssim_matches_torchmetrics():
    # torchmetrics reflect-pads and averages the SSIM map over the whole image; BasicSR (and we) average over the
    # valid window positions only, i.e. torchmetrics' map without its 5 px border.
    gt = _rand(3, 48, 40, seed=1)
    pred = (gt + 0.3 * _rand(3, 48, 40, seed=2)).clamp(-1, 1)
    ours = ssim(pred, gt)
    a, b = (pred + 1) / 2, (gt + 1) / 2
    _, full = tm_ssim(a, b, data_range=1.0, kernel_size=11, sigma=1.5, reduction="none", return_full_image=True)
    ref = full[..., 5:-5, 5:-5].mean((1, 2, 3))
    torch.testing.assert_close(ours, ref.double(), rtol=0, atol=1e-9)
    assert (ours < 0.99).all()  # the test is not vacuous
    # the padded whole-image mean is a slightly different protocol
    whole = tm_ssim(a, b, data_range=1.0, kernel_size=11, sigma=1.5, reduction="none")
    assert (whole - ours).abs().max() < 2e-3


def test_ssim_window_is_normalised_gaussian():
    w = gaussian_window()
    assert w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] / w[5, 6] == pytest.approx(math.exp(1 / (2 * 1.5**2)))


def test_ssim_meter_and_worse_for_noise():
    gt = _rand(2, 32, 32, seed=3)
    m = SSIM()
    s1 = m.update((gt + 0.05 * _rand(2, 32, 32, 4)).clamp(-1, 1), gt)
    s2 = m.update((gt + 0.5 * _rand(2, 32, 32, 5)).clamp(-1, 1), gt)
    assert (s2 < s1).all()
    assert m.compute() == pytest.approx(float(torch.cat([s1, s2]).mean()))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))  # smaller than the 11 px window
