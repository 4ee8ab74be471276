"""Validation loss of conditional latent priors by noise level, on a fixed synthetic test set.

    python benchmarks/prior_loss.py --prior src/clrface/weights/default/prior runs/prior-128-x3/model \
        --testset runs/testset-val-bfr --threads 1

For every face of the test set: z0 = E(gt) and z^d = E(lq) with one frozen VQGAN encoder, then the EDM loss
(paper Eq. 9, ``diffusion.loss.edm_loss``) at fixed sigmas with fixed noise (seed 0), so priors are compared on
the same draws. Prints mean and bootstrap 95 % interval per sigma; lower is better. Sigmas are those of the
normalised latents (sigma_data = 1); ``z^d`` alone is what the loss at high sigma is measured against.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clrface.bench import header, load_faces, markdown_table
from clrface.diffusion.loss import edm_loss
from clrface.diffusion.prior import load_prior
from clrface.metrics.bootstrap import bootstrap_ci
from clrface.vqgan.model import load_vqgan

SIGMAS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)


@torch.no_grad()
def losses_by_sigma(prior, z0: torch.Tensor, zd: torch.Tensor, sigmas=SIGMAS,
                    batch: int = 50) -> dict[float, torch.Tensor]:
    """Per-face EDM loss [N] at each sigma; z0, zd: raw latents [N,C,h,w] (normalised here by the prior)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(z0.shape, generator=g)
    out = {}
    for s in sigmas:
        vals = []
        for i in range(0, len(z0), batch):
            a, c, n = (prior.normalize(z0[i:i + batch]), prior.normalize(zd[i:i + batch]), noise[i:i + batch])
            vals.append(edm_loss(prior.precond, a, c, torch.full((len(a),), s), n).float())
        out[s] = torch.cat(vals)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", nargs="+", required=True, help="prior checkpoint folders to compare")
    ap.add_argument("--vqgan", default="src/clrface/weights/default/vqgan", help="the frozen encoder")
    ap.add_argument("--testset", required=True, help="folder from `clrface make-testset` (lq/, gt/)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vq = load_vqgan(args.vqgan)
    t = Path(args.testset)
    with torch.no_grad():
        z0 = torch.cat([vq.encode(x) for x in load_faces(t / "gt", args.limit).split(50)])
        zd = torch.cat([vq.encode(x) for x in load_faces(t / "lq", args.limit).split(50)])
    rows = []
    for folder in args.prior:
        per = losses_by_sigma(load_prior(folder), z0, zd)
        cells = []
        for s in SIGMAS:
            lo, hi = bootstrap_ci(per[s].numpy())
            cells.append(f"{per[s].mean():.4f} [{lo:.4f}, {hi:.4f}]")
        rows.append([folder, *cells])
    print(header(threads=args.threads))
    print(f"{len(z0)} faces of {t}\n")
    print(markdown_table(["prior", *(f"loss@{s:g}" for s in SIGMAS)], rows))


if __name__ == "__main__":
    main()
