"""Keep what the input face already has: the restored S-px face supplies only what the input lacks.

The restorer works at the model's resolution S (128 px). A face that is larger in the photo is rendered from an
S-px crop, so everything above S/2 cycles per crop side (hair strands, pores, eyelashes) is lost, and a clean
face is redrawn by the model (colour blotches, a changed expression) although nothing was wrong with it.

Here the input face is taken in its aligned crop at its own resolution, ``x: [N, N, 3]`` with N >= S, and split
at the model's resolution into a Laplacian-pyramid pair::

    P    = resize_N o resize_S              # bicubic down to S px and up again
    high = (I - P)^2 x                      # the band above S px Nyquist (two steps: P is no projection)
    low  = x - high                         # what an S-px crop can hold; low + high == x exactly

and the output is::

    out = (1 - gate) * resize_N(restored) + gate * low + high_weight * high

``gate`` in [0, 1] is a per-face quality gate (1: the input is clean at S px, keep its S-px content; 0: take the
restored face), ``high_weight`` in [0, 1] says how much of the input's high band is signal rather than noise or
JPEG blocking. With gate = high_weight = 1 the output is the input itself; with both 0 it is today's upsampled
restored face. Both come from measured estimates of the input crop's face region (:func:`estimate`):

* ``noise``: Donoho's white-noise std, median(|Haar HH|) / 0.6745, at the input's resolution (0-255 scale);
* ``high_signal``: the signal fraction of the high band, ``1 - (median|h| / 0.6745)^2 / mean(h^2)`` (a Gaussian
  band -- noise -- gives ~0, a sparse band of edges and texture gives close to 1);
* ``sharpness``: rms of the finest octave at S px over the rms of the octave below it (clean faces measure
  0.58-0.77, blurred or upsampled small faces 0.23-0.53);
* ``blockiness``: strength of an 8-px grid in the photo pixels around the face (1 for none; JPEG photos of
  real_lq up to 1.25, a quality-10 JPEG above 1.3).

The thresholds of :class:`DetailRule` were chosen by measurement (``benchmarks/keep_detail.py``, docs/keep_detail.md):
clean portraits are kept; of the 72 degraded faces of ``real_lq`` the gate opens on 5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clrface.faces.align import affine_scale, warp_face
from clrface.faces.paste import photo_to_crop
from clrface.metrics.noref import FACE_REGION, MAD_TO_SIGMA, haar_hh, region_bounds

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class DetailRule:
    """Linear ramps (lo, hi) from the estimates to the two weights; ``(a, b)`` with a > b ramps downwards.

    gate        = ramp(sharpness, *gate_sharpness) * ramp(noise, *gate_noise) * ramp(blockiness, *gate_blockiness)
    high_weight = ramp(high_signal, *high_signal) * ramp(noise, *high_noise) * ramp(blockiness, *high_blockiness)

    Measured (docs/keep_detail.md): the clean astronaut portrait has sharpness 0.70-0.71, noise 0.31-0.57 and
    blockiness <= 1.02; clean faces128/val faces enlarged 0.58-0.77, <= 0.31 and <= 1.04. The degraded real_lq
    faces that the model improves are blurred (sharpness 0.23-0.53) or noisy: 8-bit grayscale scans measure
    noise 0.741 exactly (median |HH| on a half-integer grid), noisy colour photos 1.1-11.8. JPEG photos measure
    blockiness up to 1.25. The gate is a strict one, so that only faces as clean as the clean portraits are kept.
    """

    gate_sharpness: tuple[float, float] = (0.55, 0.65)
    gate_noise: tuple[float, float] = (0.72, 0.6)
    gate_blockiness: tuple[float, float] = (1.10, 1.04)
    high_signal: tuple[float, float] = (0.2, 0.5)
    high_noise: tuple[float, float] = (2.5, 1.0)
    high_blockiness: tuple[float, float] = (1.20, 1.08)


DEFAULT_RULE = DetailRule()


def luma(x: Tensor) -> Tensor:
    """BT.601 luma. x: [B, 3, H, W] on the 0-255 scale -> [B, H, W]."""
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1)


def resize(x: Tensor, size: int) -> Tensor:
    """x: [B, C, H, W] float -> [B, C, size, size], bicubic (antialiased when shrinking); x itself at equal size."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=size < min(x.shape[-2:]))


