"""Grows a trained conv IRN into a larger one that starts as exactly the same function, as the ``init_from`` of a
capacity comparison at equal starting quality: more residual blocks per level (``identity.irn.deepened``) and/or
more channels per level (``identity.irn.widened``):

    python benchmarks/grow_irn.py src/clrface/weights/default/irn runs/irn-deep-init --blocks 1 2 8
    python benchmarks/grow_irn.py src/clrface/weights/default/irn runs/irn-wide-init --channels 48 96 192
"""

from __future__ import annotations

import argparse

from clrface.checkpoint import save_checkpoint
from clrface.identity.irn import deepened, load_irn, widened


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="IRN checkpoint folder")
    ap.add_argument("dst", help="output checkpoint folder")
    ap.add_argument("--blocks", type=int, nargs="+", help="residual blocks per level (default: the source's)")
    ap.add_argument("--channels", type=int, nargs="+", help="channels per level (default: the source's)")
    args = ap.parse_args()
    if not (args.blocks or args.channels):
        ap.error("give --blocks, --channels or both")
    small = load_irn(args.src)
    big = small
    if args.blocks:
        big = deepened(big, tuple(args.blocks))
    if args.channels:
        big = widened(big, tuple(args.channels))
    save_checkpoint(args.dst, big, big.cfg, "irn")
    n = [sum(p.numel() for p in m.parameters()) for m in (small, big)]
    print(f"{args.src} ({n[0] / 1e6:.2f} M parameters, channels {small.cfg.channels}, blocks {small.cfg.blocks}) -> "
          f"{args.dst} ({n[1] / 1e6:.2f} M, channels {big.cfg.channels}, blocks {big.cfg.blocks})")


if __name__ == "__main__":
    main()
