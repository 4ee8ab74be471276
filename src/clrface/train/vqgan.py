"""VQGAN training stage (paper Eq. 2): a step for G (E, Q, G) and one for the patch discriminator D."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch import Tensor, nn

from clrface.checkpoint import load_weights, read_config, save_checkpoint
from clrface.data.datasets import load_face_folder
from clrface.data.io import to_model_range, to_uint8
from clrface.metrics.noref import laplacian_variance
from clrface.metrics.psnr_ssim import psnr
from clrface.train.engine import Objective, step_indices, train_device
from clrface.vqgan.losses import adaptive_weight, detail_energy_l1, generator_adv_loss, gradient_l1, hinge_d_loss
from clrface.vqgan.model import VQGAN, PatchDiscriminator, VQGANConfig
from clrface.vqgan.quantizer import code_usage


@dataclass(frozen=True)
class VQGANTrainConfig:
    train_dir: str | list[str] = "../shared/data/faces128/train"  # a list of folders is concatenated
    val_dir: str = "../shared/data/faces128/val"
    val_count: int = 64
    lr: float = 3e-4
    warmup: int = 200
    l1_weight: float = 1.0
    grad_l1_weight: float = 0.5
    detail_energy_weight: float = 0.0  # vqgan/losses.py detail_energy_l1: texture strength, not position
    detail_window: int = 8
    # Perceptual term of Eq. 2. Offline there are no VGG/LPIPS weights, so the stated substitute is a
    # multi-layer feature distance of the ported dlib face-recognition ResNet (identity/facerec.py).
    perceptual: str = "none"  # "none" | "facerec"
    perceptual_weight: float = 0.0
    adv_weight: float = 0.0  # 0 disables the discriminator
    disc_start: int = 0
    disc_lr: float = 2e-4
    disc_channels: int = 32
    disc_layers: int = 2
    init_from: str | None = None  # a vqgan checkpoint folder to start from
    train_decoder_only: bool = False  # keeps E and the codebook (the prior's latent space) fixed
    hflip: bool = True


def save_grid(path: Path, rows: list[Tensor]) -> None:
    """Each row a batch [B,3,H,W] in [-1,1]; saves rows side by side per image (one image per line)."""
    cols = [to_uint8(r.clamp(-1, 1)) for r in rows]  # [B,H,W,3] each
    lines = [torch.cat([c[i] for c in cols], dim=1) for i in range(cols[0].shape[0])]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(torch.cat(lines, dim=0).numpy()).save(path)


class VQGANStage:
    ema_name = "vqgan"

    def __init__(self, model_cfg: VQGANConfig, cfg: VQGANTrainConfig, seed: int, batch_size: int,
                 perceptual_fn: Callable[[Tensor, Tensor], Tensor] | None = None):
        self.model_cfg, self.cfg, self.seed, self.batch_size = model_cfg, cfg, seed, batch_size
        vq = VQGAN(model_cfg)
        if cfg.init_from:
            read_config(cfg.init_from, "vqgan", VQGANConfig)
            load_weights(cfg.init_from, vq)
        if cfg.train_decoder_only:
            vq.encoder.requires_grad_(False)
        self.modules: dict[str, nn.Module] = {"vqgan": vq}
        if cfg.adv_weight > 0:
            self.modules["disc"] = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers)
        self.perceptual_fn = perceptual_fn
        # uint8 where training runs: on a GPU a batch is then gathered without a host-to-device copy
        self.train_faces = load_face_folder(cfg.train_dir, size=model_cfg.resolution).to(train_device())
        self.val_faces = to_model_range(load_face_folder(cfg.val_dir, size=model_cfg.resolution, limit=cfg.val_count))

    def batch(self, micro_step: int, rank: int, world: int) -> dict[str, Tensor]:
        idx = step_indices(micro_step, len(self.train_faces), self.batch_size, self.seed, rank, world)
        x = to_model_range(self.train_faces[idx])
        if self.cfg.hflip:
            flip = torch.rand(len(idx), generator=torch.Generator().manual_seed(micro_step)) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        return {"gt": x}

    def objectives(self, m: dict[str, nn.Module]) -> list[Objective]:
        cfg, vq = self.cfg, m["vqgan"]
        inner = vq.module if hasattr(vq, "module") else vq
        if cfg.train_decoder_only:
            inner.quantizer.eval()  # freezes the EMA codebook as well

        def g_loss(batch: dict[str, Tensor], step: int, cache: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
            x = batch["gt"]
            if cfg.train_decoder_only:
                with torch.no_grad():
                    zq, commit, idx = inner.quantizer(inner.encoder(x))
                rec = inner.decoder(zq)
            else:
                rec, commit, idx = vq(x)
            rec = rec.float()
            cache["rec"] = rec
            l1 = (rec - x).abs().mean()
            loss = cfg.l1_weight * l1 + commit
            logs = {"l1": l1.item(), "commit": commit.item()}
            if cfg.grad_l1_weight:
                g = gradient_l1(rec, x)
                loss = loss + cfg.grad_l1_weight * g
                logs["grad_l1"] = g.item()
            if cfg.detail_energy_weight:
                e = detail_energy_l1(rec, x, cfg.detail_window)
                loss = loss + cfg.detail_energy_weight * e
                logs["detail"] = e.item()
            if cfg.perceptual_weight and self.perceptual_fn is not None:
                p = self.perceptual_fn(rec, x).mean()
                loss = loss + cfg.perceptual_weight * p
                logs["perc"] = p.item()
            if cfg.adv_weight and step >= cfg.disc_start:
                adv = generator_adv_loss(m["disc"](rec))
                w = adaptive_weight(loss, adv, inner.decoder.last_layer)
                loss = loss + cfg.adv_weight * w * adv
                logs.update(adv=adv.item(), adv_w=w.item())
            logs["codes"] = float(code_usage(idx, self.model_cfg.codebook_size)[0])
            return loss, logs

        params = [p for p in vq.parameters() if p.requires_grad]
        objs = [Objective("G", params, g_loss, cfg.lr, warmup=cfg.warmup)]
        if cfg.adv_weight:
            disc = m["disc"]

            def d_loss(batch: dict[str, Tensor], step: int, cache: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
                real, fake = batch["gt"], cache["rec"].detach()
                loss = hinge_d_loss(disc(real), disc(fake))
                return loss, {"d_loss": loss.item()}

            objs.append(Objective("D", list(disc.parameters()), d_loss, cfg.disc_lr, betas=(0.5, 0.9),
                                  start_step=cfg.disc_start, warmup=100))
        return objs

    @torch.no_grad()
    def validate(self, ema: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        recs, idxs = [], []
        dev = next(ema.parameters()).device
        for x in self.val_faces.split(16):
            rec, _, idx = ema(x.to(dev))
            recs.append(rec.float().cpu())
            idxs.append(idx.cpu())
        rec = torch.cat(recs)
        save_grid(out_dir / "val" / f"{step:07d}.png", [self.val_faces[:8], rec[:8]])
        used, ppl = code_usage(torch.cat(idxs), self.model_cfg.codebook_size)
        # the decoder fine-tune's target: detail kept (share of the GT's Laplacian variance) at a high PSNR
        sharp = laplacian_variance(rec).mean() / laplacian_variance(self.val_faces).mean()
        return {"psnr": psnr(rec, self.val_faces).mean().item(), "lapvar_ratio": sharp.item(),
                "codes_used": used, "perplexity": ppl}

    def export(self, ema: nn.Module, folder: Path) -> None:
        save_checkpoint(folder, ema, self.model_cfg, "vqgan")
