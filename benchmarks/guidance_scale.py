"""Calibrates the identity-guidance scale: one guided x0 step, x0 - s * grad(1 - cos), on test faces.

    python benchmarks/guidance_scale.py --model runs/pack --testset runs/testset-val-bfr --n 16
"""
import argparse

import torch
from clrface.restorer import Restorer
from clrface.data.datasets import load_face_folder
from clrface.data.io import to_model_range
from clrface.identity.facerec import identity_loss
ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--model", required=True)
ap.add_argument("--testset", default="runs/testset-val-bfr")
ap.add_argument("--n", type=int, default=16)
args = ap.parse_args()
torch.set_num_threads(1)
r = Restorer.from_pretrained(args.model)
n = args.n
lq = to_model_range(load_face_folder(f"{args.testset}/lq", limit=n))
gt = to_model_range(load_face_folder(f"{args.testset}/gt", limit=n))
with torch.no_grad():
    x_id = r.run_irn(lq); z_d = r.encode(lq); z_id = r.encode(x_id)
    e_id = r.embed(x_id); e_gt = r.embed(gt)
g = torch.Generator().manual_seed(0); eps = torch.randn(z_id.shape, generator=g)
for sig in (0.5, 2.0):
    x = z_id + sig * eps
    with torch.no_grad():
        x0 = r.prior.precond(x, torch.full((n,), sig), z_d)
    x0g = x0.clone().requires_grad_()
    dec = lambda z: r.vqgan.decode(r.prior.denormalize(z))
    e = r.facerec.embed(dec(x0g))
    loss = identity_loss(e, e_id).sum(); (grad,) = torch.autograd.grad(loss, x0g)
    print(f"sigma {sig}: id loss vs IRN {identity_loss(e, e_id).mean():.4f}, vs GT {identity_loss(e.detach(), e_gt).mean():.4f}; grad rms {grad.pow(2).mean().sqrt():.2e}")
    for s in (1, 10, 30, 100, 300, 1000):
        with torch.no_grad():
            z = x0 - s * grad
            e2 = r.facerec.embed(dec(z))
        print(f"   scale {s}: id vs IRN {identity_loss(e2, e_id).mean():.4f} vs GT {identity_loss(e2, e_gt).mean():.4f}  update rms {(s*grad).pow(2).mean().sqrt():.3f}")
