import json

import pytest
import torch

from clrface.diffusion.prior import load_prior
from clrface.diffusion.schedule import ScheduleConfig
from clrface.train.diffusion import PriorStage, PriorTrainConfig, latent_stats
from clrface.train.engine import EngineConfig, train


def test_latent_stats_normalise_to_zero_mean_unit_std():
    std_true = torch.tensor([2.0, 0.5, 1.0]).view(1, 3, 1, 1)
    mean_true = torch.tensor([1.0, -3.0, 0.0]).view(1, 3, 1, 1)
    z = torch.randn(50, 3, 4, 4) * std_true + mean_true
    mean, std = latent_stats(z)
    zn = (z - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(zn.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(zn.std((0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)


def test_prior_stage_trains_and_exports_with_stats(tiny_models, tmp_path):
    out = tmp_path / "run"
    cfg = PriorTrainConfig(vqgan=str(tiny_models["vqgan"]), train_dir=str(tiny_models["faces"]),
                           val_dir=str(tiny_models["faces"]), val_count=4, val_steps=2, warmup=1)
    stage = PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(sigma_max=20.0, p_mean=0.3), cfg, seed=0,
                       batch_size=4, out_dir=out)
    b1, b2 = stage.batch(3, 0, 1), stage.batch(3, 0, 1)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)  # deterministic per step: exact resume
    assert b1["zd"].shape == b1["z0"].shape == (4, 3, 8, 8)
    assert (out / "latents.pt").exists()  # clean latents cached once
    train(stage, EngineConfig(out_dir=str(out), steps=2, batch_size=4, mixed_precision="no", val_every=2, ckpt_every=2))
    prior = load_prior(out / "model")
    stats = json.loads((out / "latent_stats.json").read_text())
    assert list(prior.config.latent_mean) == stats["mean"] and list(prior.config.latent_std) == stats["std"]
    assert "val/psnr_direct" in (out / "log.csv").read_text()


def test_prior_stage_init_from_checkpoint(tiny_models, tmp_path):
    cfg = PriorTrainConfig(vqgan=str(tiny_models["vqgan"]), train_dir=str(tiny_models["faces"]),
                           val_dir=str(tiny_models["faces"]), val_count=4, init_from=str(tiny_models["prior"]))
    stage = PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(), cfg, seed=0, batch_size=4, out_dir=tmp_path)
    ref = load_prior(tiny_models["prior"])
    for a, b in zip(stage.modules["prior"].parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_prior_stage_without_latent_cache_gives_the_cached_targets(tiny_models, tmp_path):
    common = dict(vqgan=str(tiny_models["vqgan"]), train_dir=str(tiny_models["faces"]),
                  val_dir=str(tiny_models["faces"]), val_count=4)
    cached = PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(), PriorTrainConfig(**common), seed=0,
                        batch_size=4, out_dir=tmp_path / "a")
    lazy = PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(),
                      PriorTrainConfig(**common, cache_latents=False, stats_faces=10_000), seed=0, batch_size=4,
                      out_dir=tmp_path / "b")
    assert not (tmp_path / "b" / "latents.pt").exists()
    # the same faces give the same statistics, and each batch the same (flipped or not) targets
    assert lazy.prior_cfg.latent_mean == pytest.approx(cached.prior_cfg.latent_mean, abs=1e-5)
    a, b = cached.batch(5, 0, 1), lazy.batch(5, 0, 1)
    assert torch.allclose(a["z0"], b["z0"], atol=1e-4) and torch.equal(a["noise"], b["noise"])
    # with an init, the init's normalisation is kept
    init = PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(),
                      PriorTrainConfig(**common, cache_latents=False, init_from=str(tiny_models["prior"])), seed=0,
                      batch_size=4, out_dir=tmp_path / "c")
    assert list(init.prior_cfg.latent_std) == list(load_prior(tiny_models["prior"]).config.latent_std)
