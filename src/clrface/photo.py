"""Whole photos: detect -> align -> restore the faces -> paste them back (bicubic) into the upscaled photo.

The faces themselves are restored by any object with the :class:`clrface.restorer.Restorer` interface
(``resolution``, ``background``, ``restore_crops``), passed in by the caller; this module only knows photos.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from clrface.data.io import MIN_SIDE, to_model_range, to_uint8
from clrface.errors import ClrfaceError
from clrface.faces.align import ALIGN_TOLERANCE, align_faces, alignment_error
from clrface.faces.detail import DetailEstimate, fine_detail, input_face, keep_input_detail, photo_blockiness
from clrface.faces.detect import DETECT_MIN_FACE
from clrface.faces.paste import paste_faces
from clrface.options import RestoreOptions
from clrface.reference import Reference, ReferencePolicy, assign_reference

if TYPE_CHECKING:  # the restorer imports this module: the type is for annotations only
    from clrface.restorer import RestoredFaces, Restorer


@dataclass
class FaceResult:
    """One face of a photo. crop_in: uint8 [S,S,3] model input; crops_out: ``samples`` uint8 [S,S,3];
    box: [4] x0,y0,x1,y1 in input-photo pixels; affine: [2,3] photo -> crop of S px; id_*: cosine per sample."""

    crop_in: np.ndarray
    crops_out: list[np.ndarray]
    box: np.ndarray
    affine: np.ndarray
    id_vs_irn: list[float]
    id_vs_input: list[float]
    detail: dict | None = None  # keep-detail estimates and weights (clrface.faces.detail); None: not applied
    reference: dict | None = None  # whether a reference guided the face and the cosines; None: none was given

    def __post_init__(self) -> None:
        self.crop_in, self.crops_out = _own(self.crop_in), [_own(c) for c in self.crops_out]


@dataclass
class RestoreResult:
    """images: ``samples`` uint8 [H*u, W*u, 3] outputs; ``no_face``: nothing was detected (images are the input)."""

    images: list[np.ndarray]
    faces: list[FaceResult]
    no_face: bool = False
    warnings: list[str] = field(default_factory=list)
    sampling: dict[str, float] = field(default_factory=dict)  # sigma_start, guidance_scale, nfe actually used

    def __post_init__(self) -> None:
        self.images = [_own(im) for im in self.images]

    @property
    def image(self) -> np.ndarray:
        return self.images[0]


def _own(a: np.ndarray) -> np.ndarray:
    """``a`` as a result array a caller may keep and change: C-contiguous, writable, and a copy where it is a
    view (of the caller's input, of another result array, of a torch tensor)."""
    a = np.asarray(a)
    if a.base is not None or not a.flags.c_contiguous or not a.flags.writeable:
        a = np.array(a, order="C")
    return a


def resize_lanczos(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """uint8 [H,W,3] -> [h,w,3] with PIL's Lanczos filter (the array itself when the size already matches)."""
    if img.shape[1] == w and img.shape[0] == h:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.LANCZOS))


def side_by_side(*imgs: np.ndarray) -> np.ndarray:
    """The images in a row, each resized (Lanczos) to the tallest one's height."""
    h = max(i.shape[0] for i in imgs)
    return np.concatenate([resize_lanczos(i, round(i.shape[1] * h / i.shape[0]), h) for i in imgs], axis=1)


def _ycbcr(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).convert("YCbCr"), dtype=np.float32)


