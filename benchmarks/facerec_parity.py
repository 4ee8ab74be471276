"""Parity of the torch port of dlib's face-recognition ResNet with dlib itself, LFW verification, speed.

    nice -n 10 .venv/bin/python benchmarks/facerec_parity.py                # parity (200 val faces) + LFW + speed
    nice -n 10 .venv/bin/python benchmarks/facerec_parity.py --fit-landmarks 1000   # refit FFHQ_LANDMARKS5

Parity: every face of ``faces128/val`` is upsampled x4 (bicubic, 512 px) for dlib's HOG detector and 5-point
shape predictor; dlib's chip (``dlib.get_face_chip``, 150 px, padding 0.25) goes through dlib and through the port
(network parity), and the port's fixed FFHQ warp of the 128 px crop is compared with dlib's landmark-based
descriptor (``compute_face_descriptor(img512, shape)``).
LFW: View-2 pairs of ``lfw128`` at 128 px, 10 folds, cosine similarity, and the same after bicubic x8
degradation (128 -> 16 -> 128).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import dlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clrface.bench import machine, time_ms
from clrface.data.io import data_root, to_model_range
from clrface.identity.facerec import (
    DlibFaceRecognizer,
    dlib_models_dir,
    identity_loss,
    load_facerec,
)
from clrface.metrics.verification import rank_k_accuracy, verification_accuracy

DATA = data_root()
UP = 4  # dlib's HOG detector and shape predictor want faces larger than our 128 px crops


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _to_tensor(imgs: list[np.ndarray]) -> torch.Tensor:
    return to_model_range(np.stack(imgs))


class _Dlib:
    def __init__(self) -> None:
        m = dlib_models_dir()
        self.dlib = dlib
        self.det = dlib.get_frontal_face_detector()
        self.sp = dlib.shape_predictor(str(m / "shape_predictor_5_face_landmarks.dat"))
        self.rec = dlib.face_recognition_model_v1(str(m / "dlib_face_recognition_resnet_model_v1.dat"))

    def boxes(self, big: list[np.ndarray]) -> tuple[list, int]:
        """Detection per image; undetected faces get the mean detected box (the crops are aligned)."""
        found = []
        for im in big:
            d = self.det(im, 0)
            found.append(d[0] if len(d) else None)
        ok = [b for b in found if b is not None]
        mean = np.mean([[b.left(), b.top(), b.right(), b.bottom()] for b in ok], 0).round().astype(int)
        fallback = self.dlib.rectangle(*map(int, mean))
        return [b if b is not None else fallback for b in found], len(found) - len(ok)


def fit_landmarks(n: int) -> None:
    """Mean landmarks of FFHQ crops in unit coordinates: dlib 5-point (``facerec.FFHQ_LANDMARKS5``) and the
    ArcFace 5 points from dlib's 68-point model (``arcface.FFHQ_ARCFACE5``)."""
    files = sorted((DATA / "faces128/train").glob("*.jpg"))
    files = [files[i] for i in np.random.default_rng(0).choice(len(files), n, replace=False)]
    dl = _Dlib()
    sp68 = dl.dlib.shape_predictor(str(dlib_models_dir() / "shape_predictor_68_face_landmarks.dat"))
    pts, arc = [], []
    s = 128 * UP
    for f in files:
        im = np.asarray(Image.fromarray(_load(f)).resize((s, s), Image.BICUBIC))
        d = dl.det(im, 0)
        if not len(d):
            continue
        pts.append([((p.x + 0.5) / s, (p.y + 0.5) / s) for p in dl.sp(im, d[0]).parts()])
        q = (np.array([(p.x, p.y) for p in sp68(im, d[0]).parts()], float) + 0.5) / s
        arc.append([q[36:42].mean(0), q[42:48].mean(0), q[30], q[48], q[54]])
    print(f"fit: {len(pts)}/{n} faces of faces128/train detected (x{UP} bicubic)")
    # Mirror pairs (x -> 1 - x): dlib parts 0<->2, 1<->3; ArcFace eyes 0<->1, mouth corners 3<->4.
    for name, p, perm in (("FFHQ_LANDMARKS5", np.array(pts), [2, 3, 0, 1, 4]),
                          ("FFHQ_ARCFACE5", np.array(arc), [1, 0, 2, 4, 3])):
        mean = p.mean(0)
        mirrored = mean[perm] * [-1, 1] + [1, 0]
        print(f"{name} = (  # mean, then the mirror-symmetrised mean")
        for (x, y), (sx, sy), (mx, my) in zip(mean, p.std(0), (mean + mirrored) / 2):
            print(f"    ({x:.4f}, {y:.4f}),  # std ({sx:.4f}, {sy:.4f}); symmetric ({mx:.4f}, {my:.4f})")
        print(")")