def band_split(x: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """x: [B, C, N, N] -> (low, high), both [B, C, N, N], ``low + high == x`` (up to float rounding).

    With P = resize_N o resize_size (bicubic down and up), high = (I - P)^2 x. P is no projection (bicubic
    attenuates near Nyquist), so one residual step, (I - P) x, of a ``size``-px image enlarged to N px still has
    17 % of the rms that a full-resolution image's high band has, i.e. part of the model's own band, which would
    leak the input's degradations into the restored face; the second step leaves 7 %. For N == size, high is 0.
    """
    n = x.shape[-1]
    h = x - resize(resize(x, size), n)
    high = h - resize(resize(h, size), n)
    return x - high, high


def upper_band_from(x: Tensor, source: Tensor, weight: float | Tensor = 1.0, octaves: int = 1) -> Tensor:
    """x [B,C,N,N] with ``weight`` (one number, or [B,1,1,1] per face) of its ``octaves`` upper octaves (what an
    N/2**octaves-px image cannot hold, see :func:`band_split`) replaced by those of ``source`` [B,C,N,N]: the
    decoded latent's shape and tone, the detail of a sharper estimate of the same face."""
    size = x.shape[-1] >> octaves
    return x + weight * (band_split(source, size)[1] - band_split(x, size)[1])


def lower_band_from(x: Tensor, source: Tensor, size: int) -> Tensor:
    """x [B,C,N,N] with what a ``size``-px image holds (the complement of :func:`band_split`'s high band: colour
    and shading over regions wider than N/size px) replaced by that of ``source`` [B,C,N,N]: the decoded latent's
    shapes over the tone of an estimate whose colours are more faithful."""
    return x + (band_split(source, size)[0] - band_split(x, size)[0])


def _region(y: Tensor, region: tuple[float, float, float, float]) -> Tensor:
    y0, y1, x0, x1 = region_bounds(y.shape[-2], y.shape[-1], region)
    return y[..., y0:y1, x0:x1]


def noise_sigma(y: Tensor, region: tuple[float, float, float, float] = FACE_REGION) -> Tensor:
    """Donoho's white-noise std of y: [B, H, W] (float, not rounded) in ``region`` -> [B]."""
    hh = haar_hh(_region(y, region)).flatten(1).abs()
    return hh.median(1).values / MAD_TO_SIGMA


def band_signal_fraction(h: Tensor, region: tuple[float, float, float, float] = FACE_REGION) -> Tensor:
    """Share of a band's energy that is not Gaussian noise. h: [B, H, W] one band -> [B] in [0, 1].

    For a Gaussian band, median(|h|) / 0.6745 is its rms, so the fraction is ~0; edges and texture are sparse
    (a few large values on a near-zero background), so the median is far below the rms and the fraction near 1.
    """
    v = _region(h, region).flatten(1)
    energy = v.pow(2).mean(1)
    gauss = (v.abs().median(1).values / MAD_TO_SIGMA).pow(2)
    return (1 - gauss / energy.clamp(min=1e-12)).clamp(0, 1)


def octave_ratio(y: Tensor, region: tuple[float, float, float, float] = FACE_REGION) -> Tensor:
    """rms of the finest Laplacian-pyramid octave of y: [B, S, S] over the rms of the next octave -> [B].

    A clean face's spectrum falls slowly (ratio ~0.5-0.7); blur and upsampling empty the finest octave first.
    """
    s = y.shape[-1]
    x = y[:, None]
    l1 = resize(resize(x, s // 2), s)
    l2 = resize(resize(x, s // 4), s)
    top = _region((x - l1)[:, 0], region).flatten(1).pow(2).mean(1).sqrt()
    nxt = _region((l1 - l2)[:, 0], region).flatten(1).pow(2).mean(1).sqrt()
    return top / nxt.clamp(min=1e-12)


def blockiness(y: Tensor, period: int = 8) -> Tensor:
    """Strength of a ``period``-px grid in y: [B, H, W] (pixel grid of the photo, any phase) -> [B], >= 1.

    Mean absolute step between neighbouring columns (rows), averaged per column index modulo ``period``: JPEG
    block edges make one phase stand out. The value is the strongest phase over the second strongest (columns
    and rows averaged): 1 when no single phase stands out, and also for images enlarged 2x or 4x, whose
    interpolation repeats every 2 or 4 px and so lifts 4 or 2 phases alike.
    """
    out = []
    for d in ((y[..., :, 1:] - y[..., :, :-1]).abs().mean(-2), (y[..., 1:, :] - y[..., :-1, :]).abs().mean(-1)):
        n = d.shape[-1] // period * period
        if n < 2 * period:
            out.append(torch.ones(y.shape[0], dtype=y.dtype, device=y.device))
            continue
        p = d[..., :n].reshape(d.shape[0], -1, period).mean(1)  # [B, period]
        top2 = p.topk(2, dim=1).values
        out.append(top2[:, 0] / top2[:, 1].clamp(min=1e-12))
    return (out[0] + out[1]) / 2


def ramp(v: float, lo: float, hi: float) -> float:
    """0 at ``lo``, 1 at ``hi``, linear in between (downwards when lo > hi)."""
    return float(np.clip((v - lo) / (hi - lo), 0.0, 1.0))


@dataclass
class DetailEstimate:
    """Per-face estimates and the weights chosen from them (see the module docstring)."""

    size: int
    noise: float
    high_signal: float
    sharpness: float
    blockiness: float
    gate: float = 0.0
    high_weight: float = 0.0

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _tensor(a: np.ndarray) -> Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] on the 0-255 scale."""
    return torch.from_numpy(np.array(a, np.uint8)).permute(2, 0, 1)[None].float()


def photo_blockiness(photo: np.ndarray, box: np.ndarray | None = None, period: int = 8) -> float:
    """:func:`blockiness` of ``photo: uint8 [H, W, 3]`` inside ``box`` (x0, y0, x1, y1; whole photo if None).

    Measured in the photo's own pixel grid, where JPEG's 8x8 blocks lie (an aligned crop rotates and rescales it).
    """
    a = np.asarray(photo)
    if box is not None:
        h, w = a.shape[:2]
        x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
        x1, y1 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
        if x1 - x0 >= 2 * period and y1 - y0 >= 2 * period:
            a = a[y0:y1, x0:x1]
    return float(blockiness(luma(_tensor(a).double()), period)[0])


def estimate(x: np.ndarray, model_size: int, block: float = 1.0) -> DetailEstimate:
    """Estimates of an aligned input face ``x: uint8 [N, N, 3]`` (N >= model_size); ``block`` from
    :func:`photo_blockiness` of the photo the face comes from."""
    t = _tensor(x).double()
    y = luma(t)
    _, high = band_split(t, model_size)
    return DetailEstimate(
        size=int(x.shape[0]),
        noise=float(noise_sigma(y)[0]),
        high_signal=float(band_signal_fraction(luma(high))[0]) if x.shape[0] > model_size else 0.0,
        sharpness=float(octave_ratio(luma(resize(t, model_size)))[0]),
        blockiness=float(block),
    )


def fine_detail(x: np.ndarray, size: int) -> float:
    """RMS (luma, 0-255) of what a ``size``-px image cannot hold in the face region of an aligned crop
    ``x: uint8 [S, S, 3]``. A face enlarged from ``size`` px keeps only the ~15 % of its content's rms that bicubic
    resampling leaks (see :func:`band_split`): the x8 test faces at 128 px through 32 px measure 0.5-1.6, the
    real_lq faces 1.3-25 (median 9)."""
    t = _tensor(x).double()
    return float(_region(luma(t - resize(resize(t, size), x.shape[0])), FACE_REGION).pow(2).mean().sqrt())


def choose(e: DetailEstimate, rule: DetailRule = DEFAULT_RULE) -> DetailEstimate:
    """Fills ``gate`` and ``high_weight`` of ``e`` by ``rule``; returns ``e``."""
    e.gate = (ramp(e.sharpness, *rule.gate_sharpness) * ramp(e.noise, *rule.gate_noise)
              * ramp(e.blockiness, *rule.gate_blockiness))
    e.high_weight = (ramp(e.high_signal, *rule.high_signal) * ramp(e.noise, *rule.high_noise)
                     * ramp(e.blockiness, *rule.high_blockiness))
    return e


def blend(x: Tensor, restored: Tensor, gate: Tensor | float, high_weight: Tensor | float) -> Tensor:
    """out = (1 - gate) resize_N(restored) + gate * low + high_weight * high, (low, high) = band_split(x, S).

    x: [B, C, N, N], restored: [B, C, S, S] (same scale), gate / high_weight: floats or [B] -> [B, C, N, N].
    gate = high_weight = 1 gives x, both 0 the restored face enlarged.
    """
    g = torch.as_tensor(gate, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    w = torch.as_tensor(high_weight, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    low, high = band_split(x, restored.shape[-1])
    up = resize(restored, x.shape[-1])
    return up + g * (low - up) + w * high


def keep_input_detail(x: np.ndarray, restored: np.ndarray, *, block: float = 1.0, rule: DetailRule = DEFAULT_RULE,
                      measured: np.ndarray | None = None, estimated: DetailEstimate | None = None
                      ) -> tuple[np.ndarray, DetailEstimate]:
    """The output face at the input's resolution: x: uint8 [N, N, 3] aligned input face (N >= S), restored: uint8
    [S, S, 3] the model's face of the same crop -> (uint8 [N, N, 3], the estimates and weights used).

    ``measured``: the face at the photo's own resolution when ``x`` is an enlarged copy of it (an upscaled
    output), so that the estimates see the input's pixels, not the upscaler's; default ``x``. ``estimated``: the
    estimate this call returned for another sample of the same face (it depends on the input only), reused.
    """
    s = restored.shape[0]
    for a in (x, x if measured is None else measured):
        if a.shape[0] < s or a.shape[0] != a.shape[1]:
            raise ValueError(f"input face must be square and at least {s} px, got {a.shape}")
    e = estimated or choose(estimate(x if measured is None else measured, s, block), rule)
    out = blend(_tensor(x), _tensor(restored), e.gate, e.high_weight)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy(), e


MAX_SIZE = 4096
"""Largest input-resolution crop taken (4096^2 x 3 floats per array); larger faces keep detail up to it."""


def input_face(photo: np.ndarray, affine: np.ndarray, model_size: int, *, scale: float = 1.0,
               max_size: int = MAX_SIZE) -> np.ndarray:
    """The aligned face of ``photo: uint8 [H, W, 3]`` at the photo's own resolution -> uint8 [N, N, 3].

    ``affine``: [2, 3] from the photo before it was resized by ``scale`` to a ``model_size`` crop (as
    ``align_faces`` returns it); N = model_size / (crop px per photo px), at least model_size, at most max_size.
    """
    n = int(np.clip(round(model_size * scale / affine_scale(affine)), model_size, max_size))
    m = photo_to_crop(affine, affine_size=model_size, crop_size=n, scale=scale)
    # the crop is at (about) the photo's own scale: one bicubic sample per pixel, no supersampling blur
    return warp_face(photo, m, n, supersample=1, resample="bicubic")
