"""Training stage of the latent mask f_M (paper Sec. 3.3): VQGAN, prior and IRN frozen; f_M learns where the
identity-guidance gradient may move the latent, from a perceptual loss, an identity loss and a sparsity
penalty on M_l.

One guided denoiser call per sample, at a noise level drawn along the refinement trajectory (from the IRN
latent z_id + sigma*eps, sigma in [sigma_lo, sigma_hi]): x0' = D(z_t) - s * M_l(z_t) * g, with g the identity
gradient (computed as in sampling, held constant), and the loss taken on G(Q(x0')). Back-propagating through
the whole sampling chain would cost ~2x NFE decoder+recogniser passes per step; one step keeps it trainable
on a CPU while training f_M on exactly the quantity it scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from clrface.checkpoint import save_checkpoint
from clrface.data.datasets import load_face_folder
from clrface.data.degradation import degrade_batch, get_preset
from clrface.data.io import to_model_range
from clrface.diffusion.prior import load_prior
from clrface.identity.facerec import identity_loss, load_facerec, perceptual_distance
from clrface.identity.guidance import LatentMask, MaskConfig, identity_guided
from clrface.identity.irn import load_irn
from clrface.metrics.psnr_ssim import psnr
from clrface.train.engine import Objective, step_indices
from clrface.train.vqgan import save_grid
from clrface.vqgan.model import load_vqgan


@dataclass(frozen=True)
class MaskTrainConfig:
    vqgan: str = "runs/vqgan-128/model"
    prior: str = "runs/prior-128/model"
    irn: str = "runs/irn-128/model"
    train_dir: str | list[str] = "../shared/data/faces128/train"  # a list of folders is concatenated
    val_dir: str = "../shared/data/faces128/val"
    val_count: int = 16
    preset: str = "bfr"
    guidance_scale: float = 10.0  # s in x0' = x0 - s * M_l * g, held fixed while f_M learns where to apply it
    sigma_lo: float = 0.05
    sigma_hi: float = 2.0
    perceptual_weight: float = 1.0
    identity_weight: float = 1.0
    sparsity_weight: float = 0.05
    lr: float = 1e-3
    warmup: int = 20


class MaskStage:
    ema_name = "mask"

    def __init__(self, mask_cfg: MaskConfig, cfg: MaskTrainConfig, seed: int, batch_size: int):
        self.cfg, self.mask_cfg, self.seed, self.batch_size = cfg, mask_cfg, seed, batch_size
        self.vq = load_vqgan(cfg.vqgan)
        self.prior = load_prior(cfg.prior)
        self.irn = load_irn(cfg.irn)
        self.fr = load_facerec()
        size = self.vq.config.resolution
        self.degradation = get_preset(cfg.preset, size)
        self.faces = load_face_folder(cfg.train_dir, size=size)
        self.val_gt = to_model_range(load_face_folder(cfg.val_dir, size=size, limit=cfg.val_count))
        self.val_lq, _ = degrade_batch(self.val_gt, self.degradation, generator=12345)
        self.modules: dict[str, nn.Module] = {"mask": LatentMask(mask_cfg)}

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent -> face, Q straight-through (differentiable)."""
        return self.vq.decode(self.prior.denormalize(z))

    @torch.no_grad()
    def _condition(self, gt: Tensor, x_d: Tensor) -> dict[str, Tensor]:
        x_id = self.irn(x_d)
        return {"gt": gt, "x_d": x_d, "x_id": x_id, "zd": self.prior.normalize(self.vq.encode(x_d)),
                "zid": self.prior.normalize(self.vq.encode(x_id)), "e_id": self.fr.embed(x_id),
                "e_gt": self.fr.embed(gt)}

    def batch(self, micro_step: int, rank: int, world: int) -> dict[str, Tensor]:
        idx = step_indices(micro_step, len(self.faces), self.batch_size, self.seed, rank, world)
        g = torch.Generator().manual_seed(self.seed * 7919 + micro_step * 31 + rank)
        gt = to_model_range(self.faces[idx])
        x_d, _ = degrade_batch(gt, self.degradation, generator=int(torch.randint(0, 2**31, (1,), generator=g)))
        b = self._condition(gt, x_d)
        u = torch.rand(len(idx), generator=g)  # log-uniform sigma along the refinement trajectory
        lo, hi = math.log(self.cfg.sigma_lo), math.log(self.cfg.sigma_hi)
        b["sigma"] = torch.exp(lo + u * (hi - lo))
        b["noise"] = torch.randn(b["zid"].shape, generator=g)
        return b

    def guided_step(self, mask: nn.Module, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(x0' after masked guidance [B,C,h,w], mask [B,1,h,w]); gradients reach only the mask."""
        x = b["zid"] + b["sigma"].view(-1, 1, 1, 1) * b["noise"]
        masks = []

        def mask_fn(z: Tensor, s: Tensor) -> Tensor:
            masks.append(mask(z, s))
            return masks[-1]

        denoise = lambda z, s: self.prior.precond(z, s, b["zd"])  # noqa: E731  (frozen: builds no graph)
        guided = identity_guided(denoise, mask_fn, self.decode, self.fr.embed, b["e_id"], self.cfg.guidance_scale)
        return guided(x, b["sigma"]), masks[0]

    def losses(self, mask: nn.Module, b: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x0, m = self.guided_step(mask, b)
        face = self.decode(x0).float()
        perc = perceptual_distance(self.fr, face, b["gt"]).mean()
        idl = identity_loss(self.fr.embed(face), b["e_gt"]).mean()
        sparse = m.float().mean()
        c = self.cfg
        loss = c.perceptual_weight * perc + c.identity_weight * idl + c.sparsity_weight * sparse
        return loss, {"perc": perc.item(), "id": idl.item(), "mask_mean": sparse.item()}

    def objectives(self, m: dict[str, nn.Module]) -> list[Objective]:
        mask = m["mask"]
        return [Objective("mask", list(mask.parameters()), lambda b, step, cache: self.losses(mask, b),
                          self.cfg.lr, warmup=self.cfg.warmup)]

    @torch.no_grad()
    def validate(self, ema: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        b = self._condition(self.val_gt, self.val_lq)
        g = torch.Generator().manual_seed(0)
        b["sigma"] = torch.full((len(self.val_gt),), 0.5)
        b["noise"] = torch.randn(b["zid"].shape, generator=g)
        x0, m = self.guided_step(ema, b)
        face = self.decode(x0).float()
        unguided = self.decode(self.prior.precond(b["zid"] + 0.5 * b["noise"], b["sigma"], b["zd"])).float()
        mask_img = m[:8].expand(-1, 3, -1, -1).mul(2).sub(1).repeat_interleave(4, -1).repeat_interleave(4, -2)
        save_grid(out_dir / "val" / f"{step:07d}.png",
                  [self.val_lq[:8], b["x_id"][:8], unguided[:8], face[:8], mask_img, self.val_gt[:8]])
        cos = lambda a: (1 - identity_loss(self.fr.embed(a), b["e_gt"])).mean().item()  # noqa: E731
        return {"ids_guided": cos(face), "ids_unguided": cos(unguided),
                "psnr_guided": psnr(face, self.val_gt).mean().item(), "mask_mean": m.mean().item()}

    def export(self, ema: nn.Module, folder: Path) -> None:
        save_checkpoint(folder, ema, self.mask_cfg, "mask")
