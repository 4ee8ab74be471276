"""Averages the weights of IRNs fine-tuned from one start (a "model soup", Wortsman et al. 2022): runs that moved
the same network different ways (a heavier identity term, a stronger PatchGAN term) often combine their gains
when averaged, at no training cost:

    python benchmarks/soup_irn.py runs/irn-b128-id4/model runs/irn-b128-long-adv35/model -o runs/irn-soup/model

The folders must share one architecture (``config.json``); the result is an IRN checkpoint like any other, to be
packed with ``clrface pack --base default --irn DST``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from clrface.checkpoint import save_checkpoint
from clrface.identity.irn import load_irn


def average_states(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """The weighted mean of each float tensor (weights normalised to sum 1); integer buffers come from the first."""
    if not states:
        raise ValueError("no state dicts to average")
    w = torch.tensor([1.0] * len(states) if weights is None else list(weights), dtype=torch.float64)
    if len(w) != len(states) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {len(states)} non-negative weights with a positive sum, got {list(w.tolist())}")
    w = w / w.sum()
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"state {i} has other tensors than state 0: not the same architecture")
    out = {}
    for k in keys:
        first = states[0][k]
        if first.is_floating_point():
            out[k] = sum(float(wi) * s[k].double() for wi, s in zip(w, states)).to(first.dtype)
        else:
            out[k] = first.clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="+", help="IRN checkpoint folders of one architecture")
    ap.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    ap.add_argument("--weights", type=float, nargs="+", help="one weight per folder (default: equal)")
    args = ap.parse_args()
    models = [load_irn(s) for s in args.src]
    if any(m.cfg != models[0].cfg for m in models):
        raise SystemExit("soup_irn: the folders hold IRNs of different configurations")
    soup = models[0]
    soup.load_state_dict(average_states([m.state_dict() for m in models], args.weights))
    save_checkpoint(args.output, soup, soup.cfg, "irn")
    print(f"{len(models)} IRNs averaged -> {args.output}")


if __name__ == "__main__":
    main()
