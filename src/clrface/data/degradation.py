"""The synthetic degradation of blind face restoration (paper Sec. 4.1):

    x_d = JPEG_q((x ⊗ k_σ)↓_s + n_δ)↑_s

x is blurred by a Gaussian kernel k (isotropic or anisotropic, randomly rotated), downscaled by s
(bilinear or bicubic, antialiased), Gaussian noise n of std δ (0-255 scale) is added, the result is
JPEG-compressed at quality q and finally resized back to the input size (bicubic). This is the model
of GFPGAN / CodeFormer / the CLR-Face paper; its ranges (σ_k ∈ [0.1, 10] with 41-px kernels,
s ∈ [1, 32], δ ∈ [0, 20], q ∈ [30, 90]) are stated for 512-px faces.

Two paths draw from the same parameter distribution (``sample_params``) and apply the same steps:

* numpy (``degrade``): uint8 HWC in, uint8 HWC out; datasets, test sets, the ``degrade`` command.
* torch (``degrade_batch``): float [B,3,H,W] in [-1, 1] on any device, batched FFT blur,
  ``F.interpolate(antialias=True)`` (which reproduces PIL's resampling filters) over the samples that share
  a low-res size, noise from a ``torch.Generator``. On the CPU JPEG is PIL's codec (it runs at the low
  resolution, on average 512/16 = 32 px, so milliseconds per face); on a GPU it is the batched tensor
  codec of ``jpeg.py``, which differs from libjpeg only by integer rounding (~45 dB apart).

Both paths quantise to uint8 at the same two points (before JPEG and at the end), so with equal
parameters they differ only by the noise realisation and float rounding.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.fft import next_fast_len
from scipy.signal import fftconvolve

from clrface.data.jpeg import jpeg_roundtrip

REFERENCE_SIZE = 512  # the face size the paper's ranges are stated for
NO_JPEG = -1  # ``jpeg_q`` of a preset without compression (collate-safe, unlike None)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as PIL's "L" conversion


@dataclass(frozen=True)
class DegradationConfig:
    """Ranges the degradation parameters are drawn from, uniformly; all spatial ones in pixels at ``size``.

    Ranges are closed ``(low, high)`` pairs; ``low == high`` fixes a parameter. ``jpeg=None`` skips JPEG.
    """

    name: str = "bfr"
    size: int = REFERENCE_SIZE  # face size the spatial ranges below are meant for
    kernel_size: int = 41  # odd
    blur_sigma: tuple[float, float] = (0.1, 10.0)
    iso_prob: float = 0.5  # P(isotropic kernel); otherwise anisotropic with a random rotation
    scale: tuple[float, float] = (1.0, 32.0)
    down_modes: tuple[str, ...] = ("bilinear", "bicubic")
    noise: tuple[float, float] = (0.0, 20.0)  # std on the 0-255 scale
    jpeg: tuple[int, int] | None = (30, 90)
    gray: bool = False  # convert to grayscale first (colorization task); noise is gray too

    def __post_init__(self) -> None:
        # YAML hands lists; tuples keep the dataclass hashable and frozen in spirit.
        for f in ("blur_sigma", "scale", "noise", "jpeg", "down_modes"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, f, tuple(v))
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")
        for f in ("blur_sigma", "scale", "noise", "jpeg"):
            v = getattr(self, f)
            if v is not None and (len(v) != 2 or v[0] > v[1]):
                raise ValueError(f"{f} must be a (low, high) pair with low <= high, got {v}")
        if self.blur_sigma[0] <= 0 or self.scale[0] < 1 or self.noise[0] < 0:
            raise ValueError("need blur_sigma > 0, scale >= 1, noise >= 0")
        if self.jpeg is not None and not (1 <= self.jpeg[0] and self.jpeg[1] <= 100):
            raise ValueError(f"jpeg quality must lie in [1, 100], got {self.jpeg}")
        bad = set(self.down_modes) - {"bilinear", "bicubic"}
        if not self.down_modes or bad:
            raise ValueError(f"down_modes must be a non-empty subset of bilinear/bicubic, got {self.down_modes}")

    def scale_to(self, size: int) -> DegradationConfig:
        """The same preset for faces of ``size`` px: spatial parameters scale by ``size / self.size``.

        Scaled: the downscale range (its low end kept >= 1), the blur sigma range and the kernel size
        (rounded, made odd, >= 3). Not scaled: noise std and JPEG quality, which act per pixel.
        At 128 px the ``bfr`` preset gets s ∈ [1, 8] (the smallest LQ face is 16 px, as at 512),
        σ_k ∈ [0.025, 2.5] and an 11-px kernel; the fixed ×32 of ``x32`` becomes ×8. Scale from the 512-px preset
        (``get_preset(name, size)``), not repeatedly: the rounded kernel size does not round-trip.
        """
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        f = size / self.size
        k = max(3, round(self.kernel_size * f))
        k += 1 - k % 2
        if size == self.size:
            return self
        return dataclasses.replace(
            self,
            size=size,
            kernel_size=k,
            blur_sigma=(self.blur_sigma[0] * f, self.blur_sigma[1] * f),
            scale=(max(1.0, self.scale[0] * f), max(1.0, self.scale[1] * f)),
        )


PRESETS: dict[str, DegradationConfig] = {
    # paper Sec. 4.1 / GFPGAN-CodeFormer training degradation
    "bfr": DegradationConfig(name="bfr"),
    # paper Table 2: ×32 super-resolution with blur and noise, no JPEG
    "x32": DegradationConfig(name="x32", scale=(32.0, 32.0), jpeg=None),
    # colorization: grayscale input plus the bfr degradation
    "gray": DegradationConfig(name="gray", gray=True),
    # ×64 at 512 px is ×16 at 128 px: an 8-px face, the paper's "×16" setting at 128 px
    "x64": DegradationConfig(name="x64", scale=(64.0, 64.0), jpeg=None),
    # the extreme-SR model's training mix: ×32..×64 at 512 px (×8..×16 at 128 px: 16- to 8-px faces)
    "extreme": DegradationConfig(name="extreme", scale=(32.0, 64.0), jpeg=None),
}


def get_preset(name: str, size: int | None = None) -> DegradationConfig:
    """A preset from ``PRESETS``, scaled to ``size`` px faces when given (see ``scale_to``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown degradation preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return cfg if size is None else cfg.scale_to(size)


@dataclass
class DegradationParams:
    """Everything drawn for one image. JSON-serialisable via ``to_dict``; angle in radians."""

    kernel_size: int
    kernel_type: str  # "iso" | "aniso"
    sigma_x: float
    sigma_y: float
    angle: float
    scale: float
    down_mode: str
    noise_sigma: float
    jpeg_q: int  # NO_JPEG (-1) when skipped
    gray: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DegradationParams:
        return cls(**d)


def sample_params(cfg: DegradationConfig, rng: np.random.Generator) -> DegradationParams:
    """Draws one parameter set; the only sampler, shared by the numpy and torch paths."""
    lo, hi = cfg.blur_sigma
    if rng.random() < cfg.iso_prob:
        kind = "iso"
        sx = sy = float(rng.uniform(lo, hi))
        angle = 0.0
    else:
        kind = "aniso"
        sx, sy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        angle = float(rng.uniform(-math.pi, math.pi))
    scale = float(rng.uniform(*cfg.scale))
    mode = str(cfg.down_modes[int(rng.integers(len(cfg.down_modes)))])
    noise = float(rng.uniform(*cfg.noise))
    q = NO_JPEG if cfg.jpeg is None else int(rng.integers(cfg.jpeg[0], cfg.jpeg[1] + 1))
    return DegradationParams(cfg.kernel_size, kind, sx, sy, angle, scale, mode, noise, q, cfg.gray)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, angle: float = 0.0) -> np.ndarray:
    """Rotated 2-D Gaussian, float64 [size, size], sums to 1.

    k(p) ∝ exp(-½ pᵀ Σ⁻¹ p) with Σ = R(θ) diag(σx², σy²) R(θ)ᵀ on the integer grid centred at 0.
    Point-symmetric (k(p) = k(-p)), so convolution and correlation coincide.
    """
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    xx, yy = np.meshgrid(r, r, indexing="xy")
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    inv = rot @ np.diag([1.0 / sigma_x**2, 1.0 / sigma_y**2]) @ rot.T
    q = inv[0, 0] * xx**2 + 2 * inv[0, 1] * xx * yy + inv[1, 1] * yy**2
    k = np.exp(-0.5 * (q - q.min()))  # shift keeps tiny sigmas from underflowing to all zeros
    return k / k.sum()


