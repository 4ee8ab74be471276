"""Geometry checks for faces.align / faces.paste on real photos (CPU, ~1 min).

1. Round trip: align every face of each whole photo at 512 px, paste the crop itself back.
   Reports per photo: number of faces, pixels changed outside the paste mask (must be 0), PSNR
   inside the mask (target > 40 dB) for the default bilinear warp/paste and for the bicubic
   options, and the paste time.
2. Identity: re-align faces128/val crops (upsampled x2 for detection, landmarks mapped back to
   128 px) and report the mean distance of the re-found quad's corners from the crop corners;
   ~0 px means our quad + affine reproduce build_data.py's geometry.
3. Speed: paste one 512 px crop into a 2000 x 2000 photo.

    .venv/bin/python benchmarks/paste_roundtrip.py [--data ../shared/data] [--val 100] [--save out/paste]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from clrface.bench import time_ms
from clrface.data.io import data_root, list_images, load_image, save_image
from clrface.faces.align import align_affine, align_faces, apply_affine, crop_corners, ffhq_quad, warp_face
from clrface.faces.detect import detect_faces
from clrface.faces.paste import paste_faces, paste_mask


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def round_trip(data: Path, size: int, save: Path | None) -> None:
    """Default = build_data's bilinear warp + bilinear paste; bicubic = bicubic warp + cubic-spline paste."""
    print(f"== round trip, crop {size} px: {data / 'real_lq/whole'}")
    print(f"{'photo':26s} {'HxW':>10s} faces changed_outside psnr_in_mask_dB(bilinear) (bicubic) "
          "(tool: bilinear align, bicubic paste) paste_s")
    for path in list_images(data / "real_lq" / "whole"):
        photo = load_image(path)
        aligned = align_faces(photo, size)
        affines = [a.affine for _, a in aligned]
        dt = time_ms(lambda: paste_faces(photo, [c for c, _ in aligned], affines), 1, warmup=0) / 1e3
        out = paste_faces(photo, [c for c, _ in aligned], affines)
        sharp_crops = [warp_face(photo, m, size, resample="bicubic") for m in affines]
        sharp = paste_faces(photo, sharp_crops, affines, interpolation="bicubic")
        # what `clrface restore` does: build_data's bilinear warp to align, bicubic paste back
        tool = paste_faces(photo, [c for c, _ in aligned], affines, interpolation="bicubic")
        mask = np.zeros(photo.shape[:2], bool)
        for m in affines:
            mask |= paste_mask(photo.shape[:2], m, affine_size=size) > 0
        changed_outside = int(np.any(out != photo, axis=2)[~mask].sum() + np.any(sharp != photo, axis=2)[~mask].sum())
        p = psnr(out[mask], photo[mask]) if mask.any() else float("nan")
        p2 = psnr(sharp[mask], photo[mask]) if mask.any() else float("nan")
        p3 = psnr(tool[mask], photo[mask]) if mask.any() else float("nan")
        print(f"{path.name:26s} {photo.shape[0]:>4d}x{photo.shape[1]:<5d} {len(aligned):5d} {changed_outside:15d}"
              f" {p:26.2f} {p2:9.2f} {p3:9.2f} {dt:7.3f}")
        if save is not None:
            save_image(save / f"{path.stem}_roundtrip.png", out)


def identity(data: Path, n: int) -> None:
    files = [p for p in list_images(data / "faces128" / "val")][:n]
    errs, offs, missed = [], [], 0
    target = crop_corners(128)
    for path in files:
        img = load_image(path)
        up = np.asarray(Image.fromarray(img).resize((256, 256), Image.Resampling.BICUBIC))
        faces = detect_faces(up)
        if not faces:
            missed += 1
            continue
        # the face nearest the centre, as build_data chose it
        f = min(faces, key=lambda f: np.sum(((f.box[:2] + f.box[2:]) / 2 - 128) ** 2))
        lm = (f.landmarks68 + 0.5) / 2 - 0.5  # 256 px -> 128 px, centre coordinates
        quad = ffhq_quad(lm)
        errs.append(np.linalg.norm(quad - target, axis=1).mean())
        offs.append([*(quad.mean(0) - target.mean(0)), np.linalg.norm(quad[3] - quad[0]) - 128])
        # the same number through the affine: where align_affine sends the crop's own corners
        m = align_affine(quad, 128)
        assert np.allclose(apply_affine(m, quad), target, atol=1e-6)
    if not errs:
        return
    e = np.array(errs)
    print(f"== identity on faces128/val: {len(files)} faces, {missed} not re-detected")
    o = np.array(offs)
    print(f"signed bias: centre dx {o[:, 0].mean():+.2f} dy {o[:, 1].mean():+.2f} px, side {o[:, 2].mean():+.2f} px "
          f"(std {o[:, 0].std():.2f} {o[:, 1].std():.2f} {o[:, 2].std():.2f})")
    print(f"mean corner error {e.mean():.2f} px (median {np.median(e):.2f}, 90th pct {np.percentile(e, 90):.2f}) "
          "in 128 px crops")


def speed(data: Path, size: int) -> None:
    photo = load_image(data / "real_lq" / "whole" / "gfpgan_00.jpg")
    big = np.asarray(Image.fromarray(photo).resize((2000, 2000), Image.Resampling.BICUBIC))
    (crop, a), *_ = align_faces(big, size)
    dt = time_ms(lambda: paste_faces(big, [crop], [a.affine]), 3) / 1e3
    side = np.linalg.norm(a.quad[3] - a.quad[0])
    print(f"== speed: one {size} px face (quad {side:.0f} px) into 2000x2000: {dt:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=data_root(), help="the shared data folder (default: $CLRFACE_DATA)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--val", type=int, default=500, help="faces128/val images for the identity check")
    ap.add_argument("--save", type=Path, default=None, help="folder for the pasted photos")
    a = ap.parse_args()
    round_trip(a.data, a.size, a.save)
    identity(a.data, a.val)
    speed(a.data, a.size)


if __name__ == "__main__":
    main()
