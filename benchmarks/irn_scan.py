"""Identity, facerec-perceptual distance, PSNR and sharpness of IRN checkpoints on an aligned test set, in about a
minute per IRN on one core: the IRN alone, bf16 where the CPU runs it natively (as `clrface restore`), no detection,
landmarks or FID. The same figures as the "IRN^ID" row of `benchmarks/ablation.py` (IDS, ids_blur,
facerec_perceptual, PSNR) and the Laplacian variance of `benchmarks/real_world.py` (the face region; a smoother IRN
has less), for scanning many candidates (e.g. weight averages from `benchmarks/soup_irn.py`) before the full
evaluation of the best:

    python benchmarks/irn_scan.py --testset runs/testset-val-bfr src/clrface/weights/default/irn runs/irn-soup/model
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from clrface.bench import slug
from clrface.data.datasets import load_face_folder
from clrface.data.io import list_images, save_image, to_model_range, to_uint8
from clrface.device import DTYPES, auto_dtype, autocast
from clrface.faces.detail import upper_band_from
from clrface.identity.facerec import identity_loss, load_facerec, perceptual_distance
from clrface.identity.irn import load_irn
from clrface.metrics.bootstrap import paired_diff_ci
from clrface.metrics.ids import IDS_BLUR_SIGMA
from clrface.metrics.noref import laplacian_variance
from clrface.metrics.psnr_ssim import psnr
from clrface.train.irn import descriptors


def flip_averaged(irn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The test-time self-ensemble of super-resolution: the mean of ``irn(x)`` and the mirrored ``irn`` of the
    mirrored face (aligned faces stay aligned when mirrored)."""
    return lambda x: 0.5 * (irn(x).float() + irn(x.flip(-1)).float().flip(-1))


def applied_twice(irn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The IRN run again on its own (clamped) output."""
    return lambda x: irn(irn(x).float().clamp(-1, 1))


def with_upper_octave_from(irn: Callable[[Tensor], Tensor], donor: Callable[[Tensor], Tensor]
                           ) -> Callable[[Tensor], Tensor]:
    """``irn``'s output with its finest octave (faces.detail.band_split) replaced by ``donor``'s for the same input:
    one IRN's coarser bands under another's texture."""
    return lambda x: upper_band_from(irn(x).float(), donor(x).float())


def restore_all(irn: Callable[[Tensor], Tensor], lq: Tensor, chunk: int = 50) -> Tensor:
    """``irn`` on every face of ``lq``, bf16 where the CPU runs it natively (as ``clrface restore``), clamped."""
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(cpu, DTYPES[auto_dtype(cpu)]):
        return torch.cat([irn(x).float() for x in lq.split(chunk)]).clamp(-1, 1)


def score(out: Tensor, fr: torch.nn.Module, gt: Tensor, e_gt: Tensor, e_gt_blur: Tensor, chunk: int = 50
          ) -> dict[str, Tensor]:
    """Per-face IDS (descriptor cosine to the GT), IDS through the blur (``e_gt_blur``: the blurred GT's),
    facerec-perceptual distance, PSNR and Laplacian variance (sharpness) of the restored faces ``out``."""
    with torch.no_grad():
        e, e_blur = descriptors(fr, out, chunk=chunk), descriptors(fr, out, IDS_BLUR_SIGMA, chunk)
        perc = torch.cat([perceptual_distance(fr, o, t).float() for o, t in zip(out.split(chunk), gt.split(chunk))])
    return {"ids": 1 - identity_loss(e, e_gt), "ids_blur": 1 - identity_loss(e_blur, e_gt_blur),
            "facerec_perceptual": perc, "psnr": psnr(out, gt), "lapvar": laplacian_variance(out).float()}


def scan_irn(irn: Callable[[Tensor], Tensor], fr: torch.nn.Module, lq: Tensor, gt: Tensor, e_gt: Tensor,
             e_gt_blur: Tensor, chunk: int = 50) -> dict[str, Tensor]:
    """:func:`score` of ``irn(lq)``."""
    return score(restore_all(irn, lq, chunk), fr, gt, e_gt, e_gt_blur, chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("irn", nargs="+", help="IRN checkpoint folders")
    ap.add_argument("--testset", required=True, help="a folder of `clrface make-testset` (lq/, gt/)")
    ap.add_argument("--limit", type=int, help="the first N faces only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flip", action="store_true", help="also scan each IRN flip-averaged (see flip_averaged)")
    ap.add_argument("--twice", action="store_true", help="also scan each IRN applied twice (see applied_twice)")
    ap.add_argument("--upper-octave-from", metavar="IRN",
                    help="also scan each IRN with its finest octave from this IRN (see with_upper_octave_from)")
    ap.add_argument("--save", metavar="DIR", type=Path,
                    help="write each row's faces to DIR/<row>/ under the test set's names (for fid_paired.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ts = Path(args.testset)
    lq = to_model_range(load_face_folder(ts / "lq", size=128, limit=args.limit))
    gt = to_model_range(load_face_folder(ts / "gt", size=128, limit=args.limit))
    names = [f.stem for f in list_images(ts / "lq")][:args.limit]
    fr = load_facerec().eval().requires_grad_(False)
    donor = load_irn(args.upper_octave_from).eval() if args.upper_octave_from else None
    e_gt, e_gt_blur = descriptors(fr, gt, chunk=50), descriptors(fr, gt, IDS_BLUR_SIGMA, 50)
    print(f"{len(gt)} faces of {ts}; Δ: paired difference to the first row [bootstrap 95 % interval]\n")
    print("| IRN | IDS | IDS blurred | facerec-perc. | PSNR | Laplacian var | Δ IDS | Δ IDS blurred | Δ facerec-perc. "
          "| Δ Laplacian var |\n|---|---|---|---|---|---|---|---|---|---|")
    first = None
    for folder in args.irn:
        irn = load_irn(folder).eval()
        variants = [(folder, irn)] + ([(f"{folder}, flip-averaged", flip_averaged(irn))] if args.flip else []) + \
            ([(f"{folder}, applied twice", applied_twice(irn))] if args.twice else []) + \
            ([(f"{folder}, finest octave of {args.upper_octave_from}", with_upper_octave_from(irn, donor))]
             if donor is not None else [])
        for name, net in variants:
            out = restore_all(net, lq)
            if args.save:
                (args.save / slug(name)).mkdir(parents=True, exist_ok=True)
                for n, face in zip(names, to_uint8(out)):
                    save_image(args.save / slug(name) / f"{n}.png", face.numpy())
            m = {k: v.numpy() for k, v in score(out, fr, gt, e_gt, e_gt_blur).items()}
            first = m if first is None else first
            deltas = ["{:+.4f} [{:+.4f}, {:+.4f}]".format(*paired_diff_ci(m[k], first[k]))
                      for k in ("ids", "ids_blur", "facerec_perceptual")]
            deltas.append("{:+.1f} [{:+.1f}, {:+.1f}]".format(*paired_diff_ci(m["lapvar"], first["lapvar"])))
            means = [f"{m[k].mean():.4f}" for k in ("ids", "ids_blur", "facerec_perceptual")]
            means += [f"{m['psnr'].mean():.3f}", f"{m['lapvar'].mean():.1f}"]
            print("| " + " | ".join([name, *means, *deltas]) + " |", flush=True)


if __name__ == "__main__":
    main()