def _lowres_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, round(h / scale)), max(1, round(w / scale))


def _jpeg(img: np.ndarray, q: int) -> np.ndarray:
    """uint8 HWC through PIL's JPEG codec (libjpeg, default 4:2:0 chroma subsampling)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(q))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def _as_rng(rng: int | np.random.Generator | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# ---------------------------------------------------------------- numpy path


def _resize_float(x: np.ndarray, h: int, w: int, mode: str) -> np.ndarray:
    """float32 HWC resized per channel in PIL "F" mode (antialiased when shrinking, no clamping)."""
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[mode]
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize((w, h), resample))
             for c in range(x.shape[2])]
    return np.stack(chans, axis=-1)


def apply_degradation(img: np.ndarray, params: DegradationParams, rng: int | np.random.Generator | None) -> np.ndarray:
    """Applies fixed parameters to uint8 [H, W, 3]; ``rng`` draws only the noise. Returns uint8 [H, W, 3]."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {img.dtype} {img.shape}")
    rng = _as_rng(rng)
    h, w = img.shape[:2]
    x = img.astype(np.float32)
    if params.gray:
        x = np.repeat(x @ np.asarray(_GRAY_WEIGHTS, np.float32)[:, None], 3, axis=2)
    k = gaussian_kernel(params.kernel_size, params.sigma_x, params.sigma_y, params.angle).astype(np.float32)
    p = params.kernel_size // 2
    x = np.pad(x, ((p, p), (p, p), (0, 0)), mode="reflect" if p < min(h, w) else "edge")
    x = fftconvolve(x, k[:, :, None], mode="valid", axes=(0, 1)).astype(np.float32)
    lh, lw = _lowres_size(h, w, params.scale)
    x = _resize_float(x, lh, lw, params.down_mode)
    if params.noise_sigma > 0:
        n = rng.standard_normal((lh, lw, 1 if params.gray else 3), dtype=np.float32)
        x = x + params.noise_sigma * n
    lq = np.rint(np.clip(x, 0, 255)).astype(np.uint8)
    if params.jpeg_q != NO_JPEG:
        lq = _jpeg(lq, params.jpeg_q)
    x = _resize_float(lq.astype(np.float32), h, w, "bicubic")
    return np.rint(np.clip(x, 0, 255)).astype(np.uint8)


