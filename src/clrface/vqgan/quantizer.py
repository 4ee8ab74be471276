"""Vector quantizer Q of the VQGAN (paper Sec. 3.1, Eq. 2): nearest code by squared distance,
straight-through gradients, EMA codebook updates with dead-code restarts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def nearest_code(z: Tensor, codebook: Tensor, chunk: int = 4096) -> Tensor:
    """Index of the nearest code for each row. z: [N, d], codebook: [K, d] -> [N] (long).

    Kept in fp32 and chunked: with d=3 codes sit close together, so bf16 distances pick wrong
    codes, and a full N x K distance matrix at 512 px is several GB.
    """
    z = z.float()
    cb = codebook.float()
    cb_sq = cb.pow(2).sum(1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for i in range(0, z.shape[0], chunk):
        zc = z[i : i + chunk]
        d = cb_sq[None, :] - 2.0 * zc @ cb.t()  # |z|^2 is constant per row
        out[i : i + chunk] = d.argmin(1)
    return out


def straight_through(z: Tensor, zq: Tensor) -> Tensor:
    """Forward value zq, gradient of identity w.r.t. z (van den Oord et al. 2017)."""
    return z + (zq - z).detach()


class VectorQuantizer(nn.Module):
    """Codebook of K codes of dimension d, learned by exponential moving averages of the assigned
    encoder outputs (the EMA form of Eq. 2's codebook term, van den Oord et al. 2017, App. A.1);
    the commitment term beta*||z - sg[zq]||^2 is returned as a loss for the encoder."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, decay: float = 0.99,
                 dead_after: int = 200, eps: float = 1e-5):
        super().__init__()
        self.num_codes, self.dim, self.beta, self.decay, self.eps = num_codes, dim, beta, decay, eps
        self.dead_after = dead_after
        self.register_buffer("codebook", torch.randn(num_codes, dim) * 0.5)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", self.codebook.clone())
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init_from(self, flat: Tensor) -> None:
        # Codes drawn from real encoder outputs cover the latent distribution from the first step.
        idx = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
        self.codebook.copy_(flat[idx] + 1e-3 * torch.randn_like(flat[idx]))
        self.embed_sum.copy_(self.codebook)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, idx: Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.num_codes).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.embed_sum / size[:, None])
        # Dead codes (unused for `dead_after` steps) restart at random current encoder outputs.
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_unused >= self.dead_after).nonzero().flatten()
        if dead.numel():
            pick = flat[torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)]
            self.codebook[dead] = pick
            self.embed_sum[dead] = pick
            self.cluster_size[dead] = 1.0
            self.steps_unused[dead] = 0

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z: [B, d, h, w] -> (zq straight-through [B,d,h,w], commitment loss [], indices [B,h,w])."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            if self.training and not bool(self.initialized):
                self._init_from(flat.detach())
            idx = nearest_code(flat.detach(), self.codebook)
            if self.training:
                self._ema_update(flat.detach(), idx)
            zq = self.codebook[idx].view(b, h, w, d).permute(0, 3, 1, 2)
            commit = self.beta * F.mse_loss(z, zq.detach())
            return straight_through(z, zq), commit, idx.view(b, h, w)

    def lookup(self, idx: Tensor) -> Tensor:
        """indices [B,h,w] -> codes [B,d,h,w]."""
        return self.codebook[idx].permute(0, 3, 1, 2)


def code_usage(idx: Tensor, num_codes: int) -> tuple[int, float]:
    """(number of distinct codes used, perplexity of the code histogram) for indices of any shape."""
    counts = torch.bincount(idx.flatten(), minlength=num_codes).float()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    return int((counts > 0).sum()), float(perplexity)
