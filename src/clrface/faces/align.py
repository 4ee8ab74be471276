"""FFHQ face alignment as one affine map, matching ``shared/data/build_data.py`` (own code).

The FFHQ recipe (Karras et al. 2019, ``ffhq-dataset/download_ffhq.py``) builds an oriented square,
the *quad*, from the eye and mouth centres of the 68 dlib landmarks, and resamples it to an
``S x S`` crop. For a square quad that resampling is an affine map; ``align_affine`` returns it as
a 2x3 matrix ``M`` from photo pixel coordinates to crop pixel coordinates so that the same ``M``
drives ``warp_face`` (photo -> crop) and ``faces.paste`` (crop -> photo).

Coordinate convention (as PIL and dlib): integer coordinates are pixel centres, so an image of
width ``W`` spans ``[-0.5, W - 0.5]``. The quad's corners land on the crop's outer pixel edges:
TL at ``(-0.5, -0.5)``, TR at ``(S - 0.5, -0.5)``, BL at ``(-0.5, S - 0.5)``. This is exactly
what build_data's ``Image.QUAD`` transform with ``quad + 0.5`` at 4S followed by a Lanczos
resize to S produces (PIL samples output pixel ``X`` at ``X + 0.5`` in edge coordinates).

Resampling also follows build_data: a face much larger than the crop is first shrunk by an
integer factor with Lanczos (anti-aliasing), the quad's surroundings that fall outside the photo
are reflect-padded and faded to blur and median colour, then the crop is sampled bilinearly at
``supersample x S`` and Lanczos-reduced to ``S``. One difference: build_data's shrink divides the
quad by the factor in centre coordinates (an up to ``shrink/2`` px offset); here the shrink is
folded into the affine exactly. The faces128 data never hit that branch (quads < 4 x 128 px).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
from PIL import Image

from clrface.data.io import load_image, output_names, save_image
from clrface.errors import ClrfaceError
from clrface.faces.detect import DETECT_MIN_FACE, Face, detect_faces


@dataclass
class AlignedFace:
    """Where a crop came from. box: [4]; landmarks68: [68, 2]; affine: [2, 3] photo -> crop at
    ``size``; quad: [4, 2] TL, BL, BR, TR corners in the photo; score: detector score."""

    box: np.ndarray
    landmarks68: np.ndarray
    affine: np.ndarray
    quad: np.ndarray
    size: int = 512
    score: float = 0.0

    def to_json(self) -> dict:
        return {
            "box": [round(float(v), 3) for v in self.box],
            "score": round(float(self.score), 4),
            "size": int(self.size),
            "landmarks68": np.round(self.landmarks68, 3).tolist(),
            "affine": np.round(self.affine, 8).tolist(),
            "quad": np.round(self.quad, 4).tolist(),
        }


def ffhq_quad(landmarks68: np.ndarray) -> np.ndarray:
    """FFHQ crop square from [68, 2] landmarks -> [4, 2] corners TL, BL, BR, TR (photo pixels).

    Side ``2|x|`` with ``|x| = max(2 |eye_to_eye|, 1.8 |eye_to_mouth|)``, centred at
    ``eye_avg + 0.1 eye_to_mouth`` and rotated by the eye line blended with the eye-mouth line.
    """
    lm = np.asarray(landmarks68, np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected [68, 2] landmarks, got {lm.shape}")
    eye_l = lm[36:42].mean(0)
    eye_r = lm[42:48].mean(0)
    eye_avg = 0.5 * (eye_l + eye_r)
    eye_to_eye = eye_r - eye_l
    mouth_avg = 0.5 * (lm[48] + lm[54])
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def crop_corners(size: int) -> np.ndarray:
    """[4, 2] the crop's outer pixel edges TL, BL, BR, TR, where the quad corners land."""
    lo, hi = -0.5, size - 0.5
    return np.array([[lo, lo], [lo, hi], [hi, hi], [hi, lo]], np.float64)


