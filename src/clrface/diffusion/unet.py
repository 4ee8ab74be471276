"""The net F of the conditional latent prior: a small guided-diffusion / EDM-style UNet.

It knows no sigma scalings (those live in ``precond.py``): it maps ``(c_in x, c_noise, cond)`` to F.
The condition z^d = E(x^d) is concatenated to the input channels (paper Sec. 3.2) and never noised.
Written for this project after Dhariwal & Nichol (2021) and Karras et al. (2022, "DhariwalUNet"):
GroupNorm+SiLU ResBlocks with scale-shift noise conditioning, self-attention at low resolutions,
skip connections between matching levels, a zero-initialised output conv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the prior's UNet; YAML maps onto it (``UNetConfig(**cfg["unet"])``).

    Levels run at ``resolution / 2**i`` with ``model_channels * channel_mult[i]`` channels;
    ``attn_resolutions`` lists the spatial sizes that get self-attention (the bottleneck always does).
    """

    latent_channels: int = 3
    cond_channels: int = 3
    resolution: int = 32
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (8,)
    head_channels: int = 32
    dropout: float = 0.0
    embedding: str = "fourier"  # "fourier" (NCSN++ style, random frequencies) or "positional" (transformer style)
    fourier_scale: float = 16.0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        # YAML and JSON give lists; keep the frozen config hashable and asdict-stable.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.embedding not in ("fourier", "positional"):
            raise ValueError(f"embedding must be 'fourier' or 'positional', got {self.embedding!r}")
        if self.resolution % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"resolution {self.resolution} not divisible by 2**{len(self.channel_mult) - 1}")
        for m in self.channel_mult:
            ch = self.model_channels * m
            if ch % self.norm_groups or ch % self.head_channels:
                raise ValueError(f"{ch} channels not divisible by norm_groups/head_channels")

    @property
    def in_channels(self) -> int:
        return self.latent_channels + self.cond_channels


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (Tancik et al. 2020; NCSN++). Frequencies are a saved buffer."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * (2 * math.pi * self.freqs.float()[None])
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of a scalar, frequencies 1 ... 1/max_positions."""

    def __init__(self, channels: int, max_positions: int = 10000):
        super().__init__()
        half = channels // 2
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * self.freqs[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, GN modulated by (1 + scale, shift) from the noise embedding, SiLU-dropout-conv, + skip."""

    def __init__(self, cin: int, cout: int, emb_ch: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity, so the deep net trains from step 0
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-GroupNorm, zero-initialised projection."""

    def __init__(self, ch: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = ch // head_channels
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """F(x_in, c_noise; cond): x_in [B, latent_ch, R, R], c_noise [B], cond [B, cond_ch, R, R] -> [B, latent_ch, R, R].

    The input to the first conv is concat(x_in, cond). The output conv is zero-initialised, so the
    preconditioned denoiser starts as D(x; sigma) = c_skip(sigma) x.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_ch = 4 * mc
        if cfg.embedding == "fourier":
            self.noise_embed: nn.Module = FourierEmbedding(mc, cfg.fourier_scale)
        else:
            self.noise_embed = PositionalEmbedding(mc)
        self.emb_mlp = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_ch, groups, cfg.dropout)

        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        # entries: ResBlock, Attention, or a stride-2 conv; each ResBlock/down pushes a skip
        self.down = nn.ModuleList()
        skips = [mc]
        ch, res = mc, cfg.resolution
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, mc * mult))
                ch = mc * mult
                if res in cfg.attn_resolutions:
                    self.down.append(Attention(ch, cfg.head_channels, groups))
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([block(ch, ch), Attention(ch, cfg.head_channels, groups), block(ch, ch)])
        self.up = nn.ModuleList()  # entries: ResBlock (pops a skip), Attention, or nn.Upsample+conv
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), mc * mult))
                ch = mc * mult
                if res in cfg.attn_resolutions:
                    self.up.append(Attention(ch, cfg.head_channels, groups))
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        assert not skips
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """x: [B, latent_ch, R, R]; c_noise: [B] (or scalar); cond: [B, cond_ch, R, R] -> [B, latent_ch, R, R]."""
        if self.cfg.cond_channels:
            if cond is None:
                raise ValueError("this UNet is conditional: pass cond")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        c_noise = c_noise.reshape(-1).expand(x.shape[0])
        emb = F.silu(self.emb_mlp(self.noise_embed(c_noise)))
        h = self.conv_in(x)
        skips = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            if not isinstance(m, Attention):
                skips.append(h)
        for m in self.mid:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