def degrade(
    img: np.ndarray, cfg: DegradationConfig, rng: int | np.random.Generator | None
) -> tuple[np.ndarray, DegradationParams]:
    """Degrades uint8 [H, W, 3] RGB: returns (uint8 [H, W, 3], the drawn parameters).

    ``rng`` is a seed or a ``numpy.random.Generator`` (None: fresh entropy); the same seed gives
    byte-identical output. ``cfg`` is used as given: scale it to the face size first
    (``cfg.scale_to(img.shape[0])`` or ``get_preset(name, size)``).
    """
    rng = _as_rng(rng)
    params = sample_params(cfg, rng)
    return apply_degradation(img, params, rng), params


# ---------------------------------------------------------------- torch path


def _torch_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    if generator is None:
        g.seed()
    else:
        g.manual_seed(int(generator))
    return g


def _fft_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample blur. x: [B, C, H, W], kernels: [B, k, k] (point-symmetric) -> [B, C, H, W].

    FFT instead of a grouped conv: a 41-px kernel at 512 px is 1,681 MACs per pixel, which is
    seconds per batch on a CPU; the FFT cost does not grow with the kernel.
    """
    h, w = x.shape[-2:]
    k = kernels.shape[-1]
    p = k // 2
    xp = F.pad(x, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate")
    hp, wp = xp.shape[-2:]
    # zero-padding to a 2/3/5-smooth length only adds room: the kept region never wraps around
    s = (next_fast_len(hp, real=True), next_fast_len(wp, real=True))
    spec = torch.fft.rfft2(xp, s=s)
    spec.mul_(torch.fft.rfft2(kernels[:, None], s=s))
    # circular convolution; from row/col k-1 on it equals the 'valid' linear convolution
    return torch.fft.irfft2(spec, s=s)[..., k - 1 : hp, k - 1 : wp]


def _jpeg_group(lo: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG of one group of equal-size low-res images [n, 3, h, w] (0-255, integer-valued) at qualities [n] (on
    lo's device): PIL's libjpeg on the CPU, the batched tensor codec of ``jpeg.py`` (within ~45 dB of it) on other
    devices, where a copy to the CPU per image would cost more than the training step."""
    if lo.device.type != "cpu":
        return jpeg_roundtrip(lo, quality)
    u8 = lo.permute(0, 2, 3, 1).to(torch.uint8).numpy()
    return torch.from_numpy(np.stack([_jpeg(im, int(q)) for im, q in zip(u8, quality)])).permute(0, 3, 1, 2).float()


