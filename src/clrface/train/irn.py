"""IRN training stage (paper Sec. 3.3, Eq. 11): x_d -> f_IRN(x_d) trained against the ground truth x with

    L_IRN = α · |f_IRN(x_d) - x|_1 + (1 - cos(φ(f_IRN(x_d)), φ(x)))

where φ is the frozen face-recognition network (here the ported dlib ResNet, ``identity/facerec.py``).
x_d is degraded on the fly by the bfr preset at the model size, from a generator seeded by the micro-step,
so every batch (faces, flips and degradations) is a pure function of the step and resume is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clrface.checkpoint import load_weights, save_checkpoint
from clrface.data.datasets import load_face_folder
from clrface.data.degradation import degrade_batch, get_preset
from clrface.data.io import to_model_range
from clrface.data.realistic import RealisticConfig, degrade_realistic
from clrface.errors import ClrfaceError
from clrface.faces.detail import band_split
from clrface.identity.facerec import (
    DlibFaceRecognizer,
    feature_distance,
    identity_loss,
    jittered_affines,
    perceptual_distance,
)
from clrface.identity.irn import IRN, IRNConfig
from clrface.metrics.ids import IDS_BLUR_SIGMA, low_pass
from clrface.metrics.psnr_ssim import psnr
from clrface.train.engine import ChunkedBatches, Objective, step_indices, train_device
from clrface.train.vqgan import save_grid
from clrface.vqgan.losses import adaptive_weight, detail_energy_l1, generator_adv_loss, hinge_d_loss
from clrface.vqgan.model import PatchDiscriminator


@dataclass(frozen=True)
class IRNTrainConfig:
    train_dir: str | list[str] = "../shared/data/faces128/train"  # a list of folders is concatenated
    val_dir: str = "../shared/data/faces128/val"
    val_count: int = 64
    val_seed: int = 1234  # the fixed degradation of the validation faces
    degradation: str = "bfr"  # preset of data/degradation.py, scaled to the model size
    size: int = 128
    # α of Eq. 11. The paper gives no value we could find; 1.0 puts both terms on the same scale at the
    # start (L1 of the bfr input ≈ 0.05-0.1 in [-1,1] units, 1 - cos of the dlib descriptor ≈ 0.05-0.2).
    alpha: float = 1.0
    # 0 trains the "IRN" row of the ablation (L1 only, no recognition network in the loop).
    identity_weight: float = 1.0
    lr: float = 2e-4
    warmup: int = 100
    hflip: bool = True
    # An IRN checkpoint to fine-tune (e.g. the shipped default for the extreme-SR or colorization models);
    # a --resume train_state overrides it.
    init_from: str | None = None
    # > 0: add a PatchGAN hinge loss (as the VQGAN's stage B), weighted adaptively against Eq. 11 at the IRN's
    # last layer; L1 + identity alone regress to the mean and smooth faces.
    adv_weight: float = 0.0
    disc_lr: float = 1e-4
    disc_channels: int = 64
    disc_layers: int = 3
    # Steps at the start in which only the discriminator trains, against the outputs of the initial IRN, so that a
    # run continued from a trained IRN is not pushed by a random critic at first (docs/RESULTS.md, "CPU runs: the
    # IRN continued after a discriminator warm-up").
    disc_warmup: int = 0
    # > 0: add the facerec-perceptual distance (multi-layer features of the frozen recognizer, our offline
    # LPIPS substitute) to Eq. 11; the features of the identity term are reused, so it costs little
    perceptual_weight: float = 0.0
    # None: the paper's single `degradation` round; a RealisticConfig (a dict in YAML) adds a second round,
    # faded colours, grain and grayscale on top of it (data/realistic.py)
    realistic: RealisticConfig | None = None
    # Batches of this many consecutive micro-steps are gathered and degraded together (each chunk a pure
    # function of its index, so resume stays exact): on a GPU the degradation is a few launches per low-res
    # size, whatever the batch, so one call for 8 steps costs about what one step's did.
    degrade_steps: int = 1
    # > 0: the identity and perceptual terms see the output and the GT through the same randomly shifted and
    # scaled chip, per sample (facerec.jittered_affines; a share of the image), so that a pattern tied to one
    # sampling grid of the recogniser does not pay. At x8 it measured no better than without (docs/RESULTS.md).
    id_jitter: float = 0.0
    # > 0: the identity and perceptual terms see the output and the GT through the same Gaussian of this std (px
    # per 128 px; metrics.ids.low_pass), so identity must come from the coarser bands: trained and measured
    # against one recogniser, an IRN otherwise also gains IDS from finest-octave patterns (a grid, colour
    # fringes) that the recogniser reads as identity and a person does not (docs/RESULTS.md, "Identity through a
    # blur").
    id_blur: float = 0.0
    # > 0: plus this weight x vqgan/losses.py detail_energy_l1 (the strength of the Laplacian in detail_window-px
    # blocks, not its position): without a PatchGAN term the L1 and identity terms alone pay the IRN for a
    # smoother face (docs/RESULTS.md, "CPU runs: the IRN without its PatchGAN term").
    detail_energy_weight: float = 0.0
    detail_window: int = 4
    # > 0: plus this weight x the L1 distance between the upper ``anchor_octaves`` octaves (faces.detail.band_split)
    # of the output and of the frozen ``init_from`` IRN's output for the same input. An L1 term weighted above the
    # reconstruction's pins that band to the start's texture (the shipped IRN's was drawn by its PatchGAN term),
    # which the ground truth's L1 would smooth, while the identity terms move the coarser bands. It kept the
    # perceptual distance but not FID (docs/RESULTS.md, "CPU runs: keeping the IRN's texture while it gains identity").
    anchor_weight: float = 0.0
    anchor_octaves: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.realistic, dict):
            object.__setattr__(self, "realistic", RealisticConfig(**self.realistic))
        if self.anchor_weight > 0 and not self.init_from:
            raise ClrfaceError("stage.anchor_weight needs stage.init_from: the IRN whose texture is kept")


def anchor_l1(out: Tensor, anchor: Tensor, octaves: int) -> Tensor:
    """Mean L1 distance between the upper ``octaves`` octaves of ``out`` and of ``anchor``, both [B,3,S,S]."""
    size = out.shape[-1] >> octaves
    return (band_split(out, size)[1] - band_split(anchor, size)[1]).abs().mean()


def descriptor(fr: DlibFaceRecognizer, x: Tensor) -> Tensor:
    """Unnormalised identity descriptor [B,D] in fp32 (normalising in bf16 would quantise the cosine)."""
    return fr.descriptor_from_chip(fr.chip(x)).float()


@torch.no_grad()
def descriptors(fr: DlibFaceRecognizer, x: Tensor, blur: float = 0.0, chunk: int = 16) -> Tensor:
    """Descriptors [N,D] on the CPU of faces [N,3,S,S] seen through ``low_pass(., blur)``, ``chunk`` at a time on
    the recogniser's device."""
    dev = next(fr.buffers()).device
    return torch.cat([descriptor(fr, low_pass(b.to(dev), blur)).cpu() for b in x.split(chunk)])


