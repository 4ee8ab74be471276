"""Learning curves of a training run: validation figures of ``log.csv`` against images seen, one panel each.

    python benchmarks/learning_curve.py runs/irn-128-real/log.csv --batch 16 \
        --metrics val/id_cos val/perc val/psnr --out docs/irn-learning-curve.png

``images seen`` = step x batch (x processes, ``--world``). Several logs (e.g. runs resumed into new folders) are
drawn one after the other with ``--offset`` steps for each. Drawn with PIL (no plotting library needed); the
numbers are also printed as a markdown table.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from clrface.bench import markdown_table

W, H, PAD = 360, 240, 44


def read_log(path: Path, metrics: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from an engine ``log.csv`` (columns step, elapsed_s, name, value)."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["name"] in metrics:
                out[row["name"]].append((int(row["step"]), float(row["value"])))
    return out


def panel(title: str, points: list[tuple[float, float]]) -> Image.Image:
    """One line chart, axes labelled with the value range and the images seen."""
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((PAD, 6), title, fill="black")
    if not points:
        return im
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-9
    box = (PAD, 24, W - 12, H - 28)
    d.rectangle(box, outline="gray")

    def xy(x: float, y: float) -> tuple[float, float]:
        return (box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]), box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]))

    d.line([xy(x, y) for x, y in points], fill=(200, 40, 40), width=2)
    for x, y in points:
        cx, cy = xy(x, y)
        d.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=(200, 40, 40))
    d.text((2, box[1]), f"{y1:.4g}", fill="black")
    d.text((2, box[3] - 10), f"{y0:.4g}", fill="black")
    d.text((box[0], box[3] + 6), f"{x0:,.0f}", fill="black")
    d.text((box[2] - 70, box[3] + 6), f"{x1:,.0f} images", fill="black")
    return im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="log.csv files, drawn one after the other")
    ap.add_argument("--batch", type=int, required=True, help="images per step and process")
    ap.add_argument("--world", type=int, default=1, help="processes")
    ap.add_argument("--offset", type=int, nargs="*", default=None, help="steps before each log (default 0)")
    ap.add_argument("--metrics", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args()
    offsets = args.offset or [0] * len(args.logs)
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for log, off in zip(args.logs, offsets):
        for m, pts in read_log(Path(log), args.metrics).items():
            series[m] += [((off + s) * args.batch * args.world, v) for s, v in pts]
    panels = [panel(m, series[m]) for m in args.metrics]
    sheet = Image.new("RGB", (W * len(panels), H), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, (i * W, 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    steps = sorted({x for m in args.metrics for x, _ in series[m]})
    table = [[f"{x:,.0f}", *(dict(series[m]).get(x, float("nan")) for m in args.metrics)] for x in steps]
    print(markdown_table(["images seen", *args.metrics], table, fmt=".4f"))


if __name__ == "__main__":
    main()
