"""Identity Recovery Network f_IRN (paper Sec. 3.3): degraded face x_d -> x_id, a face whose identity
embedding is close to the ground truth's. Its output gives the diffusion's start latent E(x_id) and the
identity-guidance target e_id = facerec(x_id). Trained with Eq. 11 (see ``clrface.train.irn``).

Two bodies, both predicting a residual on top of the input (the last layer is zero-initialised, so an
untrained IRN is the identity map):

* ``"conv"`` (default): a small U-Net (128 -> 64 -> 32 px, plain residual blocks without normalisation,
  as usual for restoration nets) sized for CPU training. The 32 px level gives a receptive field of
  well over 64 px, enough for the heaviest bfr degradation at 128 px (x8 down, i.e. a 16 px face).
* ``"swin"``: SwinIR-style (the paper's choice): shallow 3x3 conv, residual Swin transformer blocks
  (RSTB: window self-attention with relative position bias, every second block with windows shifted by
  half a window, then a 3x3 conv and a skip), a conv after the body with a long skip, and a conv
  reconstruction; the restoration (upscale 1) variant of Liang et al., "SwinIR: Image Restoration Using
  Swin Transformer", ICCVW 2021, which in turn follows Liu et al., "Swin Transformer", ICCV 2021.
  Written from the two papers' descriptions; no code was copied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrface.checkpoint import load_weights, read_config

BODIES = ("conv", "swin")


@dataclass(frozen=True)
class IRNConfig:
    body: str = "conv"  # "conv" | "swin"
    in_channels: int = 3
    # conv body: channels per U-Net level (each level halves the size) and residual blocks per level on the
    # way down (the bottom level's count is its whole depth); one block per level on the way up
    channels: tuple[int, ...] = (32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 4)
    # conv body: how a level's features are doubled in size on the way up. "nearest" copies each value into a
    # 2x2 block, which two levels turn into a 4 px grid where the input holds little detail; "bilinear" draws no
    # grid. The weights are the same tensors, so a trained IRN can be fine-tuned with the other mode.
    upsample: str = "nearest"
    # swin body (SwinIR "lightweight"-like defaults)
    embed_dim: int = 60
    depths: tuple[int, ...] = (6, 6, 6, 6)  # Swin blocks per RSTB
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        for f in ("channels", "blocks", "depths", "num_heads"):  # JSON/YAML hand lists
            object.__setattr__(self, f, tuple(getattr(self, f)))
        if self.upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {self.upsample!r}")
        if self.body not in BODIES:
            raise ValueError(f"body must be one of {BODIES}, got {self.body!r}")
        if len(self.channels) != len(self.blocks) or not self.channels:
            raise ValueError(f"channels {self.channels} and blocks {self.blocks} need the same non-zero length")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} need the same length")
        if any(self.embed_dim % h for h in self.num_heads):
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by every num_heads {self.num_heads}")


# ------------------------------------------------------------------------------------------ conv body


class _ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        # a small second conv keeps a deep stack of unnormalised residual blocks near the identity at init
        nn.init.zeros_(self.conv2.bias)
        self.conv2.weight.data.mul_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class ConvBody(nn.Module):
    """U-Net on [B,C,H,W] (H, W divisible by 2**(levels-1)) -> features [B,channels[0],H,W]."""

    def __init__(self, cfg: IRNConfig):
        super().__init__()
        ch, nb = cfg.channels, cfg.blocks
        self.head = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.enc = nn.ModuleList(nn.Sequential(*[_ResBlock(c) for _ in range(n)]) for c, n in zip(ch, nb))
        self.down = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1) for i in range(len(ch) - 1))
        self.up = nn.ModuleList(nn.Conv2d(ch[i + 1], ch[i], 3, padding=1) for i in range(len(ch) - 1))
        self.dec = nn.ModuleList(_ResBlock(ch[i]) for i in range(len(ch) - 1))
        self.upsample = cfg.upsample

    def forward(self, x: Tensor) -> Tensor:
        h = self.head(x)
        skips = []
        for i, blocks in enumerate(self.enc):
            h = blocks(h)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)
        for i in reversed(range(len(self.up))):
            h = self.up[i](F.interpolate(h, scale_factor=2.0, mode=self.upsample)) + skips[i]
            h = self.dec[i](h)
        return F.silu(h)


# ------------------------------------------------------------------------------------------ swin body


def window_partition(x: Tensor, w: int) -> Tensor:
    """[B,H,W,C] -> [B*nW, w*w, C] (windows in row-major order)."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_reverse(win: Tensor, w: int, h: int, wd: int) -> Tensor:
    """[B*nW, w*w, C] -> [B,H,W,C]; inverse of ``window_partition``."""
    c = win.shape[-1]
    x = win.view(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, wd, c)


