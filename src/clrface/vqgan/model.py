"""VQGAN (paper Sec. 3.1): encoder E, quantizer Q, decoder G (f=4, K=8192, d=3) and a patch discriminator."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrface.checkpoint import load_weights, read_config
from clrface.vqgan.quantizer import VectorQuantizer


@dataclass(frozen=True)
class VQGANConfig:
    resolution: int = 128
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3)  # len-1 stride-2 steps: f = 4
    num_res_blocks: int = 1
    decoder_res_blocks: int | None = None  # per level; None: num_res_blocks + 1 (as in taming's VQGAN)
    attn_resolutions: tuple[int, ...] = ()
    latent_channels: int = 3
    codebook_size: int = 8192
    beta: float = 0.25
    codebook_decay: float = 0.99
    dead_code_after: int = 200

    def __post_init__(self) -> None:  # JSON gives lists; keep the config hashable
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                   _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class Attention(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(cin: int, cout: int, n: int, attn: bool) -> tuple[nn.ModuleList, int]:
    layers = []
    for _ in range(n):
        layers.append(ResBlock(cin, cout))
        if attn:
            layers.append(Attention(cout))
        cin = cout
    return nn.ModuleList(layers), cout


class Encoder(nn.Module):
    """x [B,3,S,S] in [-1,1] -> continuous latent E(x) [B,d,S/f,S/f]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, chs[0], 3, padding=1)
        self.levels, self.downs = nn.ModuleList(), nn.ModuleList()
        c, res = chs[0], cfg.resolution
        for i, ch in enumerate(chs):
            level, c = _level(c, ch, cfg.num_res_blocks, res in cfg.attn_resolutions)
            self.levels.append(level)
            if i < len(chs) - 1:
                self.downs.append(Downsample(c))
                res //= 2
        self.mid = nn.Sequential(ResBlock(c, c), Attention(c) if cfg.attn_resolutions else nn.Identity(),
                                 ResBlock(c, c))
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.latent_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            for layer in level:
                h = layer(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return self.out(self.mid(h))


class Decoder(nn.Module):
    """quantized latent [B,d,S/f,S/f] -> image [B,3,S,S] (unbounded; clamp for display)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        n = cfg.num_res_blocks + 1 if cfg.decoder_res_blocks is None else cfg.decoder_res_blocks
        c = chs[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(c, c), Attention(c) if cfg.attn_resolutions else nn.Identity(),
                                 ResBlock(c, c))
        self.levels, self.ups = nn.ModuleList(), nn.ModuleList()
        res = cfg.resolution // cfg.downsample
        for i, ch in enumerate(chs):
            level, c = _level(c, ch, n, res in cfg.attn_resolutions)
            self.levels.append(level)
            if i < len(chs) - 1:
                self.ups.append(Upsample(c))
                res *= 2
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    @property
    def last_layer(self) -> Tensor:
        return self.out[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i, level in enumerate(self.levels):
            for layer in level:
                h = layer(h)
            if i < len(self.ups):
                h = self.ups[i](h)
        return self.out(h)


class VQGAN(nn.Module):
    """E, Q, G. The diffusion prior works on the continuous E(x); `decode` applies Q then G
    (the quantizer is "absorbed" into the decoder, Sec. 3.1), with straight-through gradients."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.beta,
                                         cfg.codebook_decay, cfg.dead_code_after)
        self.decoder = Decoder(cfg)

    def encode(self, x: Tensor) -> Tensor:
        """x [B,3,S,S] in [-1,1] -> E(x) [B,d,S/f,S/f] (continuous, fp32)."""
        return self.encoder(x).float()

    def decode(self, z: Tensor, quantize: bool = True) -> Tensor:
        """G(Q(z)): z [B,d,h,w] continuous -> image [B,3,S,S]; gradients reach z straight through Q."""
        if quantize:
            z = self.quantizer(z)[0]
        return self.decoder(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x -> (reconstruction, commitment loss, code indices)."""
        zq, commit, idx = self.quantizer(self.encoder(x))
        return self.decoder(zq), commit, idx


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) as used by VQGAN (Esser et al. 2021)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            cout = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, cout, 4, stride, 1, bias=False), nn.GroupNorm(min(32, cout // 4), cout),
                     nn.LeakyReLU(0.2)]
            c = cout
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def load_vqgan(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VQGAN:
    """A frozen VQGAN from a checkpoint folder, in eval mode."""
    cfg, _ = read_config(folder, "vqgan", VQGANConfig)
    model = load_weights(folder, VQGAN(cfg))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def encoder_fingerprint(vqgan: VQGAN) -> str:
    """A hash of the encoder's and the codebook's weights (at fp16, as models ship): what a prior's latents depend
    on. A prior records it when trained, so a prior packed with another VQGAN is refused, not run on latents it
    never saw; a decoder fine-tune keeps it."""
    h = hashlib.sha256()
    for name, v in sorted(vqgan.state_dict().items()):
        if not name.startswith("decoder."):
            h.update(name.encode())
            h.update(v.detach().cpu().to(torch.float16 if v.is_floating_point() else v.dtype).numpy().tobytes())
    return h.hexdigest()[:16]
