import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
import yaml

from clrface.checkpoint import load_weights, read_config, save_checkpoint
from clrface.diffusion.precond import Precond, edm_scalings
from clrface.diffusion.sampler import heun, sample
from clrface.diffusion.schedule import ScheduleConfig, karras_sigmas
from clrface.diffusion.unet import UNet, UNetConfig, count_parameters

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "prior-128.yaml"
TINY = UNetConfig(resolution=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(8,), head_channels=8, norm_groups=8)


def _randomise_zero_inits(net: torch.nn.Module, seed: int = 0) -> None:
    """Gives the zero-initialised convs/projections random weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _inputs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = cfg.resolution
    return (torch.randn(b, cfg.latent_channels, r, r, generator=g),
            torch.randn(b, cfg.cond_channels, r, r, generator=g))


def test_shape_and_zero_init_gives_c_skip_x():
    torch.manual_seed(0)
    pre = Precond(UNet(TINY), sigma_data=1.0)
    x, cond = _inputs(TINY)
    sigma = torch.tensor([0.5, 8.0])
    out = pre(x, sigma, cond)
    assert out.shape == x.shape
    c_skip = edm_scalings(sigma, 1.0)[0].view(-1, 1, 1, 1)
    assert torch.equal(out, c_skip * x)  # F = 0 exactly at init: c_skip x = x / (1 + sigma^2)
    torch.testing.assert_close(out[1], x[1] / 65)


def test_gradient_reaches_cond_and_cond_changes_output():
    torch.manual_seed(0)
    net = UNet(TINY)
    _randomise_zero_inits(net)
    x, cond = _inputs(TINY)
    cond.requires_grad_(True)
    x.requires_grad_(True)
    out = Precond(net, 1.0)(x, torch.tensor([1.0, 3.0]), cond)
    out.square().sum().backward()
    assert cond.grad.abs().mean().item() > 1e-4
    assert x.grad.abs().mean().item() > 1e-4
    # per-sample independence: sample 1 does not see sample 0's cond (GroupNorm is per sample)
    with torch.no_grad():
        cond2 = cond.detach().clone()
        cond2[0] += 1.0
        a = net(x.detach(), torch.tensor([0.1, 0.2]), cond=cond.detach())
        b = net(x.detach(), torch.tensor([0.1, 0.2]), cond=cond2)
    assert (a[0] - b[0]).abs().max().item() > 1e-3
    assert torch.equal(a[1], b[1])
    with pytest.raises(ValueError):
        net(x, torch.zeros(2))


def test_noise_level_changes_output():
    for emb in ("fourier", "positional"):
        torch.manual_seed(0)
        net = UNet(dataclasses.replace(TINY, embedding=emb))
        _randomise_zero_inits(net)
        x, cond = _inputs(TINY)
        with torch.no_grad():
            a, b = net(x, torch.tensor([0.0, 0.0]), cond=cond), net(x, torch.tensor([0.5, 0.5]), cond=cond)
        assert (a - b).abs().mean().item() > 1e-3, emb


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    net = UNet(TINY)
    _randomise_zero_inits(net)
    x, cond = _inputs(TINY)
    pre = Precond(net, 1.0)
    sigma = torch.tensor([0.3, 4.0])
    with torch.no_grad():
        ref = pre(x, sigma, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = pre(x, sigma, cond)
    assert low.dtype == torch.float32
    rel = ((low - ref).norm() / ref.norm()).item()
    assert rel < 0.02  # bf16 has an 8-bit mantissa (~0.4% per op)


def test_default_config_from_yaml():
    cfg = yaml.safe_load(CONFIG.read_text())
    ucfg = UNetConfig(**cfg["unet"])
    scfg = ScheduleConfig(**cfg["schedule"])
    assert ucfg.channel_mult == (1, 2, 2) and ucfg.attn_resolutions == (8,) and ucfg.in_channels == 6
    net = UNet(ucfg)
    assert count_parameters(net) == 4_751_939  # one res block per level: the CPU-sized default
    pre = Precond(net, **cfg["precond"])
    assert pre.sigma_data == 1.0
    assert scfg.sigma_max == 20.0 and scfg.p_mean == 0.3 and scfg.steps == 40
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert pre(x, torch.tensor([2.0]), torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(TypeError):
        UNetConfig(**{**cfg["unet"], "chanel_mult": [1, 2]})


def test_config_and_checkpoint_round_trip(tmp_path):
    # JSON gives lists back; the config normalises them to tuples, so it compares equal
    assert UNetConfig(**json.loads(json.dumps(dataclasses.asdict(TINY)))) == TINY
    torch.manual_seed(0)
    net = UNet(TINY)
    _randomise_zero_inits(net)
    save_checkpoint(tmp_path / "prior", net, TINY, "prior")
    cfg, _ = read_config(tmp_path / "prior", "prior", UNetConfig)
    torch.manual_seed(1)  # different Fourier frequencies and weights until loaded
    net2 = load_weights(tmp_path / "prior", UNet(cfg))
    x, cond = _inputs(TINY)
    with torch.no_grad():
        assert torch.equal(net(x, torch.zeros(2), cond=cond), net2(x, torch.zeros(2), cond=cond))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="not divisible by 2"):
        UNetConfig(resolution=30)
    with pytest.raises(ValueError, match="embedding must be"):
        UNetConfig(embedding="learned")
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(model_channels=48, norm_groups=32)


def test_untrained_prior_samples_standard_normal_closed_form():
    # At init D = c_skip x = x / (1 + sigma^2): the ideal denoiser of N(0, 1) data, so Heun through the
    # real Precond+UNet stack lands on the closed-form ODE solution x_T / sqrt(1 + sigma_max^2).

    torch.manual_seed(0)
    pre = Precond(UNet(TINY), 1.0)
    x_init, cond = _inputs(TINY)
    noise = torch.randn(x_init.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = sample(heun, functools.partial(pre, cond=cond), torch.zeros_like(x_init), karras_sigmas(40, 0.002, 20.0),
                     noise=noise)
    expect = 20.0 * noise / (1 + 20.0**2) ** 0.5
    # Heun discretisation error at 40 steps: ~0.5% of the output scale
    assert (out - expect).abs().max().item() < 0.02 * expect.abs().max().item()
