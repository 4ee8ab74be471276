"""Grows a trained conv IRN by residual blocks that start as identity maps (``identity.irn.deepened``), as the
``init_from`` of a capacity comparison at equal starting quality:

    python benchmarks/deepen_irn.py src/clrface/weights/default/irn runs/irn-deep-init --blocks 1 2 8
"""

from __future__ import annotations

import argparse

from clrface.checkpoint import save_checkpoint
from clrface.identity.irn import deepened, load_irn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="IRN checkpoint folder")
    ap.add_argument("dst", help="output checkpoint folder")
    ap.add_argument("--blocks", type=int, nargs="+", required=True, help="residual blocks per level")
    args = ap.parse_args()
    small = load_irn(args.src)
    big = deepened(small, tuple(args.blocks))
    save_checkpoint(args.dst, big, big.cfg, "irn")
    n = [sum(p.numel() for p in m.parameters()) for m in (small, big)]
    print(f"{args.src} ({n[0] / 1e6:.2f} M parameters, blocks {small.cfg.blocks}) -> {args.dst} "
          f"({n[1] / 1e6:.2f} M, blocks {big.cfg.blocks})")


if __name__ == "__main__":
    main()
