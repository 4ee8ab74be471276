"""Few-step refinement by trajectory distillation: a student prior D_s(x; sigma, z^d) trained to
jump from any point of the teacher's probability-flow ODE trajectory straight to its end point.

Method: knowledge distillation of a deterministic sampler (Luhman & Luhman 2021, "Knowledge Distillation in
Iterative Generative Models for Improved Sampling Speed", arXiv:2101.02388), generalised from the start
point to every point of the trajectory as in consistency distillation's target (Song et al. 2023,
arXiv:2303.01469): the student's D(x_sigma) regresses the teacher's ODE solution x_0 from x_sigma. With such
a D, an Euler step x' = D + (sigma'/sigma)(x - D) re-noises the end point along the ODE direction, so the
existing ``euler`` sampler with 1, 2 or 4 steps *is* the multistep consistency sampler and the identity
guidance wrapper applies to the student unchanged (it only needs a ``Denoise``).

Why this and not progressive distillation or reflow: our refinement starts close to the answer (from z^id or
z^d at sigma_start <= 5) and the teacher's trajectories cost ~40 denoiser calls each, so a fixed set of
teacher trajectories, generated once and reused every epoch, is the cheapest target on 2 CPU cores;
progressive distillation needs log2(40) rounds of training and consistency training's bootstrapped targets
need far more steps than this CPU affords.

Trajectories: for ``pairs`` training faces, each degraded once (bfr), the start is one of
  z^id + s * eps (the full pipeline's start), z^d + s * eps (prior mode) or s_max * eps (from noise),
with s log-uniform in [start_min, start_max] per batch of ``traj_batch``; the teacher (the model's prior,
unguided) runs ``teacher_steps`` Heun steps, and every state x at each schedule sigma is a training input
with the final latent as its target. The student starts from the teacher's weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from clrface.checkpoint import save_checkpoint
from clrface.data.datasets import load_face_folder
from clrface.data.degradation import degrade_batch, get_preset
from clrface.data.io import to_model_range
from clrface.data.realistic import RealisticConfig, degrade_mixed
from clrface.device import autocast, native_bf16
from clrface.diffusion.loss import denoiser_loss
from clrface.diffusion.prior import LatentPrior
from clrface.diffusion.sampler import Denoise, euler, heun, sample
from clrface.diffusion.schedule import ScheduleConfig, sigmas_from
from clrface.metrics.psnr_ssim import psnr
from clrface.model_folder import (
    ModelFolder,
    apply_irn,
    decode_latent,
    encode_latent,
    load_model_folder,
    resolve_model,
)
from clrface.train.cache import cached, folder_stamp, folders_key
from clrface.train.engine import Objective, step_indices, train_device
from clrface.train.vqgan import save_grid
from clrface.vqgan.model import encoder_fingerprint


@dataclass(frozen=True)
class DistillTrainConfig:
    model: str = "default"  # teacher model folder or installed name: its prior is the teacher, its IRN the start
    train_dir: str | list[str] = "../shared/data/faces128/train"  # a list of folders is concatenated
    val_dir: str = "../shared/data/faces128/val"
    val_count: int = 16
    preset: str = "bfr"
    pairs: int = 4096  # teacher trajectories (one per face, each face degraded once)
    traj_batch: int = 32  # faces per teacher batch; one start sigma per batch
    teacher_steps: int = 20  # Heun steps of the teacher (39 NFE): within 1 % of Heun-40 (docs/RESULTS.md)
    start_min: float = 0.05
    start_max: float = 5.0
    noise_fraction: float = 0.25  # share of trajectories from pure noise at the schedule's sigma_max
    id_fraction: float = 0.5  # share of the rest that starts from z^id (the others from z^d)
    lr: float = 5e-5
    warmup: int = 50
    # the teacher's net under bf16 autocast where bf16 is native (~1.9x faster on such a CPU; sigma math fp32)
    teacher_bf16: bool = True
    val_sigma_start: float = 0.447  # the default fidelity 0.5's sigma_start
    val_steps: tuple[int, ...] = (1, 2, 4)
    # the teacher's inputs: None, the paper's `preset` round; a RealisticConfig (dict in YAML), the mix the
    # teacher prior was trained on (data/realistic.py), so the student sees the inputs its teacher knows
    realistic: RealisticConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.realistic, dict):
            object.__setattr__(self, "realistic", RealisticConfig(**self.realistic))


def distill_targets(denoise: Denoise, x_start: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """Runs Heun along ``sigmas`` (descending, ending in 0) from x_start [B,...] at sigmas[0].

    Returns (states [B,K,...]: x at sigmas[0..K-1], K = len(sigmas) - 1; x0 [B,...]: the end point).
    """
    states = [x_start]
    x0 = heun(denoise, x_start, sigmas, callback=lambda i, s, x: states.append(x) if s > 0 else None)
    return torch.stack(states, 1), x0


def start_kind(index: int, noise_fraction: float, id_fraction: float) -> str:
    """'noise' | 'id' | 'd' for trajectory batch ``index``: a fixed low-discrepancy split of the batches."""
    u = (index * 0.6180339887498949) % 1.0  # golden-ratio sequence: even shares for any number of batches
    if u < noise_fraction:
        return "noise"
    return "id" if (u - noise_fraction) / (1 - noise_fraction) < id_fraction else "d"


class Teacher:
    """The teacher model folder's nets and the latent steps distillation takes from them; ``dtype`` is the
    compute precision of the nets (autocast), the latents stay fp32."""

    def __init__(self, model: ModelFolder, dtype: torch.dtype = torch.float32):
        self.vqgan, self.prior, self.irn, self.dtype = model.vqgan, model.prior, model.irn, dtype
        self.device = next(model.vqgan.parameters()).device
        self.resolution = int(model.vqgan.config.resolution)

    def encode(self, x: Tensor) -> Tensor:
        return encode_latent(self.vqgan, self.prior, x.to(self.device))

    def decode(self, z: Tensor) -> Tensor:
        return decode_latent(self.vqgan, self.prior, z)

    def run_irn(self, x_d: Tensor) -> Tensor:
        return apply_irn(self.irn, x_d.to(self.device))

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)


@torch.no_grad()
def make_trajectories(teacher: Teacher, faces_u8: Tensor, cfg: DistillTrainConfig, schedule: ScheduleConfig, seed: int,
                      log=print) -> dict[str, Tensor]:
    """Teacher trajectories of ``faces_u8`` [N,S,S,3] (see the module docstring) -> dict of
    states [N,K,C,h,w] fp16, sigmas [N,K], x0 [N,C,h,w], zd [N,C,h,w] (normalised latents, fp32)."""
    deg = get_preset(cfg.preset, teacher.resolution)
    out: dict[str, list[Tensor]] = {"states": [], "sigmas": [], "x0": [], "zd": []}
    g = torch.Generator().manual_seed(seed)
    n_batches = math.ceil(len(faces_u8) / cfg.traj_batch)
    for b in range(n_batches):
        x = to_model_range(faces_u8[b * cfg.traj_batch:(b + 1) * cfg.traj_batch]).to(teacher.device)
        x_d, _ = degrade_mixed(x, deg, cfg.realistic, int(torch.randint(0, 2**31, (1,), generator=g)))
        kind = start_kind(b, cfg.noise_fraction, cfg.id_fraction)
        u = float(torch.rand((), generator=g))
        unet = teacher.prior.config.unet
        eps = torch.randn((len(x), unet.latent_channels, unet.resolution, unet.resolution), generator=g)
        eps = eps.to(teacher.device)
        with teacher.autocast():  # the nets only; the lists are joined outside autocast (it cannot cat fp16)
            z_d = teacher.encode(x_d)
            if kind == "noise":
                s, base = schedule.sigma_max, torch.zeros_like(z_d)
            else:
                s = math.exp(math.log(cfg.start_min) + u * (math.log(cfg.start_max) - math.log(cfg.start_min)))
                base = teacher.encode(teacher.run_irn(x_d)) if kind == "id" else z_d
            sigmas = sigmas_from(schedule, s, cfg.teacher_steps)
            states, x0 = distill_targets(functools.partial(teacher.prior, cond=z_d), base + s * eps, sigmas)
        out["states"].append(states.half())
        out["sigmas"].append(sigmas[:-1].expand(len(x), -1))
        out["x0"].append(x0.float())
        out["zd"].append(z_d)
        log(f"teacher trajectories: batch {b + 1}/{n_batches} ({kind}, sigma_start {s:.3g})")
    return {k: torch.cat(v) for k, v in out.items()}


class DistillStage:
    ema_name = "prior"

    def __init__(self, cfg: DistillTrainConfig, seed: int, batch_size: int, out_dir: Path):
        self.cfg, self.seed, self.batch_size = cfg, seed, batch_size
        # on a GPU the trajectories are made there and stay there (states of 8k faces are ~1 GB in fp16)
        dev = train_device()
        teacher = Teacher(load_model_folder(cfg.model, dev),
                          torch.bfloat16 if cfg.teacher_bf16 and native_bf16(dev) else torch.float32)
        self.teacher = teacher
        self.schedule = teacher.prior.config.schedule
        size = teacher.resolution
        made_by = {k: v for k, v in dataclasses.asdict(cfg).items()  # what the trajectories depend on
                   if k not in ("model", "train_dir", "val_dir", "val_count", "lr", "warmup", "val_sigma_start",
                                "val_steps")}
        key = {"model": folder_stamp(resolve_model(cfg.model)), "train_dir": folders_key(cfg.train_dir),
               "seed": seed, "teacher_dtype": str(teacher.dtype), **json.loads(json.dumps(made_by, default=str))}
        self.data = cached(out_dir / "trajectories.pt", key, lambda: make_trajectories(
            teacher, load_face_folder(cfg.train_dir, size=size, limit=cfg.pairs), cfg, self.schedule, seed),
            map_location=teacher.device)
        student = LatentPrior(teacher.prior.config)
        student.load_state_dict(teacher.prior.state_dict())
        self.modules: dict[str, nn.Module] = {"prior": student.train().requires_grad_(True)}
        val = to_model_range(load_face_folder(cfg.val_dir, size=size, limit=cfg.val_count))
        self.val_gt = val
        self.val_lq, _ = degrade_batch(val, get_preset(cfg.preset, size), generator=12345)
        t_dev = teacher.device
        with torch.no_grad():
            self.val_zd = teacher.encode(self.val_lq)
            self.val_zid = teacher.encode(teacher.run_irn(self.val_lq))
            self.val_noise = torch.randn(self.val_zd.shape, generator=torch.Generator().manual_seed(0)).to(t_dev)
            sig = sigmas_from(self.schedule, cfg.val_sigma_start, cfg.teacher_steps)
            self.val_teacher = sample(heun, functools.partial(teacher.prior, cond=self.val_zd), self.val_zid, sig,
                                      sigma_start=cfg.val_sigma_start, noise=self.val_noise)

    def batch(self, micro_step: int, rank: int, world: int) -> dict[str, Tensor]:
        n, k = self.data["sigmas"].shape
        idx = step_indices(micro_step, n * k, self.batch_size, self.seed, rank, world)
        i, j = idx // k, idx % k
        return {"x": self.data["states"][i, j].float(), "sigma": self.data["sigmas"][i, j],
                "x0": self.data["x0"][i], "zd": self.data["zd"][i]}

    def objectives(self, m: dict[str, nn.Module]) -> list[Objective]:
        prior = m["prior"]
        inner = prior.module if hasattr(prior, "module") else prior

        def loss_fn(batch, step, cache):
            loss = denoiser_loss(inner.precond, batch["x"], batch["sigma"], batch["zd"], batch["x0"]).mean()
            return loss, {"loss": loss.item()}

        return [Objective("prior", list(prior.parameters()), loss_fn, self.cfg.lr, warmup=self.cfg.warmup)]

    @torch.no_grad()
    def validate(self, ema: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        """Student Euler-1/2/4 from z^id at val_sigma_start vs the teacher's Heun trajectory from the same noise."""
        t = self.teacher
        denoise = functools.partial(ema, cond=self.val_zd)
        logs, rows = {}, [self.val_lq[:8]]
        for k in self.cfg.val_steps:
            sig = sigmas_from(self.schedule, self.cfg.val_sigma_start, k)
            z = sample(euler, denoise, self.val_zid, sig, sigma_start=self.cfg.val_sigma_start, noise=self.val_noise)
            img = t.decode(z).clamp(-1, 1).cpu()
            logs[f"latent_mse@{k}"] = (z - self.val_teacher).square().mean().item()
            logs[f"psnr@{k}"] = psnr(img, self.val_gt).mean().item()
            rows.append(img[:8])
        teacher_img = t.decode(self.val_teacher).clamp(-1, 1).cpu()
        logs["psnr_teacher"] = psnr(teacher_img, self.val_gt).mean().item()
        save_grid(out_dir / "val" / f"{step:07d}.png", rows + [teacher_img[:8], self.val_gt[:8]])
        return logs

    def export(self, ema: nn.Module, folder: Path) -> None:
        save_checkpoint(folder, ema, ema.config, "prior",
                        extra={"vqgan_encoder": encoder_fingerprint(self.teacher.vqgan)})
