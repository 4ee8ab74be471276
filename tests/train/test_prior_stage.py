import json

import pytest
import torch

from clrface.diffusion.loss import start_state_noise
from clrface.diffusion.prior import load_prior
from clrface.diffusion.schedule import ScheduleConfig
from clrface.metrics.psnr_ssim import psnr
from clrface.train import diffusion as diffusion_stage
from clrface.train.diffusion import PriorStage, PriorTrainConfig, latent_stats
from clrface.train.engine import EngineConfig, train
from clrface.vqgan.model import encoder_fingerprint, load_vqgan


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
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["vqgan_encoder"] == encoder_fingerprint(load_vqgan(tiny_models["vqgan"]))  # what its latents are of
    stats = json.loads((out / "latent_stats.json").read_text())
    assert list(prior.config.latent_mean) == stats["mean"] and list(prior.config.latent_std) == stats["std"]
    assert "val/psnr_direct" in (out / "log.csv").read_text()


def test_prior_stage_chunks_are_pure_functions_of_their_index(tiny_models, tmp_path):
    cfg = PriorTrainConfig(vqgan=str(tiny_models["vqgan"]), train_dir=str(tiny_models["faces"]),
                           val_dir=str(tiny_models["faces"]), val_count=4, degrade_steps=3)

    def stage():
        return PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(), cfg, seed=0, batch_size=4, out_dir=tmp_path)

    a, b = stage(), stage()
    steps = [a.batch(s, 0, 1) for s in (3, 4, 5)]  # one chunk: three different batches
    assert all(x["z0"].shape == (4, 3, 8, 8) and x["sigma"].shape == (4,) for x in steps)
    assert not torch.equal(steps[0]["noise"], steps[1]["noise"])
    assert all(torch.equal(steps[1][k], b.batch(4, 0, 1)[k]) for k in steps[1])  # asked first, the same batch


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


def test_prior_stage_trains_on_the_states_the_sampler_starts_from(tiny_models, tmp_path, monkeypatch):
    common = dict(vqgan=str(tiny_models["vqgan"]), train_dir=str(tiny_models["faces"]),
                  val_dir=str(tiny_models["faces"]), val_count=4, cache_latents=False)
    plain = PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(), PriorTrainConfig(**common), seed=0,
                       batch_size=6, out_dir=tmp_path / "a")
    start = PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(),
                       PriorTrainConfig(**common, irn=str(tiny_models["irn"]), start_prob=1.0, start_sigma=(0.1, 2.0)),
                       seed=0, batch_size=6, out_dir=tmp_path / "b")
    seen = {}

    def spy(z0, z_start, sigma, noise):
        seen.update(z_start=z_start, sigma=sigma, eps=noise.clone())
        return start_state_noise(z0, z_start, sigma, noise)

    monkeypatch.setattr(diffusion_stage, "start_state_noise", spy)
    a, b = plain.batch(2, 0, 1), start.batch(2, 0, 1)
    assert torch.allclose(a["z0"], b["z0"], atol=1e-5) and torch.equal(a["zd"], b["zd"])  # same faces and targets
    assert ((b["sigma"] >= 0.1 - 1e-6) & (b["sigma"] <= 2.0 + 1e-6)).all() and torch.equal(b["sigma"], seen["sigma"])
    # the loss's noisy input z0 + sigma * noise is the IRN output's latent plus fresh noise at sigma
    s = b["sigma"].view(-1, 1, 1, 1)
    torch.testing.assert_close(b["z0"] + s * b["noise"], seen["z_start"] + s * seen["eps"], atol=1e-4, rtol=0)
    assert (seen["z_start"] - b["z0"]).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="stage.irn"):
        PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(), PriorTrainConfig(**common, start_prob=0.5),
                   seed=0, batch_size=6, out_dir=tmp_path / "c")


