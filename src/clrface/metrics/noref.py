"""No-reference sharpness and noise figures of aligned faces, for real photos without ground truth (Table 3).

Both figures look only at the luminance ``Y = 0.299 R + 0.587 G + 0.114 B`` (BT.601, 0-255 scale) inside a
fixed central region of the FFHQ-aligned crop, ``FACE_REGION`` = rows 30-85 %, columns 25-75 % of the side
(at 128 px: rows 38-109, columns 32-96). In FFHQ geometry the eyes sit at ~47 %, the nose base at ~67 % and the
mouth at ~75 % of the height, so the region holds eyes, nose, mouth and inner cheeks and leaves out hair,
background and the reflect-padded borders of the CelebA-derived crops.

* ``laplacian_variance``: variance of the 4-neighbour Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]`` of Y over the
  region (computed without padding, so nothing outside the image enters). Large for fine detail and sharp
  edges, small for blurry faces (Pech-Pacheco et al. 2000, "variance of Laplacian" focus measure).
* ``noise_sigma``: Donoho's robust estimator of white-noise std, ``median(|HH|) / 0.6745``, on the finest
  diagonal Haar band ``HH = (a - b - c + d) / 2`` of the region's non-overlapping 2x2 blocks (Donoho &
  Johnstone 1994). For i.i.d. Gaussian noise of std sigma on a smooth image, HH ~ N(0, sigma^2), so the
  estimate is sigma; on the 0-255 scale of the degradation presets.
* ``excess_laplacian_variance``: ``max(laplacian_variance - 20 noise_sigma^2, 0)``; white noise of std sigma
  alone gives a Laplacian variance of ``(1+1+1+1+16) sigma^2 = 20 sigma^2``, so this is the Laplacian energy that
  the estimated noise does not explain.

Limits, stated with every table: the Laplacian variance rewards anything with high-frequency energy, i.e. noise,
JPEG block edges, ringing, over-sharpening and hallucinated texture as much as true detail, so it is only read
together with ``noise_sigma``. The noise estimate in turn counts genuine fine texture (stubble, eyelashes, skin
pores) as noise, and it sees only part of coloured noise (noise that was resized or JPEG-compressed after being
added, as in real photos, lives mostly below the finest band). A restored face can thus look sharper by
hallucinating, and a real photo's noise is underestimated. Neither figure measures realism or identity: they
are read beside FID and the identity cosine, and only to compare methods on the same faces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: (top, bottom, left, right) of the scored region, as fractions of the crop side (FFHQ-aligned faces)
FACE_REGION = (0.30, 0.85, 0.25, 0.75)
#: Phi^-1(3/4): median(|N(0, 1)|), which turns a median absolute deviation into a std
MAD_TO_SIGMA = 0.6744897501960817
#: variance of the 4-neighbour Laplacian of unit white noise (sum of squared kernel weights)
LAPLACIAN_NOISE_GAIN = 20.0
_LUMA = (0.299, 0.587, 0.114)

Region = tuple[float, float, float, float]


def luminance(x: Tensor) -> Tensor:
    """BT.601 luma on the 0-255 scale, float64. x: [B,3,H,W] float in [-1,1] or uint8. Returns [B,H,W]."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got {tuple(x.shape)}")
    v = x.detach().to(torch.float64)
    if x.dtype != torch.uint8:
        v = (v.clamp(-1, 1) + 1) * 127.5
    w = torch.tensor(_LUMA, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return (v * w).sum(1)


def region_bounds(h: int, w: int, region: Region = FACE_REGION) -> tuple[int, int, int, int]:
    """Pixel bounds (y0, y1, x0, x1), end exclusive, of ``region`` in an H x W crop, kept >= 1 px off the edge
    (so the 3x3 Laplacian of every region pixel lies inside the image)."""
    t, b, le, r = region
    if not (0 <= t < b <= 1 and 0 <= le < r <= 1):
        raise ValueError(f"region must be (top, bottom, left, right) fractions with top<bottom, left<right: {region}")
    y0, y1 = max(1, round(t * h)), min(h - 1, round(b * h))
    x0, x1 = max(1, round(le * w)), min(w - 1, round(r * w))
    if y1 - y0 < 2 or x1 - x0 < 2:
        raise ValueError(f"region {region} of a {h}x{w} image is smaller than 2x2 pixels")
    return y0, y1, x0, x1


def laplacian(y: Tensor) -> Tensor:
    """4-neighbour Laplacian without padding. y: [B,H,W]. Returns [B,H-2,W-2] (entry (i,j) is pixel (i+1,j+1))."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=y.dtype, device=y.device)
    return F.conv2d(y[:, None], k.view(1, 1, 3, 3))[:, 0]


def laplacian_variance(x: Tensor, region: Region = FACE_REGION) -> Tensor:
    """Variance of the Laplacian of Y over ``region`` (population variance, 0-255 scale squared).

    x: [B,3,H,W] in [-1,1] or uint8. Returns [B] float64.
    """
    y = luminance(x)
    y0, y1, x0, x1 = region_bounds(y.shape[1], y.shape[2], region)
    lap = laplacian(y)[:, y0 - 1:y1 - 1, x0 - 1:x1 - 1]
    return lap.flatten(1).var(1, unbiased=False)


def haar_hh(y: Tensor) -> Tensor:
    """Finest diagonal Haar detail of non-overlapping 2x2 blocks, orthonormal scaling: (a - b - c + d) / 2 for
    the block [[a, b], [c, d]]. y: [B,H,W] (an odd last row/column is dropped). Returns [B,H//2,W//2]."""
    h, w = (y.shape[1] // 2) * 2, (y.shape[2] // 2) * 2
    y = y[:, :h, :w]
    return (y[:, 0::2, 0::2] - y[:, 0::2, 1::2] - y[:, 1::2, 0::2] + y[:, 1::2, 1::2]) / 2


def noise_sigma(x: Tensor, region: Region = FACE_REGION) -> Tensor:
    """Donoho's MAD estimate of the white-noise std of Y in ``region``: median(|HH|) / 0.6745 (0-255 scale).

    x: [B,3,H,W] in [-1,1] or uint8. Returns [B] float64.
    """
    y = luminance(x)
    y0, y1, x0, x1 = region_bounds(y.shape[1], y.shape[2], region)
    hh = haar_hh(y[:, y0:y1, x0:x1]).flatten(1).abs()
    return hh.quantile(0.5, dim=1) / MAD_TO_SIGMA


def noref_scores(x: Tensor, region: Region = FACE_REGION) -> dict[str, Tensor]:
    """All three figures per image: {"laplacian_var", "noise_sigma", "excess_laplacian_var"}, each [B] float64.

    excess = max(laplacian_var - 20 noise_sigma^2, 0): the Laplacian energy white noise of the estimated std
    does not explain (see the module docstring for what this can and cannot tell).
    """
    lv = laplacian_variance(x, region)
    ns = noise_sigma(x, region)
    return {"laplacian_var": lv, "noise_sigma": ns,
            "excess_laplacian_var": (lv - LAPLACIAN_NOISE_GAIN * ns**2).clamp(min=0)}


def describe(region: Region = FACE_REGION) -> str:
    """The protocol line for tables."""
    t, b, le, r = region
    return (f"BT.601 Y (0-255) in rows {t:.0%}-{b:.0%}, cols {le:.0%}-{r:.0%} of the aligned crop; "
            "var of 4-nbr Laplacian; noise = median|Haar HH|/0.6745 (Donoho); "
            "excess = max(lapvar - 20 noise^2, 0); Laplacian variance also rewards noise/artefacts")


def colorfulness(x: Tensor, region: Region = FACE_REGION) -> Tensor:
    """Hasler & Süsstrunk's colourfulness (2003, "Measuring colourfulness in natural images") of the region, per
    image: with rg = R - G and yb = (R + G) / 2 - B on the 0-255 scale,
    ``sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2)``. 0 for gray; the authors' scale calls ~15
    "slightly", ~33 "moderately" and ~59 "quite" colourful. x: [B,3,H,W] float in [-1,1] or uint8. Returns [B]."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got {tuple(x.shape)}")
    v = x.detach().to(torch.float64)
    if x.dtype != torch.uint8:
        v = (v.clamp(-1, 1) + 1) * 127.5
    t, b, left, r = region_bounds(x.shape[2], x.shape[3], region)
    v = v[:, :, t:b, left:r].flatten(2)
    rg = v[:, 0] - v[:, 1]
    yb = 0.5 * (v[:, 0] + v[:, 1]) - v[:, 2]
    spread = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
    return spread + 0.3 * (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()
