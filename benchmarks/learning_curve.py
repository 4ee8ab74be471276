"""Learning curves of a training run: validation figures of ``log.csv`` against images seen, one panel each.

    python benchmarks/learning_curve.py runs/irn-128-real/log.csv --batch 16 \
        --metrics val/id_cos val/perc val/psnr --out docs/irn-learning-curve.png

``images seen`` = step x batch (x processes, ``--world``). Several logs (e.g. runs resumed into new folders) are
drawn one after the other with ``--offset`` steps for each; with ``--labels`` each log is its own line instead
(runs compared at equal images seen; a log labelled "start", e.g. the initial weights' validation, starts every
line). Drawn with PIL (no plotting library needed); the numbers are also printed as a markdown table.
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


COLOURS = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (150, 60, 170), (200, 130, 20)]


def panel(title: str, lines: dict[str, list[tuple[float, float]]]) -> Image.Image:
    """One chart of one or more labelled lines, axes labelled with the value range and the images seen."""
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((PAD, 6), title, fill="black")
    points = [p for pts in lines.values() for p in pts]
    if not points:
        return im
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-9
    box = (PAD, 24, W - 12, H - 28)
    d.rectangle(box, outline="gray")

    def xy(x: float, y: float) -> tuple[float, float]:
        return (box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]), box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]))

    for k, (label, pts) in enumerate(lines.items()):
        colour = COLOURS[k % len(COLOURS)]
        if len(pts) > 1:
            d.line([xy(x, y) for x, y in pts], fill=colour, width=2)
        for x, y in pts:
            cx, cy = xy(x, y)
            d.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
        if label:
            d.text((box[0] + 6, box[1] + 4 + 12 * k), label, fill=colour)  # one line each: labels vary in length
    d.text((2, box[1]), f"{y1:.4g}", fill="black")
    d.text((2, box[3] - 10), f"{y0:.4g}", fill="black")
    d.text((box[0], box[3] + 6), f"{x0:,.0f}", fill="black")
    d.text((box[2] - 70, box[3] + 6), f"{x1:,.0f} images", fill="black")
    return im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="log.csv files, drawn one after the other")
    ap.add_argument("--batch", type=int, nargs="+", required=True,
                    help="images per step and process (x gradient-accumulation steps): one, or one per log")
    ap.add_argument("--world", type=int, default=1, help="processes")
    ap.add_argument("--offset", type=int, nargs="*", default=None, help="steps before each log (default 0)")
    ap.add_argument("--labels", nargs="+", default=None, help="one per log: draw each log as its own line")
    ap.add_argument("--metrics", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args()
    offsets = args.offset or [0] * len(args.logs)
    labels = args.labels or [""] * len(args.logs)
    batches = args.batch * len(args.logs) if len(args.batch) == 1 else args.batch
    if len(labels) != len(args.logs) or len(batches) != len(args.logs):
        raise SystemExit("--labels and --batch need one value per log (--batch may also be one for all)")
    series: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for log, off, label, batch in zip(args.logs, offsets, labels, batches):
        for m, pts in read_log(Path(log), args.metrics).items():
            series[m][label] += [((off + s) * batch * args.world, v) for s, v in pts]
    for m in series:
        start = series[m].pop("start", [])
        for label in series[m]:
            series[m][label] = start + series[m][label]
    panels = [panel(m, series[m]) for m in args.metrics]
    sheet = Image.new("RGB", (W * len(panels), H), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, (i * W, 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    names = [(m, label) for m in args.metrics for label in series[m]]
    steps = sorted({x for m, label in names for x, _ in series[m][label]})
    table = [[f"{x:,.0f}", *(dict(series[m][label]).get(x, float("nan")) for m, label in names)] for x in steps]
    print(markdown_table(["images seen", *(f"{m} {label}".strip() for m, label in names)], table, fmt=".4f"))


if __name__ == "__main__":
    main()
