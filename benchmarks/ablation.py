"""Quality tables on the fixed synthetic test set (paper Tables 4 and the NFE study, at 128 px).

    python benchmarks/ablation.py --model runs/pack --testset runs/testset-val-bfr --rows prior-table \\
        --out runs/ablation

Each row restores every LQ face of the test set with one configuration, writes the faces to
``OUT/<row>/`` and evaluates them against ``gt/`` with `clrface.metrics.evaluate` (PSNR/SSIM RGB,
facerec-perceptual (the stated LPIPS substitute), IDS and LMD with the dlib networks). Prints a markdown table
(with seconds per face on this machine) and writes ``OUT/<table>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clrface.bench import ablation_row_dir
from clrface.data.datasets import load_face_folder
from clrface.data.io import load_image, save_image, to_model_range, to_uint8
from clrface.device import DTYPES
from clrface.metrics.evaluate import evaluate_folders
from clrface.metrics.noref import colorfulness
from clrface.options import RestoreOptions
from clrface.restorer import Restorer
from clrface.vqgan.rest import load_rest_encoder


@dataclass(frozen=True)
class Row:
    """One configuration: RestoreOptions kwargs, whether the learned mask is used, and a model folder that
    replaces --model for this row (e.g. a fine-tuned or ablated model packed with `clrface pack`).
    ``rest_encoder``: a VQVAE-Rest checkpoint (`clrface train vqvae-rest`); the row is then G(Q(E'(x_d, x_id)))
    with the model's IRN and VQGAN, and ``options`` are unused."""

    options: dict
    mask: bool = False
    model: str | None = None
    rest_encoder: str | None = None


FULL = {"mode": "full", "sigma_start": 0.5, "guidance_scale": 10.0}  # the ablation's full-model setting
FAST = "fast"  # the shipped distilled prior (`clrface train distill`), packed with --base default


TABLES: dict[str, dict[str, Row]] = {
    # The prior alone, from pure noise and from z_d at a few sigma_start, vs VQVAE-direct.
    "prior-table": {
        "VQVAE-direct G(Q(E(x_d)))": Row({"mode": "direct"}),
        "prior, Heun-40 from noise": Row({"mode": "prior", "steps": 40, "sigma_start": 20.0}),
        "prior, Heun-40 from z_d, s=0.5": Row({"mode": "prior", "steps": 40, "sigma_start": 0.5}),
        "prior, Heun-40 from z_d, s=2": Row({"mode": "prior", "steps": 40, "sigma_start": 2.0}),
        "prior, Heun-40 from z_d, s=5": Row({"mode": "prior", "steps": 40, "sigma_start": 5.0}),
    },
    # NFE vs quality, from noise (the prior's own job).
    "nfe-table": {
        **{f"Heun-{n} from noise": Row({"mode": "prior", "steps": n, "sigma_start": 20.0}) for n in (5, 10, 20, 40)},
        **{f"DPM++2M-{n} from noise": Row({"mode": "prior", "steps": n, "sigma_start": 20.0, "sampler": "dpmpp_2m"})
           for n in (5, 10, 20)},
    },
    # Paper Table 4: the ablation of the full method.
    "ablation": {
        "VQVAE-direct": Row({"mode": "direct"}),
        "VQVAE-Rest E'(x_d, x_id)": Row({}, rest_encoder="runs/vqvae-rest-128/model"),
        "IRN (L1 only)": Row({"mode": "irn"}, model="runs/pack-noid"),
        "IRN^ID": Row({"mode": "irn"}),
        "Diff. Prior (from z_d, s=2, Heun-20)": Row({"mode": "prior", "steps": 20, "sigma_start": 2.0}),
        "IRN^ID + Diff. Prior (s=0.5, Heun-10)": Row({"mode": "full", "steps": 10, "sigma_start": 0.5,
                                                      "guidance_scale": 0.0}),
        "IRN^ID + Diff. Prior + ID guidance (no mask)": Row({"mode": "full", "steps": 10, "sigma_start": 0.5,
                                                             "guidance_scale": 10.0}),
        "IRN^ID + Diff. Prior + ID guidance + M_l": Row({"mode": "full", "steps": 10, "sigma_start": 0.5,
                                                        "guidance_scale": 10.0}, mask=True),
    },
    # Quality vs speed of the samplers, teacher and distilled (Euler on the distilled prior = the
    # multistep consistency sampler); from noise (the prior's own job) and in the full pipeline.
    "speed-table": {
        **{f"from noise, Heun-{n}": Row({"mode": "prior", "steps": n, "sigma_start": 20.0}) for n in (40, 10)},
        **{f"from noise, DPM++2M-{n}": Row({"mode": "prior", "steps": n, "sigma_start": 20.0, "sampler": "dpmpp_2m"})
           for n in (5, 10)},
        **{f"from noise, distilled-{n}": Row({"mode": "prior", "steps": n, "sigma_start": 20.0, "sampler": "euler"},
                                             model=FAST) for n in (1, 2, 4)},
        # full Heun-40 (79 guided calls, ~20 s/face on 2 CPU cores) is left out; Heun-10 is the ablation table's row
        "full + M_l, Heun-10": Row({**FULL, "steps": 10}, mask=True),
        "full + M_l, DPM++2M-5": Row({**FULL, "steps": 5, "sampler": "dpmpp_2m"}, mask=True),
        **{f"full + M_l, distilled-{n}": Row({**FULL, "steps": n, "sampler": "euler"}, mask=True, model=FAST)
           for n in (1, 2, 4)},
        # the decoded face's finest octave(s) replaced by the IRN output's (RestoreOptions.irn_detail)
        "full + M_l, distilled-1, IRN detail": Row({**FULL, "steps": 1, "sampler": "euler", "irn_detail": 1.0},
                                                   mask=True, model=FAST),
        **{f"full + M_l, distilled-1, IRN detail {k} octaves": Row(
            {**FULL, "steps": 1, "sampler": "euler", "irn_detail": 1.0, "irn_detail_octaves": k}, mask=True, model=FAST)
           for k in (2, 3)},
    },
    # The distilled pipeline's identity-guidance scale, alone and with the IRN's two finest octaves: stronger
    # guidance is to win back the identity that the refinement and the octaves' seam cost.
    "fast-guidance": {
        **{f"distilled-1, guidance {g}": Row({**FULL, "steps": 1, "sampler": "euler", "guidance_scale": float(g)},
                                             mask=True, model=FAST) for g in (5, 10, 20, 40)},
        **{f"distilled-1, guidance {g}, IRN detail 2 octaves": Row(
            {**FULL, "steps": 1, "sampler": "euler", "guidance_scale": float(g), "irn_detail": 1.0,
             "irn_detail_octaves": 2}, mask=True, model=FAST) for g in (10, 40)},
        # fidelity 1: the start sigma of the fidelity map's top end
        **{f"distilled-1, sigma 0.05, guidance {g}": Row(
            {**FULL, "steps": 1, "sampler": "euler", "sigma_start": 0.05, "guidance_scale": float(g)}, mask=True,
            model=FAST) for g in (10, 20)},
        # the fidelity knob's range: where along sigma_start identity and perceptual distance peak
        **{f"distilled-1, sigma {s}, guidance 10": Row(
            {**FULL, "steps": 1, "sampler": "euler", "sigma_start": s, "guidance_scale": 10.0}, mask=True,
            model=FAST) for s in (0.15, 0.25, 0.35, 0.7, 1.0, 2.0, 4.0)},
        # fast's default (sigma 0.447, guidance 10) and its fidelity 1 (sigma 0.25, guidance 13.3)
        "distilled-1, sigma 0.447, guidance 10": Row(
            {**FULL, "steps": 1, "sampler": "euler", "sigma_start": 0.447, "guidance_scale": 10.0}, mask=True,
            model=FAST),
        "distilled-1, sigma 0.25, guidance 13.3": Row(
            {**FULL, "steps": 1, "sampler": "euler", "sigma_start": 0.25, "guidance_scale": 40 / 3}, mask=True,
            model=FAST),
    },
    # The fidelity knob's top end in the teacher's full pipeline (`--mode full`, Heun-10).
    "fidelity-full": {
        f"Heun-10, sigma {s}, guidance {g:.3g}": Row({**FULL, "steps": 10, "sigma_start": s, "guidance_scale": g},
                                                     mask=True) for s, g in ((0.05, 10.0), (0.25, 40 / 3))
    },
    # The decoded face's tone (what an N-px image of it holds) replaced by the IRN output's (RestoreOptions.irn_tone):
    # fast's default, then the Heun-10 teacher at the default model's fidelity 0.75 (sigma 0.447, guidance 5).
    "tone": {
        **{f"distilled-1, sigma 0.447, guidance 10, IRN tone {t}": Row(
            {**FULL, "steps": 1, "sampler": "euler", "sigma_start": 0.447, "guidance_scale": 10.0, "irn_tone": t},
            mask=True, model=FAST) for t in (4, 8, 16)},
        # fast's default with the IRN's finest octaves as well (the real-photo sharpness of irn_detail)
        **{f"distilled-1, sigma 0.447, guidance 10, IRN tone 8, detail {k} octave{'s' if k > 1 else ''}": Row(
            {**FULL, "steps": 1, "sampler": "euler", "sigma_start": 0.447, "guidance_scale": 10.0, "irn_tone": 8,
             "irn_detail": 1.0, "irn_detail_octaves": k}, mask=True, model=FAST) for k in (1, 2)},
        # with the octave carrying the IRN's detail, the decoded face may start from more noise
        **{f"distilled-1, sigma {s}, guidance 10, IRN tone 8, detail 1 octave": Row(
            {**FULL, "steps": 1, "sampler": "euler", "sigma_start": s, "guidance_scale": 10.0, "irn_tone": 8,
             "irn_detail": 1.0}, mask=True, model=FAST) for s in (0.7, 1.0)},
        **{f"Heun-10, sigma 0.447, guidance 5{f', IRN tone {t}' if t else ''}": Row(
            {**FULL, "steps": 10, "sigma_start": 0.447, "guidance_scale": 5.0, "irn_tone": t}, mask=True)
           for t in (0, 8)},
        "Heun-10, sigma 0.447, guidance 5, IRN tone 8, detail 1 octave": Row(
            {**FULL, "steps": 10, "sigma_start": 0.447, "guidance_scale": 5.0, "irn_tone": 8, "irn_detail": 1.0},
            mask=True),
    },
    # Paper Table 2 at 128 px: extreme upsampling (run on the x32 and x64 test sets).
    # Where identity is lost on the way x_id -> E -> refine -> G: each row adds one arrow.
    "arrows": {
        "IRN^ID: x_id": Row({"mode": "irn"}),
        "G(Q(E(x_id))): VQGAN round trip": Row({"mode": "full", "steps": 1, "sampler": "euler",
                                                "sigma_start": 0.002, "guidance_scale": 0.0}),
        "+ refine, distilled-1, no guidance": Row({**FULL, "steps": 1, "sampler": "euler", "guidance_scale": 0.0},
                                                  model=FAST),
        "+ ID guidance + M_l, distilled-1": Row({**FULL, "steps": 1, "sampler": "euler"}, mask=True, model=FAST),
    },
    "extreme": {
        "VQVAE-direct": Row({"mode": "direct"}),
        "default model (IRN^ID)": Row({"mode": "irn"}),
        "extreme model (IRN^ID fine-tuned)": Row({"mode": "irn"}, model="src/clrface/weights/extreme"),
        "extreme model + Diff. Prior (s=0.5, Heun-10)": Row(
            {"mode": "full", "steps": 10, "sigma_start": 0.5, "guidance_scale": 0.0},
            model="src/clrface/weights/extreme"),
    },
    # Colorization (run on the gray test set).
    "colorize": {
        "VQVAE-direct": Row({"mode": "direct"}),
        "default model (IRN^ID)": Row({"mode": "irn"}),
        "colorize model (IRN^ID fine-tuned)": Row({"mode": "irn"}, model="src/clrface/weights/colorize"),
    },
}
METRICS = ("psnr", "ssim", "facerec_perceptual", "ids", "ids_blur", "same_person", "lmd")
DERIVED = ("colorfulness", "same_person")  # not asked of evaluate_folders: computed here or derived by it


def cell(r: dict, m: str) -> str:
    """A value with its bootstrap 95 % interval where one exists."""
    if r.get(m) is None:
        return "None"
    ci = r.get("ci95", {}).get(m)
    return f"{r[m]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def run_row(restorer: Restorer, lq: torch.Tensor, names: list[str], out: Path, opts: RestoreOptions, use_mask: bool,
            rest_encoder: str | None = None) -> float:
    """Restores all faces into ``out``; returns seconds per face (restoration only)."""
    mask = restorer.mask
    restorer.mask = mask if use_mask else None
    rest = None
    if rest_encoder:
        rest = load_rest_encoder(rest_encoder, restorer.device)
    t0 = time.perf_counter()
    try:
        faces = []
        for i in range(0, len(lq), opts.batch_size):
            x = lq[i : i + opts.batch_size]
            if rest is not None:
                with torch.no_grad():
                    faces.append(restorer.vqgan.decode(rest(x, restorer.run_irn(x))).float().clamp(-1, 1))
                continue
            r = restorer.restore_faces(x, opts, first_index=i)
            faces.append(r.restored[:, 0])
    finally:
        restorer.mask = mask
    dt = (time.perf_counter() - t0) / len(lq)
    for name, face in zip(names, to_uint8(torch.cat(faces))):
        save_image(out / f"{name}.png", face.numpy())
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="packed model folder (clrface pack)")
    ap.add_argument("--fast", default=FAST, help="model folder of the distilled rows (default: the shipped fast)")
    ap.add_argument("--testset", required=True, help="folder from `clrface make-testset` (lq/, gt/)")
    ap.add_argument("--rows", default="ablation", choices=sorted(TABLES), help="which table")
    ap.add_argument("--only", nargs="*", help="run only these row names")
    ap.add_argument("--limit", type=int, default=None, help="first N faces of the test set")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                    help="compute precision (autocast below fp32)")
    ap.add_argument("--fid", action="store_true",
                    help="add FID against --fid-ref (clean training faces; with a few hundred faces only the "
                         "differences between rows mean anything)")
    ap.add_argument("--fid-ref", default="../shared/data/faces128/train", help="FID reference folder (stats cached)")
    ap.add_argument("--colorfulness", action="store_true",
                    help="add the mean Hasler-Suesstrunk colourfulness of the face centre (and a GT row to compare)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    testset, out = Path(args.testset), Path(args.out)
    names = sorted(p.stem for p in (testset / "lq").iterdir())[: args.limit]
    lq = to_model_range(load_face_folder(testset / "lq", limit=args.limit))
    gt_dir = testset / "gt"  # files are matched by name, so a --limit subset is evaluated on its own GT
    restorers: dict[str, Restorer] = {}

    def restorer_for(model: str) -> Restorer:
        if model not in restorers:
            facerec = next(iter(restorers.values())).facerec if restorers else None
            restorers[model] = Restorer.from_pretrained(model, dtype=DTYPES[args.dtype], facerec=facerec)
        return restorers[model]

    metrics = METRICS + (("fid",) if args.fid else ()) + (("colorfulness",) if args.colorfulness else ())
    rows = []
    table = {"LQ input (bicubic up, as degraded)": None, **TABLES[args.rows]}
    if args.colorfulness:
        table = {"GT": "gt", **table}
    for row, spec in table.items():
        if args.only and row not in args.only:
            continue
        if spec is None or spec == "gt":  # the test set's own faces, limited to the same names as the other rows
            src, pred, dt = testset / ("gt" if spec else "lq"), ablation_row_dir(out, row), 0.0
            pred.mkdir(parents=True, exist_ok=True)
            for n in names:
                link = pred / f"{n}.png"
                if not link.exists():
                    link.symlink_to((src / f"{n}.png").resolve())
        else:
            pred = ablation_row_dir(out, row)
            model = args.fast if spec.model == FAST else spec.model or args.model
            dt = run_row(restorer_for(model), lq, names, pred,
                         RestoreOptions(batch_size=args.batch_size, **spec.options), spec.mask, spec.rest_encoder)
        res = evaluate_folders(pred, gt_dir, metrics=[m for m in metrics if m not in DERIVED],
                               fid_ref=args.fid_ref if args.fid else None)
        vals = {r["metric"]: r["value"] for r in res["rows"]}
        cis = {r["metric"]: r["ci95"] for r in res["rows"] if r.get("ci95")}
        if args.colorfulness:
            faces = torch.stack([torch.from_numpy(load_image(pred / f"{n}.png")) for n in names])
            vals["colorfulness"] = colorfulness(faces.permute(0, 3, 1, 2)).mean().item()
        rows.append({"row": row, "s_per_face": dt, **vals, "ci95": cis, "per_face": res.get("per_face")})
        print(f"| {row} | " + " | ".join(cell(rows[-1], m) for m in metrics) + f" | {dt:.3f} |", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "model": args.model,
            "dtype": args.dtype, "batch_size": args.batch_size,
            "testset": str(testset), "n": len(names), "metrics": metrics}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.rows}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n| row | " + " | ".join(metrics) + " | s/face |\n|---|" + "---|" * (len(metrics) + 1))
    for r in rows:
        print(f"| {r['row']} | " + " | ".join(cell(r, m) for m in metrics)
              + f" | {r['s_per_face']:.3f} |")


if __name__ == "__main__":
    main()