def homogeneous(m: np.ndarray) -> np.ndarray:
    """2x3 -> 3x3 homogeneous."""
    return np.vstack([np.asarray(m, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """pts: [..., 2] -> [..., 2] under the 2x3 matrix ``m``."""
    m = np.asarray(m, np.float64)
    return np.asarray(pts, np.float64) @ m[:, :2].T + m[:, 2]


def align_affine(quad: np.ndarray, size: int) -> np.ndarray:
    """[2, 3] matrix M mapping photo pixels to crop pixels so that ``quad`` fills the S x S crop.

    Least-squares fit of the four corners to ``crop_corners(size)``; exact for the square quads
    of ``ffhq_quad`` (any parallelogram).
    """
    q = np.asarray(quad, np.float64).reshape(4, 2)
    a = np.hstack([q, np.ones((4, 1))])
    sol, *_ = np.linalg.lstsq(a, crop_corners(size), rcond=None)  # [3, 2]
    return sol.T.copy()


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix (crop -> photo for an ``align_affine`` result)."""
    return np.linalg.inv(homogeneous(m))[:2].copy()


def affine_scale(m: np.ndarray) -> float:
    """Crop pixels per photo pixel (geometric mean of the two axes)."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(m, np.float64)[:, :2]))))


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _scale(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


def _resize_map(n_in: float, n_out: float) -> float:
    """Scale of PIL's resize in centre coordinates: out ``j`` <- in ``(j + 0.5) * n_in / n_out - 0.5``."""
    return n_in / n_out


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def warp_face(image: np.ndarray, affine: np.ndarray, size: int, *, supersample: int = 4,
              resample: str = "bilinear") -> np.ndarray:
    """Crop ``image: uint8 [H, W, 3]`` through ``affine`` (photo -> crop) to ``uint8 [size, size, 3]``.

    Follows build_data's resampling (shrink by an integer factor with Lanczos when the quad is
    more than twice the crop, reflect-pad + blur/median fade where the crop leaves the photo,
    bilinear at ``supersample * size``, Lanczos down), with every step folded into one exact
    affine, so ``warp_face(img, align_affine(ffhq_quad(lm), S), S)`` reproduces build_data's crop.
    ``resample="bicubic"`` keeps more near-Nyquist texture (halftone, grain) than build_data's
    bilinear, at the price of crops that differ slightly from the training data.
    """
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; use 'bilinear' or 'bicubic'")
    img = np.ascontiguousarray(np.asarray(image))
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] RGB, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    crop_to_photo = np.linalg.inv(homogeneous(affine))  # centre coordinates, 3x3
    quad = apply_affine(crop_to_photo[:2], crop_corners(size))
    qsize = size / affine_scale(affine)

    # 1. shrink (anti-aliasing for faces much larger than the crop), only around the quad
    to_work = np.eye(3)  # photo centre coords -> working image centre coords
    work = Image.fromarray(img)
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        margin = max(int(np.rint(qsize * 0.1 / shrink)), 3) * shrink + 3 * shrink
        x0 = int(max(np.floor(quad[:, 0].min()) - margin, 0))
        y0 = int(max(np.floor(quad[:, 1].min()) - margin, 0))
        x1 = int(min(np.ceil(quad[:, 0].max()) + margin + 1, w))
        y1 = int(min(np.ceil(quad[:, 1].max()) + margin + 1, h))
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            wn, hn = max(1, round((x1 - x0) / shrink)), max(1, round((y1 - y0) / shrink))
            work = work.resize((wn, hn), Image.Resampling.LANCZOS, box=(x0, y0, x1, y1))
            fx, fy = _resize_map(x1 - x0, wn), _resize_map(y1 - y0, hn)
            # photo p = x0 + (j + 0.5) * f - 0.5  <=>  j = (p - x0 + 0.5) / f - 0.5
            to_work = _translate(-0.5, -0.5) @ _scale(1 / fx, 1 / fy) @ _translate(0.5 - x0, 0.5 - y0)
            qsize = qsize / np.sqrt(fx * fy)
    wq = apply_affine(to_work[:2], quad)

    # 2. crop to the quad's bounding box +- border; pad where it leaves the photo (FFHQ formula)
    border = max(int(np.rint(qsize * 0.1)), 3)
    ww, wh = work.size
    lo = np.floor(wq.min(0)).astype(int)
    hi = np.ceil(wq.max(0)).astype(int)
    cx0, cy0 = max(lo[0] - border, 0), max(lo[1] - border, 0)
    cx1, cy1 = min(hi[0] + border, ww), min(hi[1] + border, wh)
    if cx1 - cx0 < 1 or cy1 - cy0 < 1:  # quad entirely outside the photo: nothing to sample
        return np.zeros((size, size, 3), np.uint8)
    work = work.crop((cx0, cy0, cx1, cy1))
    to_work = _translate(-cx0, -cy0) @ to_work
    wq = wq - [cx0, cy0]
    lo = np.floor(wq.min(0)).astype(int)
    hi = np.ceil(wq.max(0)).astype(int)
    ww, wh = work.size
    pad = [max(border - lo[0], 0), max(border - lo[1], 0), max(hi[0] + border - ww, 0), max(hi[1] + border - wh, 0)]
    if max(pad) > border - 4:
        pad = [max(p, int(np.rint(qsize * 0.3))) for p in pad]
        work = Image.fromarray(_ffhq_pad(np.asarray(work), pad, qsize))
        to_work = _translate(pad[0], pad[1]) @ to_work

    # 3. bilinear at supersample * size, then Lanczos to size
    ss = max(int(supersample), 1)
    t = size * ss
    # supersampled pixel X -> crop u = (X + 0.5) / ss - 0.5 -> photo -> working image
    sup_to_work = to_work @ crop_to_photo @ _translate(-0.5, -0.5) @ _scale(1 / ss, 1 / ss) @ _translate(0.5, 0.5)
    pil = _translate(0.5, 0.5) @ sup_to_work @ _translate(-0.5, -0.5)  # PIL works in edge coordinates
    res = work.transform((t, t), Image.Transform.AFFINE, tuple(pil[:2].ravel()), _RESAMPLE[resample])
    if ss > 1:
        res = res.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(res, np.uint8).copy()


def _wide_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of float32 [H, W, C] over H and W. A wide one (sigma ~80 px for a 2,000 px face warped at the
    photo's own resolution) runs on a copy box-averaged by f ~ sigma / 8 and is enlarged back bilinearly: the blurred
    image holds no detail at that scale, and the full-size filter took minutes and gigabytes there."""
    f = int(sigma // 8)
    if f < 2:
        return scipy.ndimage.gaussian_filter(a, [sigma, sigma, 0])
    h, w, c = a.shape
    hs, ws = -(-h // f), -(-w // f)
    small = np.pad(a, ((0, hs * f - h), (0, ws * f - w), (0, 0)), mode="edge").reshape(hs, f, ws, f, c).mean((1, 3))
    # the box adds (f^2 - 1) / 12 to the variance
    small = scipy.ndimage.gaussian_filter(small, [np.sqrt(max(sigma**2 - (f * f - 1) / 12, 0)) / f] * 2 + [0])
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(small[..., k], np.float32)).resize(
        (ws * f, hs * f), Image.Resampling.BILINEAR))[:h, :w] for k in range(c)], -1)


def _ffhq_pad(a: np.ndarray, pad: list[int], qsize: float) -> np.ndarray:
    """Reflect-pad [H, W, 3] by pad = (left, top, right, bottom), fading to blur then median (FFHQ)."""
    a = np.pad(a.astype(np.float32), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), mode="reflect")
    h, w = a.shape[:2]
    yy, xx = np.ogrid[:h, :w]
    eps = 1e-6
    mask = np.maximum(
        1.0 - np.minimum(xx.astype(np.float32) / max(pad[0], eps), (w - 1 - xx).astype(np.float32) / max(pad[2], eps)),
        1.0 - np.minimum(yy.astype(np.float32) / max(pad[1], eps), (h - 1 - yy).astype(np.float32) / max(pad[3], eps)),
    )[..., None]
    blurred = _wide_blur(a, qsize * 0.02)
    a = a + (blurred - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    a = a + (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
    return np.uint8(np.clip(np.rint(a), 0, 255))


def align_face(image: np.ndarray, face: Face, size: int = 512, *, supersample: int = 4,
               resample: str = "bilinear") -> tuple[np.ndarray, AlignedFace]:
    """One detected face -> (crop uint8 [size, size, 3], AlignedFace)."""
    quad = ffhq_quad(face.landmarks68)
    m = align_affine(quad, size)
    crop = warp_face(image, m, size, supersample=supersample, resample=resample)
    return crop, AlignedFace(box=np.asarray(face.box, np.float64), landmarks68=np.asarray(face.landmarks68, np.float64),
                             affine=m, quad=quad, size=size, score=face.score)


def align_faces(image: np.ndarray, size: int = 512, *, max_faces: int | None = None, upsample: int | None = None,
                detector: str = "hog", supersample: int = 4, resample: str = "bilinear",
                min_face: float = DETECT_MIN_FACE) -> list[tuple[np.ndarray, AlignedFace]]:
    """Detect, landmark and FFHQ-align every face of ``image: uint8 [H, W, 3]``, largest first (faces from
    ``min_face`` px wide: :func:`clrface.faces.detect.detect_faces`)."""
    faces = detect_faces(image, upsample=upsample, max_faces=max_faces, detector=detector, min_face=min_face)
    return [align_face(image, f, size, supersample=supersample, resample=resample) for f in faces]


#: side at which :func:`alignment_error` looks, with one doubling: faces from 16 % of the side are found (an aligned
#: crop's box is 50-70 %, a portrait photo's from ~15 %)
ALIGN_CHECK_SIZE = 256
#: alignment_error above which a crop is not taken for an aligned one: 2 of the 471 val faces found measure more,
#: and those are themselves off (a face low in the frame, one half out of it)
ALIGN_TOLERANCE = 0.2


def alignment_error(crop: np.ndarray) -> float | None:
    """How far a supposedly FFHQ-aligned ``crop: uint8 [H, W, 3]`` is from the alignment its own face gives: the
    largest distance between the crop's corners and the FFHQ quad of the largest face found in it, as a share of
    the side (None: no face found, as in half the bfr-degraded crops). Aligned crops measure 0.01-0.03 (median;
    none of the 48 real_lq crops or of the 216 bfr crops with a face found above 0.2); the square middles of the
    real_lq photos 0.5-0.9; a face-box crop, a 20 % shift or a 20 degree tilt mostly 0.2-0.5."""
    n = ALIGN_CHECK_SIZE
    small = np.asarray(Image.fromarray(np.asarray(crop)).resize((n, n), Image.BICUBIC))
    faces = detect_faces(small, upsample=1, max_faces=1)
    if not faces:
        return None
    return float(np.linalg.norm(ffhq_quad(faces[0].landmarks68) - crop_corners(n), axis=1).max() / n)


def align_files(inputs: list, out_dir, size: int = 512, *, max_faces: int | None = None, upsample: int | None = None,
                detector: str = "hog", min_face: float = DETECT_MIN_FACE, log=None
                ) -> tuple[list[dict], list[str], list[str]]:
    """Aligns every face of every input photo into ``out_dir/<stem>_<k>.png`` + ``out_dir/faces.json``.

    Returns (records, failures, no_face): one record per face (the JSON entries), one line per
    input that could not be read, the inputs without a face. Unreadable inputs are reported via
    ``log(line)`` and skipped; inputs are never overwritten. Stems shared by several inputs get
    the extension added (``a_png_0.png``), and names that still collide (``photo.jpg`` in two folders, ``x.jpg`` and
    ``x.JPG``) a hashed suffix (:func:`clrface.data.io.output_names`), so no crop is written over another.
    """

    out_dir = Path(out_dir)
    inputs = [Path(p) for p in inputs]
    records, failures, no_face = [], [], []
    for path, name in zip(inputs, output_names(inputs)):
        try:
            image = load_image(path)
            aligned = align_faces(image, size, max_faces=max_faces, upsample=upsample, detector=detector,
                                  min_face=min_face)
            if not aligned:
                no_face.append(str(path))
                if log:
                    log(f"clrface: warning: {path}: no face found")
            for k, (crop, info) in enumerate(aligned):
                dst = save_image(out_dir / f"{name}_{k}.png", crop, inputs=inputs)
                records.append({"file": dst.name, "source": str(path), "index": k,
                                "photo_size": [int(image.shape[1]), int(image.shape[0])], **info.to_json()})
        except ClrfaceError as e:
            failures.append(str(e))
            if log:
                log(f"clrface: error: {e}")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"size": size, "convention": "affine maps photo pixel centres (x, y) to crop pixel centres; "
            "quad corners TL, BL, BR, TR land on the crop's outer edges", "faces": records,
            "no_face": no_face, "failures": failures}
    # one face per line: readable with head/grep, and still one JSON document
    lines = ",\n".join("  " + json.dumps(r) for r in records)
    head = json.dumps({k: v for k, v in meta.items() if k != "faces"})[:-1]
    (out_dir / "faces.json").write_text(f'{head}, "faces": [\n{lines}\n]}}\n')
    return records, failures, no_face
