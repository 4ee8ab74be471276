import math

import pytest
import torch
import torch.nn.functional as F

from clrface.metrics.noref import (
    FACE_REGION,
    MAD_TO_SIGMA,
    colorfulness,
    haar_hh,
    laplacian_variance,
    luminance,
    noise_sigma,
    noref_scores,
    region_bounds,
)

WHOLE = (0.0, 1.0, 0.0, 1.0)


def _gray(y: torch.Tensor) -> torch.Tensor:
    """[H,W] on the 0-255 scale -> [1,3,H,W] in [-1,1], the same value in every channel (so Y = y)."""
    return (y / 127.5 - 1).to(torch.float64).expand(1, 3, *y.shape).clone()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma) + 1
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def test_luminance_and_region_bounds():
    red = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    red[:, 0] = 255
    torch.testing.assert_close(luminance(red), torch.full((1, 4, 4), 0.299 * 255, dtype=torch.float64))
    # the same colour as floats in [-1, 1]
    torch.testing.assert_close(luminance(red.double() / 127.5 - 1), luminance(red))
    assert region_bounds(128, 128) == (38, 109, 32, 96)
    assert region_bounds(32, 32, WHOLE) == (1, 31, 1, 31)  # one pixel off every edge
    with pytest.raises(ValueError):
        region_bounds(128, 128, (0.5, 0.4, 0.0, 1.0))


def test_checkerboard_closed_form():
    # c +- d checkerboard: Laplacian = -+8d everywhere (variance 64 d^2), Haar HH = 2d in every block
    d = 10.0
    i = torch.arange(64)
    y = 128 + d * (1 - 2 * ((i[:, None] + i[None, :]) % 2)).double()
    x = _gray(y)
    assert float(laplacian_variance(x, WHOLE)) == pytest.approx(64 * d**2, rel=1e-9)
    assert float(noise_sigma(x, WHOLE)) == pytest.approx(2 * d / MAD_TO_SIGMA, rel=1e-9)
    torch.testing.assert_close(haar_hh(y[None]).abs(), torch.full((1, 32, 32), 2 * d, dtype=torch.float64))


def test_smooth_surfaces():
    # Y = a i^2 has a constant Laplacian (variance 0) and no diagonal detail; Y = i j is harmonic (Laplacian 0)
    # but every 2x2 block has HH = 1/2: the estimator's known bias on curved surfaces, stated in the docstring
    i = torch.arange(64, dtype=torch.float64)
    quad = _gray(0.03 * i[:, None] ** 2 + 0 * i[None, :])
    assert float(laplacian_variance(quad, WHOLE)) == pytest.approx(0.0, abs=1e-9)
    assert float(noise_sigma(quad, WHOLE)) == pytest.approx(0.0, abs=1e-9)
    bil = _gray(0.03 * i[:, None] * i[None, :])
    assert float(laplacian_variance(bil, WHOLE)) == pytest.approx(0.0, abs=1e-9)
    assert float(noise_sigma(bil, WHOLE)) == pytest.approx(0.03 * 0.5 / MAD_TO_SIGMA, rel=1e-9)


@pytest.mark.parametrize("sigma", [2.0, 10.0, 25.0])
def test_white_noise_recovers_sigma(sigma):
    g = torch.Generator().manual_seed(int(sigma))
    y = 128 + sigma * torch.randn(256, 256, generator=g, dtype=torch.float64)
    s = noref_scores(_gray(y), WHOLE)
    # 16,129 coefficients: the MAD estimate's relative std is ~1%
    assert float(s["noise_sigma"]) == pytest.approx(sigma, rel=0.04)
    # white noise alone: Laplacian variance = 20 sigma^2, and the excess is (nearly) nothing
    assert float(s["laplacian_var"]) == pytest.approx(20 * sigma**2, rel=0.05)
    assert float(s["excess_laplacian_var"]) < 0.1 * 20 * sigma**2


def test_colour_noise_is_seen_through_luma():
    # independent noise per channel: Y noise std = sigma * |(0.299, 0.587, 0.114)|
    sigma = 10.0
    x = (torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sigma) / 127.5
    expect = sigma * math.sqrt(0.299**2 + 0.587**2 + 0.114**2)
    assert float(noise_sigma(x, WHOLE)) == pytest.approx(expect, rel=0.04)


def _texture(seed: int = 0, size: int = 128) -> torch.Tensor:
    """A sharp synthetic 'face': smooth shading plus random edges (a blocky pattern), [1,3,S,S] in [-1,1]."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(1, 3, size // 8, size // 8, generator=g, dtype=torch.float64)
    x = F.interpolate(blocks, size=(size, size), mode="nearest") * 1.6 - 0.8
    return x.clamp(-1, 1)


def test_blur_lowers_sharpness_and_noise_raises_noise_estimate():
    x = _texture()
    sharp = noref_scores(x)
    blurred = noref_scores(_blur(x, 1.5))
    assert float(blurred["laplacian_var"]) < 0.25 * float(sharp["laplacian_var"])
    assert float(blurred["excess_laplacian_var"]) < float(sharp["excess_laplacian_var"])
    noisy = (x + 15 / 127.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype))
    n = noref_scores(noisy)
    assert float(n["noise_sigma"]) > 5 * float(sharp["noise_sigma"]) + 3


def test_real_faces_blur_monotone(real_val_faces):
    x = real_val_faces.double()
    lv = [laplacian_variance(_blur(x, s)) if s else laplacian_variance(x) for s in (0, 0.7, 1.5, 3.0)]
    for a, b in zip(lv, lv[1:]):
        assert (b < a).all()
    assert laplacian_variance(x).shape == (8,) and FACE_REGION[0] < FACE_REGION[1]


def test_colorfulness_zero_for_gray_and_exact_for_two_colours():
    gray = torch.full((1, 3, 40, 40), 77, dtype=torch.uint8)
    assert colorfulness(gray, region=(0, 1, 0, 1)).item() == 0
    # half pure red (255,0,0), half pure blue (0,0,255): rg = 255 / 0, yb = 127.5 / -255
    img = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    img[0, 0, :, :20] = 255
    img[0, 2, :, 20:] = 255
    std_rg, std_yb = 127.5, 191.25
    mean_rg, mean_yb = 127.5, -63.75
    expect = (std_rg ** 2 + std_yb ** 2) ** 0.5 + 0.3 * (mean_rg ** 2 + mean_yb ** 2) ** 0.5
    assert abs(colorfulness(img, region=(0, 1, 0, 1)).item() - expect) < 1e-9
