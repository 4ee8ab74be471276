"""Face detection recall and time on synthetic group photos of 2.5-12 MP, and counts on real photos.

Synthetic group photo: a mosaic of ``real_lq/whole`` photos (their own faces blurred out first, so
every face in the picture is a pasted one) upscaled to the target size, with 20-40 aligned crops
from ``faces128/val`` and ``lfw128`` pasted (feathered edges) at face-box widths of 32-48 px
(three quarters) and 64-160 px (one quarter). Ground truth = the pasted crop's face box (the mean
dlib HOG box of a 128 px FFHQ crop: x 0.21-0.80, y 0.27-0.86 of the crop side). Variant ``old``:
the same photo blurred (sigma 1 px), with noise (sigma 3) and JPEG quality 60.

A detection matches a pasted face at IoU >= 0.4 (greedy, best IoU first); ``extra`` counts the
unmatched detections per photo. Time is wall-clock per photo including the 68-point landmarks.

Methods: ``single-call`` = one detector call without tiling (photo shrunk to 2.5 MP, dlib upsampling only
while the upsampled copy stays under 2.5 MP); ``hog`` / ``cnn`` = ``detect_faces`` default
(multi-scale passes in overlapping tiles, faces down to ``--min-face`` px) with dlib's HOG or MMOD;
``hog-unconfirmed`` = ``hog`` keeping weak boxes that the CNN does not confirm (``confirm_weak=False``).
The MMOD CNN costs ~6 s per scaled megapixel on one core, so it runs on ``--cnn-photos`` photos
of the smallest size only.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detect_recall.py [--data DIR] \\
        [--sizes 2.5 6 12] [--photos 3] [--cnn-photos 1] [--seed 0] [--skip-real]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detect_recall.py --memory   # peak memory only
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from clrface.data.io import data_root
from clrface.faces.detect import DETECT_MAX_PIXELS, DETECT_MIN_FACE, detect_faces

#: Mean dlib HOG box of an FFHQ-aligned crop, as fractions of the crop side (faces128/val at 512 px).
REL_BOX = np.array([0.21, 0.272, 0.796, 0.856])


def single_call_search(img: np.ndarray, detector: str) -> np.ndarray:
    """Boxes of the detector as it was before tiling (auto-upsampling capped at 2.5 MP)."""
    h, w = img.shape[:2]
    s = min(1.0, float(np.sqrt(DETECT_MAX_PIXELS / (h * w))))
    hs, ws = round(h * s), round(w * s)
    n = 0
    while max(hs, ws) * 2**n < 640 and n < 2 and hs * ws * 4 ** (n + 1) <= DETECT_MAX_PIXELS:
        n += 1
    faces = detect_faces(img, upsample=n, detector=detector)
    if not faces and hs * ws * 4 ** (n + 1) <= DETECT_MAX_PIXELS:
        faces = detect_faces(img, upsample=n + 1, detector=detector)
    return np.array([f.box for f in faces]).reshape(-1, 4)


def run(method: str, img: np.ndarray, min_face: float) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    if method == "single-call":
        boxes = single_call_search(img, "hog")
    elif method == "hog-unconfirmed":  # every HOG box, weak ones not shown to the CNN
        boxes = np.array([f.box for f in detect_faces(img, min_face=min_face, confirm_weak=False)]).reshape(-1, 4)
    else:
        boxes = np.array([f.box for f in detect_faces(img, detector=method, min_face=min_face)]).reshape(-1, 4)
    return boxes, time.perf_counter() - t


def _area(b: np.ndarray) -> np.ndarray:
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] IoU of boxes a [N, 4] and b [M, 4]."""
    iw = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(0)
    ih = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])).clip(0)
    inter = iw * ih
    return inter / (_area(a)[:, None] + _area(b)[None, :] - inter)


