"""Cheap CPU speed-ups measured one at a time: each variant against the same fp32 baseline.

    python benchmarks/speed_wins.py --model default --fast fast --threads 2 --reps 5

Variants, each timed on one aligned 128 px face (the demo portrait's) and on batches of ``--batches`` copies
(ms per face; the factor is against the fp32 baseline at the same batch), median of ``--reps`` (batches:
half as many) after a warm-up, in one process:
  baseline         fp32, contiguous (NCHW) weights
  bf16             the nets under bf16 autocast (``Restorer(dtype=bfloat16)``; sigma math stays fp32)
  channels_last    every conv net's weights in channels-last memory format
  compile          ``torch.compile`` of IRN, VQGAN and the prior's UNet (compile time reported separately)
for the workloads: the default restore (``restore_faces`` with the model's defaults), with ``--fast`` the full
pipeline (guided, mask, fidelity 0.5) on the distilled prior (Euler-1), with ``--heun`` the same on the teacher
(Heun-10).
Prints a markdown table (ms per face and the factor against the baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from clrface.bench import time_ms
from clrface.data.io import to_model_range
from clrface.demo import demo_image
from clrface.faces.align import align_faces
from clrface.identity.facerec import load_facerec
from clrface.restorer import Restorer


def conv_nets(r: Restorer) -> list[torch.nn.Module]:
    return [m for m in (r.irn, r.vqgan, r.prior, r.mask, r.facerec) if m is not None]


def variant(name: str, model: str, facerec: torch.nn.Module) -> tuple[Restorer, float]:
    """A restorer for the variant and its set-up seconds (compile is lazy: its cost shows in the warm-up)."""
    t = time.perf_counter()
    r = Restorer.from_pretrained(model, dtype=torch.bfloat16 if name == "bf16" else torch.float32, facerec=facerec)
    if name == "channels_last":
        for m in conv_nets(r):
            m.to(memory_format=torch.channels_last)
    if name == "compile":
        if r.irn is not None:
            r.irn = torch.compile(r.irn)
        r.vqgan.encoder = torch.compile(r.vqgan.encoder)
        r.vqgan.decoder = torch.compile(r.vqgan.decoder)
        r.prior.precond.net = torch.compile(r.prior.precond.net)
    return r, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--fast", help="model folder with the distilled prior (clrface train distill + pack --base)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="faces per restore_faces call")
    ap.add_argument("--heun", action="store_true", help="also time the teacher's full Heun-10 (slow: ~5 s per face)")
    ap.add_argument("--variants", nargs="*", default=["baseline", "bf16", "channels_last", "compile"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    facerec = load_facerec()
    crop = align_faces(demo_image(), 128, max_faces=1)[0][0]
    x1 = to_model_range(crop[None])
    full = dict(mode="full", fidelity=0.5)
    work = [("default restore", args.model, {})]
    if args.heun:
        work.append(("full, Heun-10 (19 guided NFE)", args.model, {**full, "steps": 10}))
    if args.fast:
        # the model's own defaults (restore.json): mode full, distilled Euler-1, its tone and octave
        work.append(("`--model fast` as shipped (1 guided NFE)", args.fast, {}))
    rows, base = [], {}
    for v in args.variants:
        for label, model, opts in work:
            t0 = time.perf_counter()
            r, setup = variant(v, model, facerec)
            o = r.options(**opts)
            cells = []
            for b in args.batches:
                x = x1.expand(b, -1, -1, -1).contiguous()
                ob = dataclasses.replace(o, batch_size=b)
                ms = time_ms(lambda: r.restore_faces(x, ob), args.reps if b == 1 else max(1, args.reps // 2))
                cells.append(ms / b)
            if v == "baseline":
                base[label] = cells
            ref = base.get(label, cells)
            total = time.perf_counter() - t0
            row = (f"| {label} | {v} | " + " | ".join(f"{c:.1f} ({b / c:.2f}×)" for c, b in zip(cells, ref))
                   + f" | {setup:.1f} s set-up, {total:.0f} s in all |")
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    heads = " | ".join(f"{b} face{'s' if b > 1 else ''}, ms per face (×)" for b in args.batches)
    print(f"| workload | variant | {heads} | cost |\n|---|---|" + "---|" * len(args.batches) + "---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
