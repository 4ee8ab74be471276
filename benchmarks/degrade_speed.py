"""Speed of the degradation: torch path (``degrade_batch``) per face, and the numpy path for comparison.

    python benchmarks/degrade_speed.py --threads 2 --faces ../shared/data/faces128/val

Faces are read from ``--faces`` (the shared 128-px set) and bicubic-upsampled to 512 px for the
512-px run, or are smooth synthetic images when no folder is given; content barely matters for
speed (JPEG of noisy low-res images is the only content-dependent step). Prints one line per size
and path with seconds per face (median over ``--repeats`` batches) under the machine header.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from clrface.bench import header, load_faces, time_ms
from clrface.data.degradation import degrade, degrade_batch, get_preset
from clrface.data.io import to_uint8


def load_batch(folder: str | None, n: int) -> torch.Tensor:
    """float [n, 3, 128, 128] in [-1, 1]."""
    if folder:
        return load_faces(folder, limit=n, size=128)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128), indexing="ij")
    base = torch.stack([torch.exp(-(xx**2 + yy**2) * k) for k in (1.0, 2.0, 3.0)]) * 2 - 1
    return base.expand(n, 3, 128, 128).clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", help="folder of aligned faces (default: synthetic images)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="bfr")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 128])
    ap.add_argument("--numpy", action="store_true", help="also time the numpy path (one face at a time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x128 = load_batch(args.faces, args.batch)
    dev = torch.device(args.device)
    print(header(dev, args.threads))
    print(f"batch={args.batch} preset={args.preset} repeats={args.repeats}")
    for size in args.sizes:
        x = F.interpolate(x128, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1).to(dev)
        cfg = get_preset(args.preset, size)
        g = torch.Generator().manual_seed(0)

        t = time_ms(lambda: degrade_batch(x, cfg, g), args.repeats, dev) / 1e3
        print(f"torch  {size:4d}px: {t / args.batch:.4f} s/face ({t:.3f} s per batch of {args.batch})")
        if args.numpy:
            imgs = to_uint8(x).numpy()
            rng = np.random.default_rng(0)
            t = time_ms(lambda: [degrade(im, cfg, rng) for im in imgs], args.repeats) / 1e3
            print(f"numpy  {size:4d}px: {t / args.batch:.4f} s/face ({t:.3f} s per {args.batch} faces)")


if __name__ == "__main__":
    main()
