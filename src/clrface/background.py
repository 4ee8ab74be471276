"""Background upscaling for ``--bg-upscale N``: the whole photo is enlarged before the restored faces are pasted,
so that faces land at the output resolution.

Two upsamplers share one call signature ``(photo uint8 [H,W,3], factor) -> uint8 [H*factor, W*factor, 3]``:

- :func:`lanczos_upscale`, the default: classical, no weights.
- :class:`RealESRGANUpscaler`: Real-ESRGAN's RRDBNet generator (Wang et al., "Real-ESRGAN: Training Real-World
  Blind Super-Resolution with Pure Synthetic Data", ICCVW 2021), for users who place its released weights
  (e.g. ``RealESRGAN_x4plus.pth``) on disk; we do not ship or download them. The network runs on overlapping
  tiles so memory stays bounded on large photos; its native factor (2 or 4) is resampled to the asked one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn

from clrface.errors import CheckpointError, ClrfaceError

BG_TILE = 192  # default Real-ESRGAN tile in input px (--bg-tile): bounds the memory on large photos

Upscaler = Callable[[np.ndarray, int], np.ndarray]


def lanczos_upscale(photo: np.ndarray, factor: int) -> np.ndarray:
    """Resizes uint8 [H,W,3] by an integer factor with PIL's Lanczos filter (identity at factor 1)."""
    if factor == 1:
        return photo.copy()
    h, w = photo.shape[:2]
    return np.asarray(Image.fromarray(photo).resize((w * factor, h * factor), Image.LANCZOS))


# ------------------------------------------------------------------------------------------- RRDBNet


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs with dense connections; output scaled by 0.2 and added back (ESRGAN)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(self.lrelu(conv(torch.cat(feats, 1))))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


@dataclass(frozen=True)
class RRDBNetConfig:
    """Real-ESRGAN's generator. x4plus: scale 4, 64 features, 23 blocks; x2plus: scale 2 (the input is
    pixel-unshuffled by 2 first, so it runs at a quarter of the pixels)."""

    scale: int = 4
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32


