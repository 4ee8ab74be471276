"""Averages the weights of IRNs fine-tuned from one start (a "model soup", Wortsman et al. 2022): runs that moved
the same network different ways (a heavier identity term, a stronger PatchGAN term) often combine their gains
when averaged, at no training cost:

    python benchmarks/soup_irn.py runs/irn-b128-id4/model runs/irn-b128-long-adv35/model -o runs/irn-soup/model

Weights may be signed (their sum must not be 0): ``START RUN --weights -1 2`` steps twice as far from START as RUN
went. A source may also be a run's ``train_state/`` folder, whose ``model.safetensors`` holds the raw weights that
the exported EMA only follows (the architecture then comes from the first IRN folder). The result is an IRN
checkpoint like any other, to be packed with ``clrface pack --base default --irn DST``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from clrface.checkpoint import save_checkpoint
from clrface.identity.irn import load_irn


def average_states(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """The weighted mean of each float tensor (weights normalised to sum 1, signs kept, so weights beyond [0, 1]
    extrapolate); integer buffers come from the first."""
    if not states:
        raise ValueError("no state dicts to average")
    w = torch.tensor([1.0] * len(states) if weights is None else list(weights), dtype=torch.float64)
    if len(w) != len(states) or abs(w.sum().item()) < 1e-9:
        raise ValueError(f"need {len(states)} weights with a non-zero sum, got {list(w.tolist())}")
    w = w / w.sum()
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(keys) or any(s[k].shape != states[0][k].shape for k in keys):
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
    ap.add_argument("src", nargs="+", help="IRN checkpoint folders of one architecture (or runs' train_state/)")
    ap.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    ap.add_argument("--weights", type=float, nargs="+", help="one weight per folder (default: equal; signed)")
    args = ap.parse_args()
    irn_dirs = [Path(s) for s in args.src if (Path(s) / "config.json").is_file()]
    if not irn_dirs:
        raise SystemExit("soup_irn: at least one source must be an IRN checkpoint folder (with config.json)")
    soup = load_irn(irn_dirs[0])
    states = []
    for s in map(Path, args.src):
        if s in irn_dirs:
            m = load_irn(s)
            if m.cfg != soup.cfg:
                raise SystemExit(f"soup_irn: {s} holds an IRN of another configuration than {irn_dirs[0]}")
            states.append(m.state_dict())
        else:  # a training state: raw weights only
            states.append({k: v.float() for k, v in load_file(str(s / "model.safetensors")).items()})
    try:
        soup.load_state_dict(average_states(states, args.weights))
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"soup_irn: {e}") from None
    save_checkpoint(args.output, soup, soup.cfg, "irn")
    print(f"{len(states)} IRNs averaged -> {args.output}")


if __name__ == "__main__":
    main()
