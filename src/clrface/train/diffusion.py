"""Training stage of the conditional latent prior (paper Sec. 3.2, Eq. 9): pairs (z_0, z^d) = (E(x), E(x^d))
from the frozen VQGAN, x^d degraded on the fly (fresh degradations every step), latents normalised per channel."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from clrface.checkpoint import load_weights, read_config, save_checkpoint
from clrface.data.datasets import load_face_folder
from clrface.data.degradation import degrade_batch, get_preset
from clrface.data.io import to_model_range
from clrface.data.realistic import RealisticConfig, degrade_mixed
from clrface.device import native_bf16
from clrface.diffusion.loss import edm_loss, start_state_noise
from clrface.diffusion.prior import LatentPrior, PriorConfig
from clrface.diffusion.sampler import heun, sample
from clrface.diffusion.schedule import ScheduleConfig, sample_train_sigma
from clrface.diffusion.unet import UNetConfig
from clrface.identity.irn import load_irn
from clrface.metrics.psnr_ssim import psnr
from clrface.model_folder import apply_irn
from clrface.train.cache import cached, folder_stamp, folders_key
from clrface.train.engine import ChunkedBatches, Objective, step_indices, train_device
from clrface.train.vqgan import save_grid
from clrface.vqgan.model import VQGAN, encoder_fingerprint, load_vqgan


@dataclass(frozen=True)
class PriorTrainConfig:
    vqgan: str = "runs/vqgan-128/model"
    train_dir: str | list[str] = "../shared/data/faces128/train"  # a list of folders is concatenated
    val_dir: str = "../shared/data/faces128/val"
    val_count: int = 16
    preset: str = "bfr"
    lr: float = 2e-4
    warmup: int = 200
    encode_batch: int = 64
    hflip: bool = True
    val_steps: int = 10  # Heun steps of the validation samples
    val_sigma_start: float = 2.0  # validation also samples from z^d + sigma_start * eps
    # A prior checkpoint to continue from (e.g. the shipped src/clrface/weights/default/prior) when the
    # resumable train_state of an earlier run is not available; optimiser moments start afresh.
    init_from: str | None = None
    # True: encode every training face (plain and mirrored) once, up front, and keep the latents in out_dir;
    # False: encode each batch's faces as they come (+~30 % per step on a CPU, but no start-up cost: caching
    # 18k faces twice takes over an hour on one shared core, more than a short run's gain from it). The
    # normalisation then comes from the init_from prior, or from the first `stats_faces` faces.
    cache_latents: bool = True
    stats_faces: int = 2048
    # Without the cache: encode the clean targets under bf16 autocast too. Half the step on a CPU (the encoder is
    # most of it); the targets move by 0.004 rms in normalised units (std 1), far below the loss at any sigma.
    bf16_targets: bool = False
    # The states the sampler starts from: for a share `start_prob` of each batch the noisy input is the latent of
    # the IRN output plus noise, E(IRN(x^d)) + sigma * eps with sigma log-uniform in `start_sigma` (the fidelity
    # map's range), the target still the clean latent (diffusion.loss.start_state_noise). 0: plain denoising.
    irn: str | None = None
    start_prob: float = 0.0
    start_sigma: tuple[float, float] = (0.05, 4.0)
    # Batches of this many consecutive micro-steps are made together (as IRNTrainConfig.degrade_steps): on a GPU
    # degradation and encoding cost a few launches per call, whatever the batch.
    degrade_steps: int = 1
    # None: the paper's single `preset` round; a RealisticConfig (a dict in YAML) adds the IRN's second round,
    # faded colours, grain and grayscale (data/realistic.py), so that z^d of a real photo is no stranger to the
    # prior. Gray inputs have gray targets, so the clean latents are encoded per batch (cache_latents false).
    realistic: RealisticConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.realistic, dict):
            object.__setattr__(self, "realistic", RealisticConfig(**self.realistic))
        if self.realistic is not None and self.cache_latents:
            raise ValueError("stage.realistic needs stage.cache_latents: false (gray targets are not cached)")
        if self.start_prob > 0 and not self.irn:
            raise ValueError("stage.start_prob > 0 needs stage.irn (an IRN checkpoint folder)")


@torch.no_grad()
def encode_all(vq: VQGAN, faces_u8: Tensor, batch: int = 64, flip: bool = False) -> Tensor:
    """E(x) of uint8 faces [N,S,S,3] -> [N,d,h,w] fp32 (the clean targets; encoded once, in fp32)."""
    out = []
    for chunk in faces_u8.split(batch):
        x = to_model_range(chunk)
        out.append(vq.encode(x.flip(-1) if flip else x))
    return torch.cat(out)


def latent_stats(latents: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of latents [N,d,h,w]: the normalisation stored in the prior's config."""
    return latents.mean((0, 2, 3)).tolist(), latents.std((0, 2, 3)).tolist()


