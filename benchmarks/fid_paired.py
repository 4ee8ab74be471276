"""FID of two result folders of the same faces against one reference, and the paired bootstrap interval of the
difference (FID is a statistic of the whole set, so faces are resampled with the same draw for both).

    python benchmarks/fid_paired.py runs/bfr-irn-gpu2/IRNID runs/bfr-irn-default/IRNID \\
        [--ref ../shared/data/faces128/train] [--threads 2]

Images are matched by file name (both folders must hold the same names); the reference statistics are cached
(metrics/fid.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from clrface.data.io import data_root, image_batches, list_images
from clrface.metrics.bootstrap import paired_set_diff_ci
from clrface.metrics.fid import folder_stats, frechet_distance_of_set, inception_features, load_inception


def features(model: torch.nn.Module, files: list[Path]) -> np.ndarray:
    return np.concatenate([inception_features(model, batch) for batch in image_batches(files)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ref", default=str(data_root() / "faces128" / "train"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files_a = {f.name: f for f in list_images(args.a)}
    files_b = {f.name: f for f in list_images(args.b)}
    if set(files_a) != set(files_b):
        raise SystemExit(f"the folders hold different faces ({len(set(files_a) ^ set(files_b))} names differ)")
    names = sorted(files_a)
    model = load_inception()
    ref = folder_stats(args.ref, model)
    fa, fb = features(model, [files_a[n] for n in names]), features(model, [files_b[n] for n in names])

    def fid(feats: np.ndarray) -> float:
        return frechet_distance_of_set(feats, ref["mu"], ref["sigma"])

    d, lo, hi = paired_set_diff_ci(fid, fa, fb)
    print(f"{len(names)} faces, reference {args.ref}")
    print(f"FID {args.a}: {fid(fa):.2f}\nFID {args.b}: {fid(fb):.2f}")
    print(f"difference a - b: {d:+.2f} [{lo:+.2f}, {hi:+.2f}]")


if __name__ == "__main__":
    main()