def is_monochrome(photo: np.ndarray, tol: float = 1.5) -> bool:
    """True for grayscale and single-hue (sepia, cyanotype) photos: the chroma vectors (Cb-128, Cr-128) of the
    pixels lie on one ray from neutral gray, within ``tol`` (0-255 scale, rms distance off the ray; the colour
    photos of the real_lq set measure 2.6 to 9.3, a warm film still the lowest)."""
    px = np.asarray(photo).reshape(-1, 3)
    if len(px) > 65536:  # a fixed subsample is plenty for a 2-D direction, taken before the colour conversion
        px = px[:: len(px) // 65536]
    c = _ycbcr(np.ascontiguousarray(px[:, None]))[..., 1:].reshape(-1, 2).astype(np.float64) - 128.0
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    d = vt[0]
    along = c @ d
    if along.mean() < 0:
        d, along = -d, -along
    off = c - along[:, None] * d
    return bool(np.sqrt((off ** 2).sum(1).mean()) <= tol and np.quantile(along, 0.01) >= -tol)


def keep_tone(restored: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The luminance of ``restored`` with the chroma of ``reference`` (same size, uint8 [S,S,3])."""
    y = _ycbcr(restored)[..., :1]
    cbcr = _ycbcr(reference)[..., 1:]
    ycc = np.clip(np.rint(np.concatenate([y, cbcr], -1)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(ycc, "YCbCr").convert("RGB"))


# Where a face's skin lies in an FFHQ-aligned crop, as fractions of its side: dlib's 68 landmarks (its HOG
# detector's box, the crops enlarged to 512 px) of the 98 of the first 120 faces128/val faces it finds put the
# brows at 0.39, the eyes at 0.47 and 0.19 apart, the mouth at 0.75 and the chin at 0.93.
_OVAL_CENTRE, _OVAL_RADII, _OVAL_FEATHER = (0.5, 0.6), (0.25, 0.34), 0.06


def face_oval(size: int) -> np.ndarray:
    """float32 [S,S] weight of the face's skin in an aligned crop: 1 over brows, eyes, cheeks, mouth and chin, 0.5
    on an ellipse's edge (forehead at 0.26, chin at 0.94, cheeks at 0.25 and 0.75 of the side), 0 a feather's width
    beyond it on hair, neck and background (a raised-cosine ramp)."""
    t = (np.arange(size, dtype=np.float64) + 0.5) / size
    dx = (t[None, :] - _OVAL_CENTRE[0]) / _OVAL_RADII[0]
    dy = (t[:, None] - _OVAL_CENTRE[1]) / _OVAL_RADII[1]
    inside = 0.5 + (1.0 - np.hypot(dx, dy)) * min(_OVAL_RADII) / _OVAL_FEATHER  # feather widths, 0.5 on the edge
    return (0.5 - 0.5 * np.cos(np.pi * np.clip(inside, 0.0, 1.0))).astype(np.float32)


def colour_face_only(restored: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """A restored crop of a monochrome photo with its colours kept on the face's skin only (``face_oval``); hair,
    neck and background take the crop's own tone, so a colourised face is not a coloured square."""
    if restored.shape[:2] != crop.shape[:2] or restored.shape[0] != restored.shape[1]:
        raise ValueError(f"square crops of one size expected, got {restored.shape} and {crop.shape}")
    w = face_oval(restored.shape[0])[..., None]
    toned = keep_tone(restored, crop).astype(np.float32)
    return np.clip(np.rint(w * restored + (1.0 - w) * toned), 0, 255).astype(np.uint8)


def paste_back(base: np.ndarray, crops: list[np.ndarray], affines: list[np.ndarray], size: int, scale: int
               ) -> np.ndarray:
    """A copy of ``base`` with the restored crops (uint8 [S,S,3], largest face first) pasted through their
    photo -> crop affines; the largest face goes last, so it wins where pastes overlap."""
    return paste_faces(base, crops[::-1], affines[::-1], affine_size=size, scale=scale, interpolation="bicubic")


def best_first(out: RestoredFaces) -> RestoredFaces:
    """The samples of each face ordered by identity, best first: descending cosine to the face's guidance target,
    its reference where it had one, else the IRN output (the input where there is no IRN output, mode prior).
    Stable, so equal scores (modes irn, direct) keep their order."""
    if out.restored.shape[1] < 2:
        return out
    order = torch.sort(out.id_vs_target.float(), dim=1, descending=True, stable=True).indices  # [B,N]

    def pick(t: Tensor) -> Tensor:
        idx = order.to(t.device).view(*order.shape, *([1] * (t.ndim - 2))).expand_as(t)
        return t.gather(1, idx)

    return replace(out, restored=pick(out.restored), id_vs_irn=pick(out.id_vs_irn), id_vs_input=pick(out.id_vs_input),
                   latent=None if out.latent is None else pick(out.latent),
                   id_vs_reference=None if out.id_vs_reference is None else pick(out.id_vs_reference))


def reference_rows(restorer: Restorer, crops: np.ndarray, reference: Reference, policy: ReferencePolicy
                   ) -> tuple[Tensor, list[dict], list[str]]:
    """The per-face guidance rows [F,D] of ``restore_crops`` (the reference's embedding or zeros), the report
    entry of each face and the warnings (:func:`clrface.reference.assign_reference`)."""
    with torch.no_grad():
        e_in = restorer.embed(to_model_range(crops).to(restorer.device)).float().cpu()
    cos = torch.nn.functional.cosine_similarity(e_in, reference.embedding[None].float(), dim=-1).clamp(-1, 1)
    used, warnings = assign_reference(cos.tolist(), policy)
    rows = torch.stack([reference.embedding.float() if u else torch.zeros_like(reference.embedding, dtype=torch.float32)
                        for u in used])
    entries = [{"used": u, "cos_input_vs_reference": round(float(c), 4), "photos": reference.count}
               for u, c in zip(used, cos)]
    return rows, entries, warnings


def restore_photo(restorer: Restorer, photo: np.ndarray, options: RestoreOptions, *, aligned: bool = False,
                  keep_detail: bool = True, reference: Reference | None = None,
                  reference_policy: ReferencePolicy = ReferencePolicy()) -> RestoreResult:
    """Restores every face of ``photo`` uint8 [H,W,3] and pastes them back (bicubic) at ``upscale`` x the size.

    aligned=False: faces are detected and FFHQ-aligned at S px; the photo is resized by ``upscale`` (the
    restorer's background upscaler) and each restored face is pasted into it through its alignment affine, so
    faces are rendered at the output resolution. Pixels outside the faces' paste masks are the (resized) photo's
    exactly. No face: the (resized) photo is returned with ``no_face=True`` and a warning.
    aligned=True: ``photo`` is one aligned face crop of any size; it is resized to S x S, restored and resized
    back to (W*u, H*u).
    keep_detail: each face is pasted at the input's own resolution, the restored face supplying only what the
    input lacks (:mod:`clrface.faces.detail`: its detail above S px where that is signal, and all of it where
    the face is clean); ``FaceResult.detail`` records the estimates and weights. Off: the S-px restored face.
    reference: a person's identity that guides the face it matches (``reference_policy`` says which faces may take
    it; :mod:`clrface.reference`) in mode full; ``FaceResult.reference`` records per face whether it did.
    """
    o = options
    img = np.asarray(photo)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < MIN_SIDE:
        raise ClrfaceError(f"a photo to restore is uint8 [H, W, 3] with H, W >= {MIN_SIDE}, got {img.dtype} "
                           f"{img.shape}")
    h, w = img.shape[:2]
    s, u = restorer.resolution, o.upscale
    gray = o.color != "keep" and is_monochrome(img)  # keep needs no look at the photo's colours
    # the restored colours everywhere on a colour photo; a gray photo keeps its tone, or is coloured on the face
    recolour = keep_tone if o.color == "keep" or (o.color == "auto" and gray) else colour_face_only if gray else None
    if aligned:
        crop = np.array(resize_lanczos(img, s, s))  # a copy: crop_in is not the caller's array
        out, restored, refs, ref_warnings = _restore_crops(restorer, crop[None], o, recolour, reference,
                                                           reference_policy)
        crops_out = list(restored[0])
        images = [resize_lanczos(c, w * u, h * u) for c in crops_out]
        detail = None
        if keep_detail and w == h >= s:  # a square crop at or above S px: the blend works in its own pixels
            kept, est = _kept_detail(img, crops_out, photo_blockiness(img))
            images, detail = [resize_lanczos(k, w * u, h * u) for k in kept], est.to_json()
        affine = np.array([[s / w, 0, 0.5 * s / w - 0.5], [0, s / h, 0.5 * s / h - 0.5]])
        face = FaceResult(crop, crops_out, np.array([0.0, 0.0, w, h]), affine,
                          out.id_vs_irn[0].tolist(), out.id_vs_input[0].tolist(), detail,
                          with_result(refs[0], out, 0))
        # the model sees square crops with the face where FFHQ puts it: say so where the input is neither
        framing = [] if w == h else [f"aligned: the crop is {w}x{h}, not square; it was resized to a square, so "
                                     "the face is distorted (crop it square, or restore it as a photo, not aligned)"]
        off = alignment_error(img) if w == h else None
        if off is not None and off > ALIGN_TOLERANCE:
            framing.append(f"aligned: the face is not where an FFHQ-aligned crop has it (its square is {off:.0%} of "
                           "the side away), so it is restored poorly; restore it as a photo, not aligned")
        return RestoreResult(images, [face], warnings=framing + ref_warnings, sampling=out.sampling.as_dict())
    # bicubic warp + bicubic paste: the round trip keeps > 47 dB on every real_lq photo (docs/RESULTS.md)
    found = align_faces(img, s, max_faces=o.max_faces, resample="bicubic", min_face=o.min_face or DETECT_MIN_FACE)
    base = restorer.background(img, u)
    if not found:
        # the detector needs some context around a face: one that fills a small square picture is an aligned crop
        crop_like = max(h, w) <= 2 * s and 0.8 <= w / h <= 1.25
        hint = " (if it is an aligned face crop, restore it as one: --aligned, aligned=True)" if crop_like else ""
        returned = "unchanged" if u == 1 else f"enlarged x{u} only"
        return RestoreResult([base.copy() for _ in range(o.samples)], [], no_face=True,
                             warnings=[f"no face found; returned {returned}{hint}"])
    crops = np.stack([c for c, _ in found])
    out, restored, refs, ref_warnings = _restore_crops(restorer, crops, o, recolour, reference, reference_policy)
    faces = [FaceResult(crops[i], list(restored[i]), info.box, info.affine, out.id_vs_irn[i].tolist(),
                        out.id_vs_input[i].tolist(), reference=with_result(refs[i], out, i))
             for i, (_, info) in enumerate(found)]
    affines = [f.affine for f in faces]
    pasted = [[f.crops_out[k] for f in faces] for k in range(o.samples)]
    if keep_detail:  # paste each face at the input's resolution in the output (N >= S px crops)
        for i, f in enumerate(faces):
            x_in = input_face(img, f.affine, s)  # estimates on the photo's own pixels, blend in the output's
            x_out = x_in if u == 1 else input_face(base, f.affine, s, scale=u)
            kept, est = _kept_detail(x_out, f.crops_out, photo_blockiness(img, f.box), measured=x_in)
            for k in range(o.samples):
                pasted[k][i] = kept[k]
            f.detail = est.to_json()
    images = [paste_back(base, crops_k, affines, s, u) for crops_k in pasted]
    return RestoreResult(images, faces, warnings=ref_warnings, sampling=out.sampling.as_dict())


def _restore_crops(restorer: Restorer, crops: np.ndarray, o: RestoreOptions,
                   recolour: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
                   reference: Reference | None, policy: ReferencePolicy
                   ) -> tuple[RestoredFaces, list[np.ndarray], list[dict | None], list[str]]:
    """Aligned crops uint8 [F,S,S,3] -> (the restorer's result, best sample first; per face its samples uint8
    [N,S,S,3], each passed through ``recolour(sample, crop)`` where given; per face its reference entry; reference
    warnings)."""
    rows, refs, warnings = (None, [None] * len(crops), []) if reference is None else \
        reference_rows(restorer, crops, reference, policy)
    if restorer.input_detail_limit is not None and o.mode in ("full", "irn"):  # the modes that run the IRN
        size, rms = restorer.input_detail_limit
        warnings += [f"face {i}: has more fine detail than the faces this model was trained on (rms {v:.1f} above "
                     f"{size} px, its limit {rms:g}); it may draw ghosted features: try --model default"
                     for i, v in enumerate(fine_detail(c, size) for c in crops) if v > rms]
    out = best_first(restorer.restore_crops(crops, o, reference=rows))
    restored = [to_uint8(out.restored[i]).numpy() for i in range(len(crops))]
    if recolour is not None:  # the aligned input crop is the photo under the face: its chroma is the photo's tone
        restored = [np.stack([recolour(c, crops[i]) for c in r]) for i, r in enumerate(restored)]
    return out, restored, refs, warnings


def _kept_detail(x: np.ndarray, samples: Sequence[np.ndarray], block: float, measured: np.ndarray | None = None
                 ) -> tuple[list[np.ndarray], DetailEstimate]:
    """Each restored sample blended into the aligned input face ``x`` (:func:`keep_input_detail`; ``measured``: the
    input's own pixels where ``x`` is an enlarged copy); the estimates depend on the input only, so they are made
    once and reused per sample."""
    kept, est = [], None
    for c in samples:
        k, est = keep_input_detail(x, c, block=block, measured=measured, estimated=est)
        kept.append(k)
    return kept, est


def with_result(entry: dict | None, out: RestoredFaces, i: int) -> dict | None:
    """A face's reference entry plus the restored samples' cosine to the reference (where it was used)."""
    if entry is None or not entry["used"] or out.id_vs_reference is None:
        return entry
    return {**entry, "id_vs_reference": [round(float(v), 4) for v in out.id_vs_reference[i]]}
