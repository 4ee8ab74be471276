"""How much of a widened IRN's restoration its new channels carry. ``identity.irn.widened`` starts the new channels
silent (the weights from them into the old channels are zero), so a widened IRN continued at a fine-tuning learning
rate may still compute almost what the narrow one does. This measures it on a test set's degraded faces: the rms
change of the output when those weights are zeroed again, as a share of the rms of the IRN's residual (output -
input):

    python benchmarks/irn_new_channels.py runs/snap-irn-wide15-a0-s80 --base src/clrface/weights/default/irn \\
        --testset runs/testset-val-bfr --limit 100
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from clrface.checkpoint import read_config
from clrface.data.datasets import load_face_folder
from clrface.data.io import to_model_range
from clrface.identity.irn import IRN, IRNConfig, load_irn


def silenced(wide: IRN, base: IRNConfig) -> IRN:
    """``wide`` with the weights from channels beyond ``base``'s into ``base``'s channels zeroed: the narrow IRN
    that ``wide`` still contains (``wide`` itself when it was just widened from an IRN of config ``base``)."""
    shapes = {k: v.shape for k, v in IRN(base).state_dict().items()}
    out = copy.deepcopy(wide)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() == 4:
                o = shapes[name]
                p[: o[0], o[1] :] = 0
    return out


def new_channel_share(wide: IRN, base: IRNConfig, lq: torch.Tensor) -> float:
    """rms(wide(x) - silenced(wide)(x)) / rms(wide(x) - x) over the faces ``lq``, in float32."""
    narrow = silenced(wide, base)
    with torch.no_grad():
        y = wide(lq)
        return ((y - narrow(lq)).square().mean() / (y - lq).square().mean()).sqrt().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("irn", nargs="+", help="widened IRN checkpoint folders")
    ap.add_argument("--base", required=True, help="the IRN (checkpoint folder) they were widened from")
    ap.add_argument("--testset", required=True, help="a folder of `clrface make-testset` (lq/)")
    ap.add_argument("--limit", type=int, default=100, help="the first N faces (default 100)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = read_config(args.base, "irn", IRNConfig)
    lq = to_model_range(load_face_folder(Path(args.testset) / "lq", size=128, limit=args.limit))
    for folder in args.irn:
        share = new_channel_share(load_irn(folder), base, lq)
        print(f"{folder}: the new channels carry {share:.1%} of the residual (rms, {len(lq)} faces)")


if __name__ == "__main__":
    main()