def match(gt: np.ndarray, det: np.ndarray, thr: float = 0.4) -> np.ndarray:
    """[len(gt)] bool: which ground-truth boxes a detection matches (greedy one-to-one)."""
    hit = np.zeros(len(gt), bool)
    if len(gt) == 0 or len(det) == 0:
        return hit
    m = iou(gt, det)
    used = np.zeros(len(det), bool)
    for flat in np.argsort(-m, axis=None):
        i, j = np.unravel_index(flat, m.shape)
        if m[i, j] < thr:
            break
        if not hit[i] and not used[j]:
            hit[i] = used[j] = True
    return hit


def faceless_backgrounds(data: Path) -> list[Image.Image]:
    """real_lq/whole photos with every face any detector finds blurred out (box enlarged x1.8)."""
    out = []
    for p in sorted((data / "real_lq" / "whole").iterdir()):
        im = Image.open(p).convert("RGB")
        a = np.asarray(im)
        boxes = [f.box for f in detect_faces(a, min_face=20)]
        boxes += [f.box for f in detect_faces(a, upsample=0, detector="cnn")]
        blurred = im.filter(ImageFilter.GaussianBlur(12))
        mask = Image.new("L", im.size, 0)
        for x0, y0, x1, y1 in boxes:
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, 0.9 * max(x1 - x0, y1 - y0)
            mask.paste(255, (int(cx - r), int(cy - r * 1.2), int(cx + r), int(cy + r * 1.2)))
        out.append(Image.composite(blurred, im, mask.filter(ImageFilter.GaussianBlur(4))))
    return out


def face_files(data: Path) -> list[Path]:
    val = sorted((data / "faces128" / "val").glob("*.jpg"))
    lfw = sorted((data / "lfw128").glob("*/*.jpg"))
    return val + lfw[:: max(1, len(lfw) // len(val))][: len(val)]


def group_photo(rng: np.random.Generator, mp: float, backgrounds: list[Image.Image], faces: list[Path],
                ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [H, W, 3] photo of ~mp megapixels at 3:2, [N, 4] ground-truth face boxes)."""
    w = round(np.sqrt(mp * 1e6 * 1.5))
    h = round(w / 1.5)
    canvas = Image.new("RGB", (w, h))
    k = int(rng.integers(1, 4))  # k x k mosaic of upscaled photos
    for i in range(k):
        for j in range(k):
            x0, x1, y0, y1 = w * j // k, w * (j + 1) // k, h * i // k, h * (i + 1) // k
            bg = backgrounds[int(rng.integers(len(backgrounds)))]
            canvas.paste(bg.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC), (x0, y0))
    n = int(rng.integers(20, 41))
    taken: list[tuple[int, int, int]] = []
    gt = []
    for _ in range(n):
        fw = rng.uniform(32, 48) if rng.random() < 0.75 else rng.uniform(64, 160)
        side = round(fw / (REL_BOX[2] - REL_BOX[0]))
        for _try in range(200):  # place without overlapping an earlier crop
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            if all(x + side <= a or a + s <= x or y + side <= b or b + s <= y for a, b, s in taken):
                break
        else:
            continue
        taken.append((x, y, side))
        crop = Image.open(faces[int(rng.integers(len(faces)))]).convert("RGB")
        crop = crop.resize((side, side), Image.Resampling.LANCZOS)
        r = np.arange(side)
        d = np.minimum.reduce(np.meshgrid(r, r) + np.meshgrid(r[::-1], r[::-1]))  # distance to the crop's edge
        alpha = Image.fromarray((255 * np.clip(d / (0.12 * side), 0, 1)).astype(np.uint8))
        canvas.paste(crop, (x, y), alpha)
        gt.append(REL_BOX * side + np.array([x, y, x, y]))
    return np.asarray(canvas), np.array(gt)


def degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 'old photo': Gaussian blur sigma 1 px, noise sigma 3, JPEG quality 60."""
    im = Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.0))
    a = np.asarray(im).astype(np.float32) + rng.normal(0, 3, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=60)
    return np.asarray(Image.open(buf).convert("RGB"))