def irn_loss(x_id: Tensor, gt: Tensor, fr: DlibFaceRecognizer, alpha: float,
             e_gt: Tensor | None = None, identity_weight: float = 1.0,
             perceptual_weight: float = 0.0, jitter: float = 0.0, blur: float = 0.0
             ) -> tuple[Tensor, dict[str, float]]:
    """Eq. 11, averaged over the batch, plus ``perceptual_weight`` x the facerec-perceptual distance.
    x_id, gt: [B,3,H,W] in [-1,1]; e_gt: optional target descriptors [B,D] (computed here without grad when
    absent; ignored with ``jitter`` or ``blur``, whose view of the GT the target must share). ``blur``: both faces
    go to the recogniser through ``low_pass(., blur)``. Gradients reach x_id through the frozen ``fr``. With both
    weights 0 the recognition network is skipped entirely (L1 only)."""
    l1 = (x_id.float() - gt.float()).abs().mean()
    if identity_weight == 0 and perceptual_weight == 0:
        return alpha * l1, {"l1": l1.item()}
    aff = jittered_affines(fr.ffhq_affine, len(x_id), jitter) if jitter > 0 else None
    e_gt = None if aff is not None or blur > 0 else e_gt
    f_out = fr.features(low_pass(x_id, blur), aff)
    loss, logs = alpha * l1, {"l1": l1.item()}
    f_gt = None
    if perceptual_weight > 0 or e_gt is None:
        with torch.no_grad():
            f_gt = fr.features(low_pass(gt, blur), aff)
    if identity_weight > 0:
        e_gt = fr.net.head(f_gt[-1]).float() if e_gt is None else e_gt
        idl = identity_loss(fr.net.head(f_out[-1]).float(), e_gt.detach()).mean()
        loss, logs["id"] = loss + identity_weight * idl, idl.item()
    if perceptual_weight > 0:
        perc = feature_distance(f_out, f_gt).float().mean()
        loss, logs["perc"] = loss + perceptual_weight * perc, perc.item()
    return loss, logs


