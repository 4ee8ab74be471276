"""VQVAE-Rest training stage (paper Table 4's baseline): E'(x^d, x^id) regresses the clean latent E(x) of the
frozen VQGAN (mean squared error on the continuous latent, so that Q picks the clean codes). x^d is degraded
on the fly (bfr), x^id = f_IRN(x^d) from the frozen IRN; the decoder and quantizer are not trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from clrface.checkpoint import save_checkpoint
from clrface.data.datasets import load_face_folder
from clrface.data.degradation import degrade_batch, get_preset
from clrface.data.io import to_model_range
from clrface.identity.irn import load_irn
from clrface.metrics.psnr_ssim import psnr
from clrface.train.engine import Objective, step_indices
from clrface.train.vqgan import save_grid
from clrface.vqgan.model import load_vqgan
from clrface.vqgan.rest import RestEncoder


@dataclass(frozen=True)
class RestTrainConfig:
    vqgan: str = "src/clrface/weights/default/vqgan"
    irn: str = "src/clrface/weights/default/irn"
    train_dir: str | list[str] = "../shared/data/faces128/train"  # a list of folders is concatenated
    val_dir: str = "../shared/data/faces128/val"
    val_count: int = 32
    preset: str = "bfr"
    lr: float = 1e-4
    warmup: int = 50
    hflip: bool = True


class RestStage:
    ema_name = "rest_encoder"

    def __init__(self, cfg: RestTrainConfig, seed: int, batch_size: int):
        self.cfg, self.seed, self.batch_size = cfg, seed, batch_size
        self.vq = load_vqgan(cfg.vqgan)
        self.irn = load_irn(cfg.irn)
        size = self.vq.config.resolution
        self.degradation = get_preset(cfg.preset, size)
        self.faces = load_face_folder(cfg.train_dir, size=size)
        self.modules: dict[str, nn.Module] = {"rest_encoder": RestEncoder.from_vqgan(self.vq)}
        self.val_gt = to_model_range(load_face_folder(cfg.val_dir, size=size, limit=cfg.val_count))
        self.val_lq, _ = degrade_batch(self.val_gt, self.degradation, generator=12345)
        with torch.no_grad():
            self.val_id = self.irn(self.val_lq).float().clamp(-1, 1)

    def batch(self, micro_step: int, rank: int, world: int) -> dict[str, Tensor]:
        idx = step_indices(micro_step, len(self.faces), self.batch_size, self.seed, rank, world)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + micro_step) * 1024 + rank)
        x = to_model_range(self.faces[idx])
        if self.cfg.hflip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x_d, _ = degrade_batch(x, self.degradation, g)
        with torch.no_grad():
            x_id = self.irn(x_d).float().clamp(-1, 1)
            z = self.vq.encode(x)
        return {"lq": x_d, "id": x_id, "z": z}

    def objectives(self, m: dict[str, nn.Module]) -> list[Objective]:
        enc = m["rest_encoder"]

        def loss_fn(batch, step, cache):
            loss = (enc(batch["lq"], batch["id"]) - batch["z"]).square().mean()
            return loss, {"latent_mse": loss.item()}

        return [Objective("rest_encoder", list(enc.parameters()), loss_fn, self.cfg.lr, warmup=self.cfg.warmup)]

    @torch.no_grad()
    def validate(self, ema: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        """PSNR of G(Q(E'(x_d, x_id))) beside those of x_id and of VQVAE-direct G(Q(E(x_d)))."""
        out = self.vq.decode(ema(self.val_lq, self.val_id)).float().clamp(-1, 1)
        direct = self.vq.decode(self.vq.encode(self.val_lq)).float().clamp(-1, 1)
        save_grid(out_dir / "val" / f"{step:07d}.png",
                  [self.val_lq[:8], direct[:8], self.val_id[:8], out[:8], self.val_gt[:8]])
        return {"psnr": psnr(out, self.val_gt).mean().item(), "psnr_irn": psnr(self.val_id, self.val_gt).mean().item(),
                "psnr_direct": psnr(direct, self.val_gt).mean().item()}

    def export(self, ema: nn.Module, folder: Path) -> None:
        save_checkpoint(folder, ema, ema.config, "rest_encoder")