def relative_position_index(w: int) -> Tensor:
    """[w*w, w*w] index into a ((2w-1)^2)-entry bias table for every (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # [2, w*w]
    rel = (coords[:, :, None] - coords[:, None, :]) + (w - 1)  # [2, N, N], each in [0, 2w-2]
    return rel[0] * (2 * w - 1) + rel[1]


def shift_attention_mask(h: int, wd: int, w: int, shift: int) -> Tensor:
    """[nW, w*w, w*w] additive mask (0 / -100) of shifted windows: after the cyclic shift a window may hold
    pixels from up to four image regions that were not neighbours; they must not attend to each other."""
    region = torch.zeros(1, h, wd, 1)
    cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            region[:, hs, ws, :] = label
            label += 1
    win = window_partition(region, w).squeeze(-1)  # [nW, w*w]
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        self.register_buffer("rel_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: [B*nW, N, C]; mask: [nW, N, N] or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[self.rel_index.view(-1)].view(n, n, -1).permute(2, 0, 1)  # [heads, N, N]
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.to(q.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None].to(attn.dtype)
            attn = attn.view(bw, self.heads, n, n)
        out = attn.softmax(-1) @ v  # [B*nW, heads, N, d]
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self._masks: dict[tuple[int, int, str], Tensor] = {}

    def _mask(self, h: int, w: int, device: torch.device) -> Tensor | None:
        if not self.shift:
            return None
        key = (h, w, str(device))
        if key not in self._masks:  # depends only on the size: built once per size, not per step
            self._masks[key] = shift_attention_mask(h, w, self.window, self.shift).to(device)
        return self._masks[key]

    def forward(self, x: Tensor) -> Tensor:
        """x: [B,H,W,C] with H, W multiples of the window."""
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), self._mask(h, w, x.device))
        y = window_reverse(y, self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class RSTB(nn.Module):
    """Residual Swin transformer block: Swin blocks (alternately shifted), a 3x3 conv, a skip."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)
        )
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B,C,H,W]."""
        y = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            y = blk(y)
        return x + self.conv(y.permute(0, 3, 1, 2))


class SwinBody(nn.Module):
    """SwinIR feature extraction: shallow conv, RSTBs, conv after the body, long skip."""

    def __init__(self, cfg: IRNConfig):
        super().__init__()
        d, self.window = cfg.embed_dim, cfg.window_size
        self.head = nn.Conv2d(cfg.in_channels, d, 3, padding=1)
        self.norm_in = nn.LayerNorm(d)
        self.groups = nn.ModuleList(
            RSTB(d, n, h, cfg.window_size, cfg.mlp_ratio) for n, h in zip(cfg.depths, cfg.num_heads)
        )
        self.norm_out = nn.LayerNorm(d)
        self.conv_after = nn.Conv2d(d, d, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.window, (-w) % self.window
        if ph or pw:  # reflect-pad to whole windows, as SwinIR does, and crop at the end
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        shallow = self.head(x)
        y = self.norm_in(shallow.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for g in self.groups:
            y = g(y)
        y = self.norm_out(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return (shallow + self.conv_after(y))[..., :h, :w]


# ------------------------------------------------------------------------------------------------ IRN


class IRN(nn.Module):
    """f_IRN: x_d [B,3,H,W] in [-1,1] -> x_id = x_d + residual, same shape (paper Sec. 3.3)."""

    def __init__(self, cfg: IRNConfig = IRNConfig()):
        super().__init__()
        self.cfg = cfg
        self.body = ConvBody(cfg) if cfg.body == "conv" else SwinBody(cfg)
        feat = cfg.channels[0] if cfg.body == "conv" else cfg.embed_dim
        self.tail = nn.Conv2d(feat, cfg.in_channels, 3, padding=1)
        # zero tail: an untrained IRN returns its input, the best guess before any training
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.body == "conv":
            k = 2 ** (len(self.cfg.channels) - 1)
            if x.shape[-2] % k or x.shape[-1] % k:
                raise ValueError(f"conv IRN needs H and W divisible by {k}, got {tuple(x.shape[-2:])}")
        return x + self.tail(self.body(x)).to(x.dtype)


def deepened(model: IRN, blocks: tuple[int, ...]) -> IRN:
    """A conv IRN with more residual blocks per level that computes exactly what ``model`` does: its weights, plus
    new blocks appended to each level whose second conv is zero (an identity map until trained). Grows a trained
    IRN so that a larger one can be compared with it at equal starting quality (capacity per core-hour)."""
    cfg = model.cfg
    if cfg.body != "conv" or len(blocks) != len(cfg.blocks) or any(n < o for n, o in zip(blocks, cfg.blocks)):
        raise ValueError(f"need a conv IRN and at least its blocks per level {cfg.blocks}, got {tuple(blocks)}")
    grown = IRN(replace(cfg, blocks=tuple(blocks)))
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    for name in missing:  # only the new blocks' tensors: their residual branch starts at exactly zero
        if ".conv2." in name:
            grown.get_parameter(name).data.zero_()
    return grown


def widened(model: IRN, channels: tuple[int, ...]) -> IRN:
    """A conv IRN with more channels per level that computes exactly what ``model`` does: every old weight in the
    corner of its wider tensor, the new output channels freshly initialised, and the weights from new channels into
    old ones zero. Nothing is normalised, so the new channels cannot reach the output until training grows those
    zero weights; the wider counterpart of ``deepened``."""
    cfg = model.cfg
    if cfg.body != "conv" or len(channels) != len(cfg.channels) or any(n < o for n, o in zip(channels, cfg.channels)):
        raise ValueError(f"need a conv IRN and at least its channels per level {cfg.channels}, got {tuple(channels)}")
    grown = IRN(replace(cfg, channels=tuple(channels)))
    old = model.state_dict()
    with torch.no_grad():
        for name, p in grown.named_parameters():
            w = old[name]
            p[tuple(slice(0, n) for n in w.shape)] = w
            if p.dim() == 4:
                p[: w.shape[0], w.shape[1] :] = 0
    return grown


def load_irn(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> IRN:
    """A frozen IRN from a checkpoint folder (kind "irn"), in eval mode; another kind raises CheckpointError."""
    cfg, _ = read_config(folder, "irn", IRNConfig)
    model = load_weights(folder, IRN(cfg))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