class RRDBNet(nn.Module):
    """Parameter names follow the released Real-ESRGAN checkpoints so their state dicts load unchanged."""

    def __init__(self, cfg: RRDBNetConfig = RRDBNetConfig()):
        super().__init__()
        if cfg.scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet scale must be 1, 2 or 4, got {cfg.scale}")
        self.config = cfg
        in_ch = 3 * (4 // cfg.scale) ** 2  # scale 2 / 1 unshuffle the input by 2 / 4; the body always upsamples x4
        self.conv_first = nn.Conv2d(in_ch, cfg.num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(cfg.num_feat, cfg.num_grow_ch) for _ in range(cfg.num_block)])
        self.conv_body = nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(cfg.num_feat, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """x [B,3,H,W] in [0,1] -> [B,3,H*scale,W*scale] (H, W divisible by 4 // scale)."""
        if self.config.scale < 4:
            x = F.pixel_unshuffle(x, 4 // self.config.scale)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def infer_rrdbnet_config(state: dict[str, Tensor]) -> RRDBNetConfig:
    """Reads scale, width, depth and growth from a released state dict's shapes."""
    try:
        w_first = state["conv_first.weight"]
        num_block = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
        grow = state["body.0.rdb1.conv1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not a Real-ESRGAN RRDBNet state dict (missing {e})") from None
    scale = {3: 4, 12: 2, 48: 1}.get(int(w_first.shape[1]))
    if scale is None:
        raise CheckpointError(f"RRDBNet conv_first takes {w_first.shape[1]} channels; expected 3, 12 or 48")
    return RRDBNetConfig(scale=scale, num_feat=int(w_first.shape[0]), num_block=num_block, num_grow_ch=int(grow))


def load_rrdbnet(path: str | Path, device: str | torch.device = "cpu") -> RRDBNet:
    """Loads released Real-ESRGAN weights (.pth with ``params_ema`` / ``params``, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (place Real-ESRGAN RRDBNet weights, e.g. RealESRGAN_x4plus.pth)")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and safetensors errors differ; all mean "not loadable")
        # one line, and never torch's advice to retry with weights_only=False (which runs the file's code)
        # torch says "can still be loaded" of a pickle holding more than tensors; its other messages, and its
        # advice to load such a file unsafely, are not for this user
        if "can still be loaded" in str(e) or "Unsupported global" in str(e):
            reason = "not a plain PyTorch file of tensors"
        else:
            detail = "" if "weights_only" in str(e) else (str(e).strip().splitlines() or [""])[0][:160]
            reason = f"not a PyTorch .pth or .safetensors file; {type(e).__name__}" + (f": {detail}" if detail else "")
        raise CheckpointError(f"{path}: not a Real-ESRGAN weights file that can be read safely ({reason})") from None
    if isinstance(state, dict):
        state = state.get("params_ema", state.get("params", state))
    net = RRDBNet(infer_rrdbnet_config(state))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit RRDBNet ({str(e).splitlines()[0]})") from None
    return net.eval().requires_grad_(False).to(device)


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Covering [0, length) with windows of at most ``tile`` px that overlap by ``overlap`` px; the last window
    ends at ``length`` exactly."""
    if tile <= overlap:  # the windows would not advance
        raise ValueError(f"tile {tile} px must exceed the overlap {overlap} px")
    if length <= tile:
        return [(0, length)]
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    return [(s, s + tile) for s in starts]


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, scale: int, tile: int, overlap: int = 16) -> Tensor:
    """Applies an x``scale`` network ``fn`` to x [1,C,H,W] tile by tile (peak memory ~ one tile), blending
    overlaps with a linear ramp so seams do not show."""
    _, c, h, w = x.shape
    out = torch.zeros(1, 3, h * scale, w * scale)
    weight = torch.zeros(1, 1, h * scale, w * scale)
    for y0, y1 in tile_spans(h, tile, overlap):
        for x0, x1 in tile_spans(w, tile, overlap):
            y = fn(x[:, :, y0:y1, x0:x1]).float().cpu()
            ramp = _ramp(y1 - y0, overlap * scale, y0 > 0, y1 < h, scale)[:, None] * \
                _ramp(x1 - x0, overlap * scale, x0 > 0, x1 < w, scale)[None, :]
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] += y * ramp
            weight[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] += ramp
    return out / weight


def _ramp(n: int, width: int, rise: bool, fall: bool, scale: int) -> Tensor:
    """Weights along one axis of an output tile: linear over ``width`` px at edges shared with a neighbour."""
    r = torch.ones(n * scale)
    width = min(width, n * scale // 2)
    if width > 0:
        edge = (torch.arange(width) + 0.5) / width
        if rise:
            r[:width] = edge
        if fall:
            r[-width:] = edge.flip(0)
    return r


class RealESRGANUpscaler:
    """``(photo, factor) -> photo``: RRDBNet at its native scale on tiles, then Lanczos to the asked factor."""

    def __init__(self, net: RRDBNet, tile: int = BG_TILE, overlap: int = 16):
        if tile < 4 * overlap:  # smaller tiles would be mostly blended overlap
            raise ClrfaceError(f"background tile {tile} px must be at least {4 * overlap} px")
        self.net, self.tile, self.overlap = net, tile, overlap
        self.device = next(net.parameters()).device

    @torch.no_grad()
    def __call__(self, photo: np.ndarray, factor: int) -> np.ndarray:
        if factor == 1:
            return photo.copy()
        s = self.net.config.scale
        h, w = photo.shape[:2]
        pad = 4 // s  # the unshuffle of x2/x1 models needs sides divisible by 4 // scale
        hp, wp = -(-h // pad) * pad, -(-w // pad) * pad
        x = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None].float() / 255
        x = F.pad(x, (0, wp - w, 0, hp - h), mode="replicate")
        tile = max(pad, self.tile // pad * pad)
        y = tiled_apply(lambda t: self.net(t.to(self.device)), x, s, tile, self.overlap // pad * pad)
        y = (y[0, :, :h * s, :w * s].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        if s != factor:
            y = np.asarray(Image.fromarray(y).resize((w * factor, h * factor), Image.LANCZOS))
        return y
