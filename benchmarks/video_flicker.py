"""Temporal flicker of video restoration, with and without stabilisation.

    python benchmarks/video_flicker.py --out runs/video-flicker                     # irn, prior, full
    python benchmarks/video_flicker.py --modes irn --frames 12 --out runs/vf-quick

The clip is built from one still photo (default: the public-domain astronaut portrait, ``clrface.demo.demo_image``,
resized to ``--size``): the photo is degraded once with the bfr preset at ``--seed`` (its spatial ranges scaled
to the face's FFHQ quad side, so they mean what they mean for a 512 px face crop), then frame t is that degraded
photo translated by a known offset (dx_t, dy_t) = (2 sin(2 pi t / 12), sin(2 pi t / 8)) px, rounded (cubic
spline with --subpixel) plus fresh Gaussian noise of std ``--noise`` (0-255 scale). A static scene under a moving
camera: after undoing the known motion, every frame should be the same, so whatever changes from frame to frame
is flicker.

Each mode (``--modes``; the shipped default model's options otherwise) restores the clip twice through
``clrface.video.VideoRestorer`` (in memory, no codec in the loop): ``--no-stabilize`` (each frame an independent
photo, ``Restorer.restore_image``) and stabilised (tracking, quad smoothing, per-track noise, latent blend,
temporal blend). Columns:

* flicker: mean |U_t - U_{t-1}| (0-255, RGB) over t >= 1 and over the face region, U_t = frame t shifted back by
  (-dx_t, -dy_t) (cubic spline). Face region: where the clean photo's paste mask is 1 (the inner crop of its
  FFHQ alignment, 2 px margin off the photo edge).
* IDS: mean over frames of the cosine of the dlib ResNet descriptors (clrface port) of U_t's aligned face and
  the clean photo's (both FFHQ-aligned with the clean photo's affine at the model's S px).
* PSNR: of U_t against the clean photo over the face region (dB, mean over frames).
* s/frame: wall time per frame (detection, restoration, paste) on this machine's one loaded core.

Offsets are rounded to whole pixels unless ``--subpixel``: undoing a whole-pixel shift is exact, while undoing a
fractional one (cubic spline, there and back) leaves a floor of ~1.1 grey levels on the sharp clean photo, which
would be counted as flicker.

Writes OUT/clip.mp4 (the input clip, H.264 CRF 17, for ``clrface restore``), OUT/<mode>-<stab|nostab>.mp4,
OUT/video_flicker.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clrface.bench import camera_offset, command_line, header, machine, markdown_table, shift_image, undo_camera_motion
from clrface.data.degradation import degrade, get_preset
from clrface.data.io import to_model_range
from clrface.demo import demo_image
from clrface.faces.align import align_faces, warp_face
from clrface.faces.paste import paste_mask
from clrface.restorer import Restorer
from clrface.video import StabilizeConfig, VideoRestorer, quad_side
from clrface.video_io import VideoWriter


def make_clip(clean: np.ndarray, frames: int, seed: int, noise: float, subpixel: bool = False
              ) -> tuple[list[np.ndarray], dict]:
    found = align_faces(clean, 512, max_faces=1)
    if not found:
        raise SystemExit("no face in the clean photo")
    side = int(round(quad_side(found[0][1].quad)))
    degraded, params = degrade(clean, get_preset("bfr", side), seed)
    rng = np.random.default_rng(seed + 1)
    clip = []
    for t in range(frames):
        f = shift_image(degraded, *camera_offset(t, subpixel)) + rng.normal(0, noise, degraded.shape).astype(np.float32)
        clip.append(np.clip(np.rint(f), 0, 255).astype(np.uint8))
    return clip, {"quad_side": side, "params": params.to_dict()}


def score(frames: list[np.ndarray], clean: np.ndarray, region: np.ndarray, affine: np.ndarray,
          restorer: Restorer, subpixel: bool = False) -> dict[str, float]:
    u = undo_camera_motion(frames, subpixel)
    flick = [float(np.abs(a - b)[region].mean()) for a, b in zip(u[1:], u[:-1])]
    s = restorer.resolution
    crops = [warp_face(np.clip(np.rint(f), 0, 255).astype(np.uint8), affine, s, resample="bicubic") for f in u]
    with torch.no_grad():
        e = restorer.embed(to_model_range(np.stack(crops)))
        e0 = restorer.embed(to_model_range(warp_face(clean, affine, s, resample="bicubic")[None]))
    ids = (e * e0).sum(-1)
    mse = [float(((f - clean.astype(np.float32)) ** 2)[region].mean()) for f in u]
    return {"flicker": float(np.mean(flick)), "flicker_std": float(np.std(flick)), "ids": float(ids.mean()),
            "ids_min": float(ids.min()), "psnr": float(np.mean([10 * np.log10(255**2 / m) for m in mse]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", help="a still photo with one face (default: the astronaut portrait)")
    ap.add_argument("--size", type=int, default=384, help="resize the photo's long side to this (default 384)")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--seed", type=int, default=5,
                    help="degradation seed (bfr preset; 5: x1.4 down, blur 2.1, noise 8.2, JPEG q53 at the "
                         "astronaut's 130 px face, found by dlib in every frame)")
    ap.add_argument("--noise", type=float, default=4.0, help="per-frame Gaussian noise std, 0-255 scale")
    ap.add_argument("--modes", default="irn,prior,full", help="comma-separated restore modes")
    ap.add_argument("--latent-blend-modes", default="prior",
                    help="diffusion modes that get a third run with StabilizeConfig(latent_blend=0.5)")
    ap.add_argument("--subpixel", action="store_true", help="fractional offsets (undoing them adds a blur floor)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/video-flicker")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    photo = np.asarray(Image.open(args.photo).convert("RGB")) if args.photo else demo_image()
    f = args.size / max(photo.shape[:2])
    w, h = round(photo.shape[1] * f) // 2 * 2, round(photo.shape[0] * f) // 2 * 2
    clean = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.LANCZOS))
    clip, deg = make_clip(clean, args.frames, args.seed, args.noise, args.subpixel)
    with VideoWriter(out / "clip.mp4", (w, h), Fraction(12)) as wr:
        for fr in clip:
            wr.write(fr)

    restorer = Restorer.from_pretrained(args.model)
    s = restorer.resolution
    found = align_faces(clean, s, max_faces=1, resample="bicubic")
    affine = found[0][1].affine
    region = paste_mask(clean.shape[:2], affine, affine_size=s) >= 1.0
    region[:2], region[-2:], region[:, :2], region[:, -2:] = False, False, False, False
    rows = {"input": score([c.astype(np.float32) for c in clip], clean, region, affine, restorer, args.subpixel)}

    def save() -> None:  # after every row: a long run killed midway keeps what it measured
        result = {"command": command_line(), "machine": machine(), "threads": args.threads,
                  "clip": {"size": [w, h], "frames": args.frames, "noise": args.noise, "degradation": deg},
                  "stabilize_config": dataclasses.asdict(StabilizeConfig()), "rows": rows}
        (out / "video_flicker.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"clip: {w}x{h}, {args.frames} frames, face quad {deg['quad_side']} px, region {int(region.sum())} px; "
          f"input: {rows['input']}", flush=True)
    for mode in args.modes.split(","):
        opts = restorer.options(mode=mode)
        runs = [("nostab", None), ("stab", StabilizeConfig())]
        if mode in args.latent_blend_modes.split(","):
            runs.append(("stab+lb0.5", StabilizeConfig(latent_blend=0.5)))
        for tag, cfg in runs:
            vr = VideoRestorer(restorer, opts, stabilize=cfg is not None, config=cfg or StabilizeConfig())
            t0 = time.perf_counter()
            res = [vr(fr) for fr in clip]
            sec = (time.perf_counter() - t0) / len(clip)
            name = f"{mode}-{tag}"
            with VideoWriter(out / f"{name}.mp4", (w, h), Fraction(12)) as wr:
                for img, _ in res:
                    wr.write(img)
            row = score([r.astype(np.float32) for r, _ in res], clean, region, affine, restorer, args.subpixel)
            row.update(s_per_frame=round(sec, 3), faces_per_frame=float(np.mean([n for _, n in res])),
                       sampling=vr.sampling)
            rows[name] = row
            save()
            print(name, row, flush=True)

    save()
    inp = rows["input"]["flicker"]
    table = [("input (degraded, noisy)", "–", f"{inp:.2f}", "1.00", f"{rows['input']['ids']:.4f}",
              f"{rows['input']['psnr']:.2f}", "–")]
    for name, r in rows.items():
        if name == "input":
            continue
        mode, stab = name.rsplit("-", 1)
        stab = {"nostab": "no", "stab": "yes"}.get(stab, stab.replace("stab+", "yes, "))
        table.append((mode, stab, f"{r['flicker']:.2f}", f"{r['flicker'] / inp:.2f}", f"{r['ids']:.4f}",
                      f"{r['psnr']:.2f}", f"{r['s_per_frame']:.2f}"))
    print("\n" + header() + "\n")
    print(markdown_table(["mode", "stabilised", "flicker ↓ (0-255)", "vs input", "IDS ↑", "PSNR face (dB)", "s/frame"],
                         table, align="llrrrrr"))
    for mode in args.modes.split(","):
        a, b = rows.get(f"{mode}-nostab"), rows.get(f"{mode}-stab")
        if a and b:
            print(f"{mode}: stabilised / unstabilised flicker = {b['flicker'] / a['flicker']:.3f}, "
                  f"IDS {b['ids']:.4f} vs {a['ids']:.4f}")


if __name__ == "__main__":
    main()