class IRNStage:
    ema_name = "irn"

    def __init__(self, model_cfg: IRNConfig, cfg: IRNTrainConfig, seed: int, batch_size: int,
                 facerec: DlibFaceRecognizer):
        self.model_cfg, self.cfg, self.seed, self.batch_size = model_cfg, cfg, seed, batch_size
        with torch.random.fork_rng(devices=[]):  # the engine seeds only after stages exist: seed the init here
            torch.manual_seed(seed)
            irn = IRN(model_cfg)
        if cfg.init_from:
            load_weights(cfg.init_from, irn)
        self.modules: dict[str, nn.Module] = {"irn": irn}
        # the start as loaded above, frozen and out of `modules` like the recogniser (a resume restores only `irn`)
        self.anchor = copy.deepcopy(irn).eval().requires_grad_(False) if cfg.anchor_weight > 0 else None
        if cfg.adv_weight > 0:
            self.modules["disc"] = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers)
        self.facerec = facerec.eval().requires_grad_(False)  # frozen; kept out of `modules` (not trained)
        self.degradation = get_preset(cfg.degradation, size=cfg.size)
        self.batches = ChunkedBatches(self._degraded_chunk, cfg.degrade_steps, batch_size)
        # uint8 where training runs: on a GPU, batches are then gathered and degraded without leaving it
        self.train_faces = load_face_folder(cfg.train_dir, size=cfg.size).to(train_device())
        self.val_gt = to_model_range(load_face_folder(cfg.val_dir, size=cfg.size, limit=cfg.val_count))
        self.val_lq, _ = degrade_batch(self.val_gt, self.degradation, torch.Generator().manual_seed(cfg.val_seed))
        self.val_e_gt = descriptors(self.facerec, self.val_gt)
        self.val_cos_in = (1 - identity_loss(descriptors(self.facerec, self.val_lq), self.val_e_gt)).mean().item()
        self.val_e_gt_blur = descriptors(self.facerec, self.val_gt, IDS_BLUR_SIGMA)
        self.val_cos_blur_in = (1 - identity_loss(descriptors(self.facerec, self.val_lq, IDS_BLUR_SIGMA),
                                                  self.val_e_gt_blur)).mean().item()
        self.val_psnr_in = psnr(self.val_lq, self.val_gt).mean().item()

    def batch(self, micro_step: int, rank: int, world: int) -> dict[str, Tensor]:
        return self.batches(micro_step, rank, world)

    def _degraded_chunk(self, chunk: int, rank: int, world: int) -> dict[str, Tensor]:
        """gt and lq of the degrade_steps micro-steps of ``chunk``, stacked in step order."""
        k = self.cfg.degrade_steps
        idx = torch.cat([step_indices(chunk * k + i, len(self.train_faces), self.batch_size, self.seed, rank, world)
                         for i in range(k)])
        x = to_model_range(self.train_faces[idx])
        # one generator per (seed, chunk, process): flips and degradations replay exactly on resume
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + chunk) * 1024 + rank)
        if self.cfg.hflip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        if self.cfg.realistic is None:
            x_d, _ = degrade_batch(x, self.degradation, g)
        else:
            x_d, x = degrade_realistic(x, self.degradation, self.cfg.realistic, g)
        return {"gt": x, "lq": x_d}

    def objectives(self, m: dict[str, nn.Module]) -> list[Objective]:
        irn, cfg = m["irn"], self.cfg

        def loss_fn(batch: dict[str, Tensor], step: int, cache: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
            dev = next(irn.parameters()).device
            if next(self.facerec.buffers()).device != dev:
                self.facerec.to(dev)
            gt, lq = batch["gt"], batch["lq"]  # the engine puts batches on the training device
            out = irn(lq)
            loss, logs = irn_loss(out, gt, self.facerec, cfg.alpha, identity_weight=cfg.identity_weight,
                                  perceptual_weight=cfg.perceptual_weight, jitter=cfg.id_jitter,
                                  blur=cfg.id_blur)
            if cfg.detail_energy_weight > 0:
                e = detail_energy_l1(out, gt, cfg.detail_window)
                loss, logs["detail"] = loss + cfg.detail_energy_weight * e, e.item()
            if self.anchor is not None:
                with torch.no_grad():
                    start = self.anchor.to(dev)(lq)
                a = anchor_l1(out, start, cfg.anchor_octaves)
                loss, logs["anchor"] = loss + cfg.anchor_weight * a, a.item()
            if cfg.adv_weight > 0:
                cache["out"] = out
                adv = generator_adv_loss(m["disc"](out))
                inner = irn.module if hasattr(irn, "module") else irn
                w = adaptive_weight(loss, adv, inner.tail.weight)
                loss = loss + cfg.adv_weight * w * adv
                logs.update(adv=adv.item(), adv_w=w.item())
            return loss, logs

        objs = [Objective("irn", list(irn.parameters()), loss_fn, cfg.lr, warmup=cfg.warmup,
                          start_step=cfg.disc_warmup)]
        if cfg.adv_weight > 0:
            disc = m["disc"]

            def d_loss(batch: dict[str, Tensor], step: int, cache: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
                if "out" not in cache:  # the IRN did not step (disc_warmup)
                    with torch.no_grad():
                        cache["out"] = irn(batch["lq"])
                loss = hinge_d_loss(disc(batch["gt"]), disc(cache["out"].detach()))
                return loss, {"d_loss": loss.item()}

            objs.append(Objective("disc", list(disc.parameters()), d_loss, cfg.disc_lr, betas=(0.5, 0.9), warmup=20))
        return objs

    @torch.no_grad()
    def validate(self, ema: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        """PSNR, mean identity cosine and facerec-perceptual distance to the GT of the output, beside the
        same numbers of the input (the paper's bfr validation faces, whatever the training mix)."""
        dev = next(ema.parameters()).device
        self.facerec.to(dev)
        outs = [ema(x.to(dev)).float() for x in self.val_lq.split(16)]
        out = torch.cat(outs).cpu()
        e_out, e_blur = descriptors(self.facerec, out), descriptors(self.facerec, out, IDS_BLUR_SIGMA)
        perc = torch.cat([perceptual_distance(self.facerec, o.to(dev), t.to(dev)).float().cpu()
                          for o, t in zip(out.split(16), self.val_gt.split(16))])
        save_grid(out_dir / "val" / f"{step:07d}.png", [self.val_lq[:8], out[:8], self.val_gt[:8]])
        return {
            "perc": perc.mean().item(),
            "psnr": psnr(out, self.val_gt).mean().item(),
            "psnr_in": self.val_psnr_in,
            "id_cos": (1 - identity_loss(e_out, self.val_e_gt)).mean().item(),
            "id_cos_in": self.val_cos_in,
            "id_cos_blur": (1 - identity_loss(e_blur, self.val_e_gt_blur)).mean().item(),
            "id_cos_blur_in": self.val_cos_blur_in,
        }

    def export(self, ema: nn.Module, folder: Path) -> None:
        save_checkpoint(folder, ema, self.model_cfg, "irn")