def test_prior_stage_realistic_mix_degrades_inputs_and_grays_targets(tiny_models, tmp_path):
    common = dict(vqgan=str(tiny_models["vqgan"]), train_dir=str(tiny_models["faces"]),
                  val_dir=str(tiny_models["faces"]), val_count=4, cache_latents=False)
    off = dict(second_prob=0.0, fade_prob=0.0, gray_prob=0.0, grain_prob=0.0)

    def batch(realistic):
        stage = PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(),
                           PriorTrainConfig(**common, realistic=realistic), seed=0, batch_size=4, out_dir=tmp_path)
        return stage.batch(2, 0, 1)

    plain = batch(None)
    second = batch({**off, "second_prob": 1.0})
    gray = batch({**off, "gray_prob": 1.0})
    # a second round changes only the condition: the targets stay the clean faces' latents
    assert torch.allclose(second["z0"], plain["z0"], atol=1e-5)
    assert (second["zd"] - plain["zd"]).abs().mean() > 1e-3
    # grayscale inputs come with grayscale targets
    assert (gray["z0"] - plain["z0"]).abs().mean() > 1e-3
    assert torch.equal(gray["noise"], plain["noise"]) and torch.equal(gray["sigma"], plain["sigma"])
    with pytest.raises(ValueError, match="cache_latents"):
        PriorTrainConfig(**{**common, "cache_latents": True}, realistic=off)


@pytest.mark.parametrize("native", [True, False])
def test_prior_stage_bf16_targets_stay_close_to_fp32(tiny_models, tmp_path, monkeypatch, native):
    # where bf16 is emulated (an AVX2-only CPU) the encoders run in fp32 and the targets are the fp32 ones
    monkeypatch.setattr("clrface.train.diffusion.native_bf16", lambda device: native)
    common = dict(vqgan=str(tiny_models["vqgan"]), train_dir=str(tiny_models["faces"]),
                  val_dir=str(tiny_models["faces"]), val_count=4, cache_latents=False)
    fp32, bf16 = (PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(), PriorTrainConfig(**common, bf16_targets=b),
                             seed=0, batch_size=4, out_dir=tmp_path / str(b)).batch(1, 0, 1) for b in (False, True))
    err = (fp32["z0"] - bf16["z0"]).pow(2).mean().sqrt().item()
    assert (0 < err < 0.05 if native else err == 0) and bf16["z0"].dtype == torch.float32


def test_prior_validation_is_fixed_noise_losses_and_the_direct_decode(tiny_models, tmp_path):
    cfg = PriorTrainConfig(vqgan=str(tiny_models["vqgan"]), train_dir=str(tiny_models["faces"]),
                           val_dir=str(tiny_models["faces"]), val_count=4, val_steps=2)
    stage = PriorStage(tiny_models["unet_cfg"], 1.0, ScheduleConfig(), cfg, seed=0, batch_size=4, out_dir=tmp_path)
    prior = stage.modules["prior"].eval()
    with torch.no_grad():
        logs = stage.validate(prior, 0, tmp_path)
        again = stage.validate(prior, 0, tmp_path)
        z0 = prior.normalize(stage.vq.encode(stage.val_gt))
        zd = prior.normalize(stage._encode_cond(stage.val_lq))  # bf16 where native, as in training
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
        # the EDM loss written out: lambda(sigma) * ||D(z0 + sigma n) - z0||^2, lambda = (s^2 + sd^2) / (s sd)^2
        sd, s = prior.config.sigma_data, 2.0
        d = prior.precond(z0 + s * noise, torch.full((4,), s), zd)
        want = ((s**2 + sd**2) / (s * sd) ** 2 * (d - z0).pow(2).mean((1, 2, 3))).mean().item()
        direct = stage.vq.decode(prior.denormalize(zd)).float()
    assert logs == again  # fixed sigmas and noise: comparable from run to run
    assert logs["loss@2"] == pytest.approx(want, rel=1e-4)
    assert logs["psnr_direct"] == pytest.approx(psnr(direct, stage.val_gt).mean().item(), abs=1e-4)
