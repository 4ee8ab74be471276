"""Where a restore loses detail: Laplacian variance and PSNR of the GT, the LQ input, the VQGAN's reconstruction of
the GT, the IRN's output and its VQGAN reconstruction, on the first N faces of a test set.

    python benchmarks/sharpness.py --model default --testset runs/testset-val-bfr --limit 50
    python benchmarks/sharpness.py --model default --testset runs/testset-val-bfr --limit 50 \\
        --vqgan runs/gpu-vqgan/model --irn runs/gpu-irn-w05/model     # other checkpoints of the same shapes

Laplacian variance: ``clrface.metrics.noref.laplacian_variance`` (face region of the aligned crop; GT ~600 on
the bfr test set). A model that keeps only a fraction of it smooths; above the GT it adds noise or artefacts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clrface.bench import header, load_faces, markdown_table
from clrface.checkpoint import load_weights
from clrface.metrics.noref import laplacian_variance
from clrface.metrics.psnr_ssim import psnr
from clrface.restorer import Restorer


def sharpness_rows(restorer: Restorer, lq: torch.Tensor, gt: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{row: (mean Laplacian variance, mean PSNR vs gt)}; lq, gt [N,3,S,S] in [-1,1]."""
    with torch.no_grad():
        x_id = restorer.run_irn(lq)
        outs = {"GT": gt, "LQ input": lq, "VQGAN G(Q(E(GT)))": restorer.decode(restorer.encode(gt)),
                "IRN(LQ)": x_id, "VQGAN of IRN(LQ)": restorer.decode(restorer.encode(x_id))}
    return {k: (laplacian_variance(v.float()).mean().item(), psnr(v.float(), gt).mean().item())
            for k, v in outs.items()}


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model folder or installed name")
    ap.add_argument("--testset", required=True, help="folder from `clrface make-testset` (lq/, gt/)")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--vqgan", help="a vqgan checkpoint folder to use instead of the model's")
    ap.add_argument("--irn", help="an irn checkpoint folder to use instead of the model's")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = Restorer.from_pretrained(args.model)
    if args.vqgan:
        load_weights(args.vqgan, r.vqgan)
    if args.irn:
        load_weights(args.irn, r.irn)
    t = Path(args.testset)
    lq = load_faces(t / "lq", limit=args.limit)
    gt = load_faces(t / "gt", limit=args.limit)
    rows = [(k, f"{lv:.1f}", "—" if k == "GT" else f"{p:.2f}") for k, (lv, p) in sharpness_rows(r, lq, gt).items()]
    report = header() + "\n\n" + markdown_table(["image", "Laplacian var", "PSNR vs GT (dB)"], rows)
    print(report)
    return report


if __name__ == "__main__":
    main()
