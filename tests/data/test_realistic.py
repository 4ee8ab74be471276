import pytest
import torch

from clrface.data.degradation import degrade_batch, get_preset
from clrface.data.realistic import RealisticConfig, degrade_realistic, fade, to_gray


def faces(n: int = 8, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g) * 1.6 - 0.8
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # some spatial structure


def test_to_gray_uses_bt601_luma():
    x = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    y = to_gray(x)
    assert torch.allclose(y, torch.full_like(y, 0.299 - 0.114))


def test_fade_limits():
    x = faces(2)
    one, zero = torch.ones(2), torch.zeros(2)
    assert torch.allclose(fade(x, one, one, torch.zeros(2, 3)), x.clamp(-1, 1), atol=1e-6)
    flat = fade(x, zero, zero, torch.zeros(2, 3))  # no saturation, no contrast: every pixel the mean gray
    assert flat.std((1, 2, 3)).max() < 1e-6
    cast = fade(x, one, one, torch.tensor([[0.1, 0.0, -0.1]] * 2))
    assert torch.allclose((cast - x).mean((0, 2, 3)), torch.tensor([0.1, 0.0, -0.1]), atol=0.02)


def test_degrade_realistic_is_seeded_and_keeps_gray_targets_gray():
    x = faces(16)
    cfg = RealisticConfig(gray_prob=0.5, second_prob=1.0, fade_prob=0.5, grain_prob=0.5)
    first = get_preset("bfr", 32)
    a, ta = degrade_realistic(x, first, cfg, torch.Generator().manual_seed(3))
    b, tb = degrade_realistic(x, first, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    gray = (ta[:, 0] == ta[:, 1]).flatten(1).all(1) & (ta[:, 1] == ta[:, 2]).flatten(1).all(1)
    assert gray.int().tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1]  # the seeded draw, p = 0.5
    assert torch.equal(ta[~gray], x[~gray])
    assert (a[gray, 0] - a[gray, 1]).abs().max() < 1e-6  # gray inputs stay gray (no fade cast on them)
    # on the 8-bit grid
    assert torch.allclose(a.add(1).mul(127.5), a.add(1).mul(127.5).round(), atol=1e-3)


def test_degrade_realistic_without_extras_is_one_bfr_round():
    x = faces(4)
    none = RealisticConfig(second_prob=0, fade_prob=0, gray_prob=0, grain_prob=0)
    a, t = degrade_realistic(x, get_preset("bfr", 32), none, torch.Generator().manual_seed(1))
    assert torch.equal(t, x)
    # the same generator, after the gray draw, gives the very same bfr round
    g = torch.Generator().manual_seed(1)
    torch.rand(4, generator=g)
    one_round, _ = degrade_batch(x, get_preset("bfr", 32), g)
    assert torch.equal(a, one_round.add(1).mul(127.5).round().div(127.5).sub(1))
    assert (a - x).abs().mean() > 0.001


def test_realistic_config_validates_and_reads_yaml_dicts():
    cfg = RealisticConfig(second={"name": "s", "scale": [1.0, 2.0]})
    assert cfg.second.scale == (1.0, 2.0)
    with pytest.raises(ValueError):
        RealisticConfig(fade_prob=1.5)
