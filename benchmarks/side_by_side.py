"""Side-by-side crops of the same faces from several folders (e.g. input | model A | model B | GT), enlarged, for
looking at texture that a metric may miss (grids, halos, colour fringes):

    python benchmarks/side_by_side.py runs/testset-val-bfr/lq runs/a/IRNID runs/b/IRNID runs/testset-val-bfr/gt \\
        --labels input A B GT --start 100 --count 5 --out docs/x.png

Faces are taken by file name from the first folder (sorted); each column shows the same centre square of every face.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from clrface.bench import hstack, labelled, vstack


def centre_crop(path: Path, share: float, zoom: int) -> np.ndarray:
    """The centre ``share`` of the image's side, enlarged ``zoom`` times with nearest neighbours (pixels stay
    pixels, so a grid in the output stays visible)."""
    im = Image.open(path).convert("RGB")
    side = round(min(im.size) * share)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    crop = im.crop((left, top, left + side, top + side))
    return np.asarray(crop.resize((side * zoom, side * zoom), Image.Resampling.NEAREST))


def side_by_side(folders: list[Path], labels: list[str], names: list[str], share: float, zoom: int) -> Image.Image:
    """One row per face, one column per folder; the labels above the first row."""
    return vstack([hstack([labelled(centre_crop(f / n, share, zoom), lab if i == 0 else "")
                           for f, lab in zip(folders, labels)]) for i, n in enumerate(names)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="image folders holding the same file names")
    ap.add_argument("--labels", nargs="+", help="one per folder (default: the folder names)")
    ap.add_argument("--names", nargs="+", help="file names to show (default: --count from --start, sorted)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--share", type=float, default=0.625, help="side of the centre square, share of the image")
    ap.add_argument("--zoom", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    labels = args.labels or [f.name for f in args.folders]
    if len(labels) != len(args.folders):
        ap.error(f"{len(args.folders)} folders but {len(labels)} labels")
    names = args.names or sorted(p.name for p in args.folders[0].iterdir())[args.start:args.start + args.count]
    missing = [str(f / n) for f in args.folders for n in names if not (f / n).is_file()]
    if missing:
        ap.error(f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(args.folders, labels, names, args.share, args.zoom).save(args.out)
    print(f"{args.out}: {len(names)} faces x {len(args.folders)} folders")


if __name__ == "__main__":
    main()