def _vm(key: str) -> float:
    """MB of a /proc/self/status field (VmRSS: now, VmHWM: peak since the last reset)."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))
    return int(line.split()[1]) / 1024


def memory(data: Path, sizes: list[float]) -> None:
    """Peak RSS of the default HOG search above the RSS before it, per photo size (Linux)."""
    src = Image.open(data / "real_lq" / "whole" / "codeformer_02.png").convert("RGB")
    detect_faces(np.asarray(src)[:200, :200])  # load the models first
    for mp in sizes:
        w = round(np.sqrt(mp * 1e6 * 1.5))
        img = np.asarray(src.resize((w, round(w / 1.5)), Image.Resampling.BICUBIC))
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _vm("VmRSS")
        t = time.perf_counter()
        n = len(detect_faces(img))
        print(f"{mp:g} MP ({img.shape[1]} x {img.shape[0]}), hog: {n} faces in {time.perf_counter() - t:.1f} s; "
              f"RSS {before:.0f} MB before, peak during the search +{_vm('VmHWM') - before:.0f} MB")
        del img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=data_root(), help="the shared data folder (CLRFACE_DATA)")
    ap.add_argument("--sizes", type=float, nargs="+", default=[2.5, 6.0, 12.0], help="photo sizes, megapixels")
    ap.add_argument("--photos", type=int, default=3, help="synthetic photos per size")
    ap.add_argument("--cnn-photos", type=int, default=1, help="photos of the smallest size also run with the CNN")
    ap.add_argument("--min-face", type=float, default=DETECT_MIN_FACE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--memory", action="store_true", help="only: peak memory of the HOG search at --sizes")
    args = ap.parse_args()
    if args.memory:
        memory(args.data, args.sizes)
        return

    print("command: OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv))
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.machine())
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
          f"python {platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    rng = np.random.default_rng(args.seed)
    backgrounds = faceless_backgrounds(args.data)
    faces = face_files(args.data)

    rows: dict[tuple, list] = {}
    for mp in args.sizes:
        for k in range(args.photos):
            img, gt = group_photo(rng, mp, backgrounds, faces)
            small = (gt[:, 2] - gt[:, 0]) < 56
            for variant, im in (("clean", img), ("old", degrade(img, rng))):
                methods = ["single-call", "hog-unconfirmed", "hog"]
                methods += ["cnn"] if mp == min(args.sizes) and k < args.cnn_photos else []
                for method in methods:
                    det, sec = run(method, im, args.min_face)
                    hit = match(gt, det)
                    r = rows.setdefault((mp, variant, method), [])
                    r.append((hit[small].sum(), small.sum(), hit[~small].sum(), (~small).sum(),
                              len(det) - hit.sum(), sec))
                    print(f"  {mp} MP #{k} {variant:5s} {method:6s} {img.shape[1]}x{img.shape[0]} faces {len(gt)} "
                          f"found {hit.sum()} extra {len(det) - hit.sum()} {sec:.1f} s", file=sys.stderr, flush=True)

    print(f"\nSynthetic group photos (min face {args.min_face:g} px, seed {args.seed}):\n")
    print("| photo | variant | method | photos | faces | recall 32-48 px | recall 64-160 px "
          "| extra / photo | s / photo |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (mp, variant, method), r in rows.items():
        a = np.array(r, np.float64)
        print(f"| {mp:g} MP | {variant} | {method} | {len(a)} | {int(a[:, 1].sum() + a[:, 3].sum())} "
              f"| {a[:, 0].sum() / a[:, 1].sum():.3f} | {a[:, 2].sum() / max(a[:, 3].sum(), 1):.3f} "
              f"| {a[:, 4].mean():.1f} | {a[:, 5].mean():.1f} |")

    if args.skip_real:
        return
    print("\nreal_lq/whole: faces found (seconds)\n")
    print("| photo | W x H | single-call | hog | cnn |")
    print("|---|---|---|---|---|")
    for p in sorted((args.data / "real_lq" / "whole").iterdir()):
        img = np.asarray(Image.open(p).convert("RGB"))
        cells = []
        for method in ("single-call", "hog", "cnn"):
            det, sec = run(method, img, args.min_face)
            cells.append(f"{len(det)} ({sec:.1f})")
        print(f"| {p.name} | {img.shape[1]} x {img.shape[0]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