def apply_degradation_batch(
    x: torch.Tensor, params: list[DegradationParams], generator: torch.Generator | int | None
) -> torch.Tensor:
    """Applies one parameter set per sample. x: float [B, 3, H, W] in [-1, 1] -> same shape/dtype/device.

    ``generator`` (on the CPU) draws the noise, through a generator on x's device that it seeds. Samples must
    share the kernel size (true within one config). Samples with the same low-res size, resampling filter and
    JPEG on/off are resized, noised and compressed together as one contiguous slice of the batch sorted by
    that key; everything per-sample reaches the device in one copy, since on a GPU each host-to-device copy
    waits for the queue (and, with other processes on the GPU, for their time slices).
    """
    if x.ndim != 4 or x.shape[1] != 3 or len(params) != x.shape[0]:
        raise ValueError(f"expected [B,3,H,W] and B params, got {tuple(x.shape)} and {len(params)}")
    if len({p.kernel_size for p in params}) > 1:
        raise ValueError("all samples of a batch need the same kernel_size")
    g = _torch_generator(generator)
    b, _, h, w = x.shape
    dev, dtype = x.device, x.dtype
    key = [(*_lowres_size(h, w, p.scale), p.down_mode, p.jpeg_q != NO_JPEG) for p in params]
    order = sorted(range(b), key=lambda i: key[i])
    ps = [params[i] for i in order]
    table = torch.tensor([[p.noise_sigma, p.gray, p.jpeg_q] for p in ps], dtype=torch.float32)
    kernels = torch.from_numpy(
        np.stack([gaussian_kernel(p.kernel_size, p.sigma_x, p.sigma_y, p.angle) for p in ps]).astype(np.float32))
    perm, table, kernels = (t.to(dev) for t in (torch.tensor(order), table, kernels))
    sigma, gray, quality = (table[:, k].view(-1, 1, 1, 1) for k in range(3))
    gray = gray.bool()
    noise_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))

    v = x.detach().float()[perm].add(1.0).mul_(127.5)
    if any(p.gray for p in ps):
        luma = (v * torch.tensor(_GRAY_WEIGHTS, device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        v = torch.where(gray, luma.expand_as(v), v)
    v = _fft_blur(v, kernels)
    out = torch.empty(b, 3, h, w, device=dev)
    start = 0
    for (lh, lw, mode, has_jpeg), members in itertools.groupby(order, key=key.__getitem__):
        end = start + len(list(members))
        lo = F.interpolate(v[start:end], size=(lh, lw), mode=mode, antialias=True, align_corners=False)
        if any(p.noise_sigma > 0 for p in ps[start:end]):
            n = torch.randn(end - start, 3, lh, lw, generator=noise_gen, device=dev)
            n = torch.where(gray[start:end], n[:, :1].expand_as(n), n)  # a gray photo's noise is gray too
            lo.add_(n.mul_(sigma[start:end]))
        lo.clamp_(0, 255).round_()
        if has_jpeg:
            lo = _jpeg_group(lo, quality[start:end].flatten())
        out[start:end] = F.interpolate(lo, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        start = end
    unsorted = torch.empty_like(out)
    unsorted[perm] = out
    return unsorted.clamp_(0, 255).round_().div_(127.5).sub_(1.0).to(dtype)


def degrade_batch(
    x: torch.Tensor, cfg: DegradationConfig, generator: torch.Generator | int | None
) -> tuple[torch.Tensor, list[DegradationParams]]:
    """The training-time path. x: float [B, 3, H, W] in [-1, 1] -> (x_d [B, 3, H, W], B parameter sets).

    ``generator`` is a ``torch.Generator`` (CPU) or a seed; the parameters come from ``sample_params``
    with a numpy generator seeded from it, so their distribution is exactly the numpy path's.
    ``cfg`` is used as given: scale it to H first (``cfg.scale_to(H)``).
    """
    g = _torch_generator(generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())
    rng = np.random.default_rng(seed)
    params = [sample_params(cfg, rng) for _ in range(x.shape[0])]
    return apply_degradation_batch(x, params, g), params
