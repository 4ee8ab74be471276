"""Paste restored face crops back into the photo through the inverse alignment affine.

Every photo pixel near the face is mapped into crop coordinates with the alignment affine and
the crop is sampled there bilinearly, so the result is rendered at the photo's resolution (the
crop is never shrunk first) and only the face's bounding region is touched. The blend mask is
defined in crop space and evaluated at the same mapped coordinates, i.e. it is warped with the
face: zero in an eroded border of the crop, rising over ``feather`` with a raised-cosine ramp,
one inside. The ramp plays the role of an eroded and Gaussian-blurred square (as in GFPGAN /
facexlib paste-back) but has compact support, so pixels where the mask is zero are returned
bit-exactly unchanged, and it is C1-smooth, so no seam or box edge is visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage

from clrface.faces.align import crop_corners
from clrface.faces.align import homogeneous as _h


def _ramp(t: np.ndarray) -> np.ndarray:
    """0 for t <= 0, 1 for t >= 1, raised cosine in between (C1)."""
    t = np.clip(t, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def face_mask(u: np.ndarray, v: np.ndarray, size: int, *, erode: float = 0.04, feather: float = 0.08,
              shape: str = "square") -> np.ndarray:
    """Blend weight in [0, 1] at crop coordinates (u, v) of an S x S crop (centre coordinates).

    ``erode`` and ``feather`` are fractions of S: the weight is 0 within ``erode * S`` of the crop
    edge and reaches 1 at ``(erode + feather) * S``. ``shape="ellipse"`` uses the distance to the
    inscribed circle instead (less of the crop's corners, i.e. of hair and background, is kept).
    """
    fu = (np.asarray(u, np.float64) + 0.5) / size  # crop edge -> 0, opposite edge -> 1
    fv = (np.asarray(v, np.float64) + 0.5) / size
    f = max(float(feather), 1e-9)
    if shape == "square":
        du = np.minimum(fu, 1.0 - fu)
        dv = np.minimum(fv, 1.0 - fv)
        # product of two ramps rounds the corners, so the mask has no kinks there
        return _ramp((du - erode) / f) * _ramp((dv - erode) / f)
    if shape == "ellipse":
        d = 0.5 - np.hypot(fu - 0.5, fv - 0.5)
        return _ramp((d - erode) / f)
    raise ValueError(f"unknown mask shape {shape!r}; use 'square' or 'ellipse'")


def _bilinear(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """img: [S, S, C] float; u, v: [N] centre coordinates -> [N, C], edges clamped."""
    h, w = img.shape[:2]
    u = np.clip(u, 0.0, w - 1.0)
    v = np.clip(v, 0.0, h - 1.0)
    x0 = np.minimum(np.floor(u).astype(np.intp), w - 2) if w > 1 else np.zeros(u.shape, np.intp)
    y0 = np.minimum(np.floor(v).astype(np.intp), h - 2) if h > 1 else np.zeros(v.shape, np.intp)
    ax = (u - x0)[:, None]
    ay = (v - y0)[:, None]
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    top = img[y0, x0] * (1 - ax) + img[y0, x1] * ax
    bot = img[y1, x0] * (1 - ax) + img[y1, x1] * ax
    return top * (1 - ay) + bot * ay


def _bicubic(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cubic B-spline interpolation (interpolating, i.e. prefiltered); sharper than bilinear."""
    out = np.empty((u.shape[0], img.shape[2]), np.float32)
    for c in range(img.shape[2]):
        coef = scipy.ndimage.spline_filter(img[..., c], order=3, mode="nearest")
        out[:, c] = scipy.ndimage.map_coordinates(coef, [v, u], order=3, mode="nearest", prefilter=False)
    return out


_SAMPLERS = {"bilinear": _bilinear, "bicubic": _bicubic}


def photo_to_crop(affine: np.ndarray, *, affine_size: int, crop_size: int, scale: float = 1.0) -> np.ndarray:
    """[2, 3] map from the (possibly resized) photo to a ``crop_size`` crop.

    ``affine`` maps the original photo to a crop of ``affine_size``; the photo being pasted into is
    the original resized by ``scale`` (PIL convention: ``p' = (p + 0.5) s - 0.5``) and the crop has
    ``crop_size`` pixels (``u' = (u + 0.5) crop_size / affine_size - 0.5``).
    """
    r = crop_size / affine_size
    crop_rescale = np.array([[r, 0, 0.5 * r - 0.5], [0, r, 0.5 * r - 0.5], [0, 0, 1.0]])
    s = float(scale)
    photo_unscale = np.array([[1 / s, 0, 0.5 / s - 0.5], [0, 1 / s, 0.5 / s - 0.5], [0, 0, 1.0]])
    return (crop_rescale @ _h(affine) @ photo_unscale)[:2]


def _footprint(hw: tuple[int, int], m: np.ndarray, s_crop: int, **mask_kw):
    """Bounding region of the crop in the photo, its crop coordinates and mask weights (or None)."""
    mh = _h(m)
    inv = np.linalg.inv(mh)
    h, w = hw
    corners = crop_corners(s_crop) @ inv[:2, :2].T + inv[:2, 2]
    x0 = max(int(np.floor(corners[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(corners[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(corners[:, 0].max())) + 2, w)
    y1 = min(int(np.ceil(corners[:, 1].max())) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1]
    u = mh[0, 0] * xs + mh[0, 1] * ys + mh[0, 2]
    v = mh[1, 0] * xs + mh[1, 1] * ys + mh[1, 2]
    return (y0, y1, x0, x1), u, v, face_mask(u, v, s_crop, **mask_kw)


def paste_mask(photo_hw: tuple[int, int], affine: np.ndarray, *, affine_size: int, crop_size: int | None = None,
               scale: float = 1.0, erode: float = 0.04, feather: float = 0.08, shape: str = "square") -> np.ndarray:
    """float32 [H, W] blend weight that ``paste_face`` uses for one face (0 where the photo is kept)."""
    s_crop = crop_size or affine_size
    m = photo_to_crop(affine, affine_size=affine_size, crop_size=s_crop, scale=scale)
    res = np.zeros(photo_hw, np.float32)
    found = _footprint(photo_hw, m, s_crop, erode=erode, feather=feather, shape=shape)
    if found is not None:
        (y0, y1, x0, x1), _, _, wgt = found
        res[y0:y1, x0:x1] = wgt
    return res


def paste_face(photo: np.ndarray, crop: np.ndarray, affine: np.ndarray, *, affine_size: int | None = None,
               scale: float = 1.0, erode: float = 0.04, feather: float = 0.08, shape: str = "square",
               interpolation: str = "bilinear", out: np.ndarray | None = None) -> np.ndarray:
    """Blend ``crop: uint8 [S, S, 3]`` into ``photo: uint8 [H, W, 3]`` where the face came from.

    ``affine``: [2, 3] photo -> crop of ``affine_size`` (default S) pixels, from ``align_affine``
    on the photo before it was resized by ``scale``. Returns a new uint8 photo (or writes into
    ``out``); pixels where the mask is zero are unchanged exactly. ``interpolation="bicubic"``
    (cubic spline) keeps fine texture when the crop is enlarged into the photo.
    """
    if interpolation not in _SAMPLERS:
        raise ValueError(f"unknown interpolation {interpolation!r}; use 'bilinear' or 'bicubic'")
    ph = np.asarray(photo)
    cr = np.asarray(crop)
    if ph.dtype != np.uint8 or ph.ndim != 3 or ph.shape[2] != 3:
        raise ValueError(f"photo must be uint8 [H, W, 3], got {ph.dtype} {ph.shape}")
    if cr.dtype != np.uint8 or cr.ndim != 3 or cr.shape[2] != 3 or cr.shape[0] != cr.shape[1]:
        raise ValueError(f"crop must be uint8 [S, S, 3], got {cr.dtype} {cr.shape}")
    s_crop = cr.shape[0]
    res = ph.copy() if out is None else out
    m = photo_to_crop(affine, affine_size=affine_size or s_crop, crop_size=s_crop, scale=scale)
    found = _footprint(res.shape[:2], m, s_crop, erode=erode, feather=feather, shape=shape)
    if found is None:
        return res
    (y0, y1, x0, x1), u, v, wgt = found
    sel = wgt > 0
    sampled = _SAMPLERS[interpolation](cr.astype(np.float32), u[sel], v[sel])
    region = res[y0:y1, x0:x1]
    old = region[sel].astype(np.float32)
    a = wgt[sel].astype(np.float32)[:, None]
    region[sel] = np.clip(np.rint(old + a * (sampled - old)), 0, 255).astype(np.uint8)
    return res


def paste_faces(photo: np.ndarray, crops: Sequence[np.ndarray], affines: Sequence[np.ndarray], *,
                affine_size: int | None = None, scale: float = 1.0, **mask_kw) -> np.ndarray:
    """Paste several faces (in order; a later face wins where masks overlap). Returns a new photo."""
    if len(crops) != len(affines):
        raise ValueError(f"{len(crops)} crops but {len(affines)} affines")
    res = np.asarray(photo).copy()
    for crop, m in zip(crops, affines):
        paste_face(res, crop, m, affine_size=affine_size, scale=scale, out=res, **mask_kw)
    return res
