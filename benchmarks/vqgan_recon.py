"""VQGAN reconstruction quality at 128 px.

    python benchmarks/vqgan_recon.py --vqgan runs/vqgan-128/model --out runs/vqgan-recon

1. Clean val faces: G(Q(E(x))) vs x -> PSNR/SSIM (RGB), facerec-perceptual, IDS (dlib), code usage of the 8192.
2. Degraded faces (the fixed bfr test set): PSNR(G(Q(E(x_d))), x_d) -- the paper's check that the VQGAN
   reproduces degraded inputs faithfully too (its "PSNR = 37.9" at 512 px).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clrface.data.datasets import load_face_folder
from clrface.data.io import save_image, to_model_range, to_uint8
from clrface.metrics.evaluate import evaluate_folders
from clrface.metrics.noref import laplacian_variance
from clrface.metrics.psnr_ssim import psnr
from clrface.vqgan.model import load_vqgan
from clrface.vqgan.quantizer import code_usage


@torch.no_grad()
def reconstruct(vq, x: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    recs, idxs = [], []
    for chunk in x.split(batch):
        rec, _, idx = vq(chunk)
        recs.append(rec.float().clamp(-1, 1))
        idxs.append(idx)
    return torch.cat(recs), torch.cat(idxs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vqgan", required=True)
    ap.add_argument("--val", default="../shared/data/faces128/val")
    ap.add_argument("--testset", default="runs/testset-val-bfr")
    ap.add_argument("--out", default="runs/vqgan-recon")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vq = load_vqgan(args.vqgan)
    out = Path(args.out)
    names = sorted(p.stem for p in Path(args.val).iterdir() if p.suffix == ".jpg")
    x = to_model_range(load_face_folder(args.val))
    t0 = time.perf_counter()
    rec, idx = reconstruct(vq, x)
    dt = (time.perf_counter() - t0) / len(x)
    for n, r in zip(names, to_uint8(rec)):
        save_image(out / "val" / f"{n}.png", r.numpy())
    res = evaluate_folders(out / "val", args.val, metrics=("psnr", "ssim", "facerec_perceptual", "ids"))
    used, ppl = code_usage(idx, vq.config.codebook_size)
    lap_rec, lap_gt = laplacian_variance(rec).mean().item(), laplacian_variance(x).mean().item()
    lq = to_model_range(load_face_folder(Path(args.testset) / "lq"))
    rec_lq, _ = reconstruct(vq, lq)
    summary = {
        "clean": {r["metric"]: r["value"] for r in res["rows"]},
        # detail kept: the reconstructions' mean Laplacian variance (face region) as a share of the GT's
        "laplacian_variance": {"recon": lap_rec, "gt": lap_gt, "ratio": lap_rec / lap_gt},
        "codes_used": used, "codebook_size": vq.config.codebook_size, "perplexity": ppl,
        "psnr_degraded_recon_vs_degraded": psnr(rec_lq, lq).mean().item(),
        "s_per_face_encode_decode": dt, "n_val": len(x), "n_degraded": len(lq),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
