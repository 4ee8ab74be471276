"""Calibrates the identity-guidance scale: one denoiser call of the restore path's guided denoiser
(``Restorer.denoiser``: the prior wrapped by ``identity_guided``) from the IRN latent at noise level sigma, for a
range of scales, on the faces of a synthetic test set. For each (sigma, scale): the identity loss 1 - cos of the
decoded x0 to the IRN output (the guidance target) and to the ground truth, and the RMS of the guidance update
in normalised latents. Guidance is unmasked unless ``--mask`` (the scale alone sets the step).

    python benchmarks/guidance_scale.py --model default --testset runs/testset-val-bfr --n 16
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from clrface.bench import header, load_faces, markdown_table
from clrface.identity.facerec import identity_loss
from clrface.restorer import Restorer

SCALES = (0.0, 1.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


@torch.no_grad()  # as restore_faces: the guidance takes its gradient in an enable_grad island
def guidance_rows(r: Restorer, lq: torch.Tensor, gt: torch.Tensor, sigmas: Sequence[float],
                  scales: Sequence[float] = SCALES) -> list[tuple[float, float, float, float, float]]:
    """[(sigma, scale, id loss vs IRN, id loss vs GT, update RMS)] for faces lq, gt [N,3,S,S] in [-1, 1]."""
    x_id = r.run_irn(lq)
    z_d, z_id = r.encode(lq), r.encode(x_id)
    e_id, e_gt = r.embed(x_id), r.embed(gt)
    eps = torch.randn(z_id.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for sig in sigmas:
        x, sigma = z_id + sig * eps, torch.full((len(lq),), float(sig))
        plain = r.denoiser(z_d, e_id, 0.0)(x, sigma)
        for s in scales:
            x0 = r.denoiser(z_d, e_id, s)(x, sigma)
            e = r.embed(r.decode(x0))
            rows.append((float(sig), float(s), identity_loss(e, e_id).mean().item(),
                         identity_loss(e, e_gt).mean().item(), (x0 - plain).pow(2).mean().sqrt().item()))
    return rows


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model folder or installed name")
    ap.add_argument("--testset", default="runs/testset-val-bfr", help="a `clrface make-testset` folder (gt/, lq/)")
    ap.add_argument("--n", type=int, default=16, help="faces")
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.5, 2.0], help="noise levels of the denoiser call")
    ap.add_argument("--mask", action="store_true", help="keep the model's learned latent mask")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = Restorer.from_pretrained(args.model)
    if not args.mask:
        r.mask = None
    lq = load_faces(Path(args.testset) / "lq", limit=args.n)
    gt = load_faces(Path(args.testset) / "gt", limit=args.n)
    rows = guidance_rows(r, lq, gt, args.sigma)
    report = (f"#### Identity-guidance scale: {r.source}, {len(lq)} faces of {args.testset}\n\n{header()}\n\n"
              + markdown_table(["sigma", "scale", "id loss vs IRN", "id loss vs GT", "update RMS"], rows, fmt=".4f"))
    print(report)
    return report


if __name__ == "__main__":
    main()