class PriorStage:
    ema_name = "prior"

    def __init__(self, unet_cfg: UNetConfig, sigma_data: float, schedule: ScheduleConfig, cfg: PriorTrainConfig,
                 seed: int, batch_size: int, out_dir: Path):
        self.cfg, self.seed, self.batch_size, self.schedule = cfg, seed, batch_size, schedule
        dev = train_device()  # the encoder, the faces and the IRN live where training runs (batches stay there)
        self.vq = load_vqgan(cfg.vqgan).to(dev)
        size = self.vq.config.resolution
        self.degradation = get_preset(cfg.preset, size)
        faces = load_face_folder(cfg.train_dir, size=size).to(dev)
        self.faces = faces
        cache = out_dir / "latents.pt"  # clean latents of the frozen encoder (plain and mirrored)
        self.z0: Tensor | None = None
        if not cfg.cache_latents:
            if cfg.init_from:  # keep the normalisation the init was trained with
                init_cfg, _ = read_config(cfg.init_from, "prior", PriorConfig)
                mean, std = list(init_cfg.latent_mean), list(init_cfg.latent_std)
            else:
                mean, std = latent_stats(encode_all(self.vq, faces[: cfg.stats_faces], cfg.encode_batch))
        else:
            key = {"vqgan": folder_stamp(cfg.vqgan), "train_dir": folders_key(cfg.train_dir), "faces": len(faces),
                   "size": size}

            def encode() -> Tensor:
                print(f"encoding {len(faces)} faces and their mirror images for {cache} (once per run folder)",
                      file=sys.stderr)
                return torch.stack([encode_all(self.vq, faces, cfg.encode_batch),
                                    encode_all(self.vq, faces, cfg.encode_batch, flip=True)], 1)

            self.z0 = cached(cache, key, encode)
            mean, std = latent_stats(self.z0[:, 0])
        out_dir.mkdir(parents=True, exist_ok=True)
        self.prior_cfg = PriorConfig(unet=unet_cfg, sigma_data=sigma_data, latent_mean=mean, latent_std=std,
                                     schedule=schedule)
        (out_dir / "latent_stats.json").write_text(json.dumps({"mean": mean, "std": std}))
        prior = LatentPrior(self.prior_cfg)
        if cfg.init_from:
            load_weights(cfg.init_from, prior)
        self.modules: dict[str, nn.Module] = {"prior": prior}
        self.irn = None
        if cfg.start_prob > 0:
            self.irn = load_irn(cfg.irn).to(dev)
        val = load_face_folder(cfg.val_dir, size=size, limit=cfg.val_count)
        self.val_gt = to_model_range(val)
        self.val_lq, _ = degrade_batch(self.val_gt, self.degradation, generator=12345)
        self.val_gt, self.val_lq = self.val_gt.to(dev), self.val_lq.to(dev)
        self.batches = ChunkedBatches(self._chunk_batch, cfg.degrade_steps, batch_size)

    @torch.no_grad()
    def _encode_cond(self, x_d: Tensor) -> Tensor:
        with torch.autocast(x_d.device.type, dtype=torch.bfloat16, enabled=native_bf16(x_d.device)):
            return self.vq.encode(x_d)

    def batch(self, micro_step: int, rank: int, world: int) -> dict[str, Tensor]:
        return self.batches(micro_step, rank, world)

    def _chunk_batch(self, chunk: int, rank: int, world: int) -> dict[str, Tensor]:
        """The batches of the degrade_steps micro-steps of ``chunk``, stacked in step order."""
        k = self.cfg.degrade_steps
        idx = torch.cat([step_indices(chunk * k + i, len(self.faces), self.batch_size, self.seed, rank, world)
                         for i in range(k)])
        g = torch.Generator().manual_seed(self.seed * 7919 + chunk * 31 + rank)
        flip = (torch.rand(len(idx), generator=g) < 0.5) if self.cfg.hflip else torch.zeros(len(idx), dtype=torch.bool)
        x = to_model_range(self.faces[idx])
        dev = x.device
        x = torch.where(flip.to(dev)[:, None, None, None], x.flip(-1), x)
        x_d, x = degrade_mixed(x, self.degradation, self.cfg.realistic, int(torch.randint(0, 2**31, (1,), generator=g)))
        prior = self.modules["prior"]
        if self.z0 is None:
            if self.cfg.bf16_targets:
                z0 = self._encode_cond(x).float()
            else:
                with torch.no_grad():  # fp32, as the cached latents: they are the regression targets
                    z0 = self.vq.encode(x)
        else:
            z0 = self.z0[idx, flip.long()].to(dev)
        sigma = sample_train_sigma(len(idx), self.schedule.p_mean, self.schedule.p_std, g).to(dev)
        noise = torch.randn(z0.shape, generator=g).to(dev)
        zd = prior.normalize(self._encode_cond(x_d))
        z0 = prior.normalize(z0)
        if self.irn is not None:
            rows = (torch.rand(len(idx), generator=g) < self.cfg.start_prob).to(dev)
            if rows.any():
                lo, hi = (torch.tensor(v).log() for v in self.cfg.start_sigma)
                s_start = (lo + (hi - lo) * torch.rand(int(rows.sum()), generator=g)).exp().to(dev)
                with torch.no_grad():
                    z_irn = prior.normalize(self._encode_cond(apply_irn(self.irn, x_d[rows])).float())
                noise[rows] = start_state_noise(z0[rows], z_irn, s_start, noise[rows])
                sigma[rows] = s_start
        return {"z0": z0, "zd": zd, "sigma": sigma, "noise": noise}

    def objectives(self, m: dict[str, nn.Module]) -> list[Objective]:
        prior = m["prior"]
        inner = prior.module if hasattr(prior, "module") else prior

        def loss_fn(batch, step, cache):
            per_sample = edm_loss(lambda x, s, c: inner.precond(x, s, c), batch["z0"], batch["zd"],
                                  batch["sigma"], batch["noise"])
            loss = per_sample.mean()
            return loss, {"loss": loss.item()}

        return [Objective("prior", list(prior.parameters()), loss_fn, self.cfg.lr, warmup=self.cfg.warmup)]

    @torch.no_grad()
    def validate(self, ema: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        zd = ema.normalize(self._encode_cond(self.val_lq))
        z0 = ema.normalize(self.vq.encode(self.val_gt))
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(z0.shape, generator=g).to(z0.device)
        logs = {}
        for s in (0.5, 2.0, 10.0):  # val loss at fixed sigmas with fixed noise: comparable across runs
            sig = torch.full((len(z0),), s, device=z0.device)
            logs[f"loss@{s:g}"] = edm_loss(ema.precond, z0, zd, sig, noise).mean().item()
        denoise = functools.partial(ema.precond, cond=zd)
        sigmas = self.schedule.sigmas(self.cfg.val_steps)
        from_noise = sample(heun, denoise, torch.zeros_like(zd), sigmas, noise=noise)
        from_zd = sample(heun, denoise, zd, sigmas, sigma_start=self.cfg.val_sigma_start, noise=noise)
        direct = self.vq.decode(ema.denormalize(zd)).float()
        rec_noise = self.vq.decode(ema.denormalize(from_noise)).float()
        rec_zd = self.vq.decode(ema.denormalize(from_zd)).float()
        save_grid(out_dir / "val" / f"{step:07d}.png",
                  [t[:8].cpu() for t in (self.val_lq, direct, rec_noise, rec_zd, self.val_gt)])
        logs.update({"psnr_direct": psnr(direct, self.val_gt).mean().item(),
                     "psnr_noise": psnr(rec_noise, self.val_gt).mean().item(),
                     "psnr_zd": psnr(rec_zd, self.val_gt).mean().item()})
        return logs

    def export(self, ema: nn.Module, folder: Path) -> None:
        save_checkpoint(folder, ema, self.prior_cfg, "prior", extra={"vqgan_encoder": encoder_fingerprint(self.vq)})