def parity(fr: DlibFaceRecognizer, n: int) -> None:
    files = sorted((DATA / "faces128/val").glob("*.jpg"))[:n]
    small = [_load(f) for f in files]
    big = [np.asarray(Image.fromarray(im).resize((128 * UP,) * 2, Image.BICUBIC)) for im in small]
    dl = _Dlib()
    boxes, missed = dl.boxes(big)
    shapes = [dl.sp(im, b) for im, b in zip(big, boxes)]
    chips = [dl.dlib.get_face_chip(im, sh, 150, 0.25) for im, sh in zip(big, shapes)]
    ref_chip = np.array([np.array(dl.rec.compute_face_descriptor(c)) for c in chips])
    ref_img = np.array([np.array(dl.rec.compute_face_descriptor(im, sh)) for im, sh in zip(big, shapes)])
    lm = torch.tensor([[((p.x + 0.5) / (128 * UP), (p.y + 0.5) / (128 * UP)) for p in sh.parts()] for sh in shapes])
    with torch.no_grad():
        port_chip = torch.cat([fr.descriptor_from_chip(_to_tensor(chips[i : i + 50])) for i in range(0, n, 50)])
        x = _to_tensor(small)
        e_fixed = torch.cat([fr.embed(x[i : i + 50]) for i in range(0, n, 50)])
        e_lm = torch.cat([fr.embed_chip(fr.chip(x[i : i + 50], lm[i : i + 50])) for i in range(0, n, 50)])

    def cos(a: torch.Tensor | np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return F.cosine_similarity(a, b, dim=-1).numpy()

    def line(name: str, c: np.ndarray) -> None:
        print(f"  {name}: cos mean {c.mean():.6f}  min {c.min():.6f}  p5 {np.percentile(c, 5):.6f}")

    print(f"parity on {n} faces of faces128/val ({missed} without HOG detection -> mean box), "
          f"dlib {dl.dlib.__version__}")
    print(f"  dlib descriptor from its chip vs from (image, shape): max |diff| {np.abs(ref_chip - ref_img).max():.2e}")
    c = cos(port_chip, ref_chip)
    line("NETWORK port vs dlib, identical dlib chip", c)
    print(f"    max |descriptor diff| {np.abs(port_chip.numpy() - ref_chip).max():.2e}; "
          f"faces with cos >= 0.999: {(c >= 0.999).sum()}/{n}")
    line("port fixed FFHQ warp (128 px) vs dlib landmark chip", cos(e_fixed, ref_img))
    line("port landmark warp (128 px, same landmarks) vs dlib", cos(e_lm, ref_img))
    e = F.normalize(torch.from_numpy(ref_img), dim=-1)
    off = (e @ e.T)[~torch.eye(n, dtype=torch.bool)]
    print(f"  scale: dlib cos between different val faces mean {off.mean():.4f}, p99 {off.quantile(0.99):.4f}")


def _lfw_pairs() -> tuple[list[tuple[str, str]], np.ndarray]:
    lines = (DATA / "lfw128/pairs.txt").read_text().split("\n")[1:]
    pairs, same = [], []
    for ln in lines:
        t = ln.split()
        if len(t) == 3:
            pairs.append((f"{t[0]}/{t[0]}_{int(t[1]):04d}.jpg", f"{t[0]}/{t[0]}_{int(t[2]):04d}.jpg"))
            same.append(True)
        elif len(t) == 4:
            pairs.append((f"{t[0]}/{t[0]}_{int(t[1]):04d}.jpg", f"{t[2]}/{t[2]}_{int(t[3]):04d}.jpg"))
            same.append(False)
    return pairs, np.array(same)


def degrade_x8(x: torch.Tensor) -> torch.Tensor:
    """Bicubic x8: 128 -> 16 (antialiased) -> 128. x: [B,3,128,128] in [-1,1]."""
    lo = F.interpolate(x, scale_factor=1 / 8, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(lo, scale_factor=8, mode="bicubic", align_corners=False).clamp(-1, 1)


def lfw(fr: DlibFaceRecognizer, batch: int = 64) -> None:
    pairs, same = _lfw_pairs()
    names = sorted({p for pr in pairs for p in pr})
    index = {n: i for i, n in enumerate(names)}
    embs = {"clean": [], "bicubic x8": []}
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(names), batch):
            x = _to_tensor([_load(DATA / "lfw128" / n) for n in names[i : i + batch]])
            embs["clean"].append(fr.embed(x))
            embs["bicubic x8"].append(fr.embed(degrade_x8(x)))
    print(f"LFW View 2: {len(pairs)} pairs, {len(names)} images at 128 px, embedded in {time.time() - t0:.0f} s")
    a = np.array([index[p[0]] for p in pairs])
    b = np.array([index[p[1]] for p in pairs])
    ids = np.array([n.split("/")[0] for n in names])
    # Rank-k: gallery = first image of every identity with >= 2 images, probes = its other images.
    first = {}
    for i, who in enumerate(ids):
        first.setdefault(who, i)
    counts = Counter(ids.tolist())
    multi = {w for w, c in counts.items() if c >= 2}
    gal = np.array([first[w] for w in sorted(multi)])
    probe = np.array([i for i, w in enumerate(ids) if w in multi and first[w] != i])
    for name, chunks in embs.items():
        e = torch.cat(chunks)
        sim = (e[a] * e[b]).sum(-1)
        acc, sd = verification_accuracy(sim, same, 10)
        rk = rank_k_accuracy(e[gal], ids[gal], e[probe], ids[probe], (1, 5))
        print(f"  {name:>10}: verification accuracy {acc * 100:.2f} +- {sd * 100:.2f} %  "
              f"(matched cos {sim[same].mean():.3f}, mismatched {sim[~same].mean():.3f});  "
              f"rank-1 {rk[1] * 100:.1f} %, rank-5 {rk[5] * 100:.1f} % ({len(gal)} gallery ids, {len(probe)} probes)")
    e_c, e_d = torch.cat(embs["clean"]), torch.cat(embs["bicubic x8"])
    print(f"  identity loss (Eq. 11) clean vs its x8 degradation: mean {identity_loss(e_d, e_c).mean():.4f}")


def speed(fr: DlibFaceRecognizer) -> None:
    x = torch.rand(16, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        fwd = time_ms(lambda: fr.embed(x), 5)
    xg = x.clone().requires_grad_()
    bwd = time_ms(lambda: identity_loss(fr.embed(xg), fr.embed(x).detach()).sum().backward(), 3, warmup=0)
    print(f"speed ({machine()}): embed batch 16 @128 px: {fwd:.0f} ms (no grad), {bwd:.0f} ms forward+backward to "
          "the image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="val faces for the dlib parity check")
    ap.add_argument("--fit-landmarks", type=int, default=0, metavar="N", help="refit FFHQ_LANDMARKS5 on N train faces")
    ap.add_argument("--skip", nargs="*", default=[], choices=["parity", "lfw", "speed"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fit_landmarks:
        fit_landmarks(args.fit_landmarks)
        return
    fr = load_facerec()
    if "speed" not in args.skip:
        speed(fr)
    if "parity" not in args.skip:
        parity(fr, args.n)
    if "lfw" not in args.skip:
        lfw(fr)


if __name__ == "__main__":
    main()
