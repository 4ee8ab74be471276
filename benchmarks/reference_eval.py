"""Reference-guided restoration on LFW: photo A of a person degraded, restored with photo B of the same person
as the identity reference, scored against the clean A.

    python benchmarks/reference_eval.py --preset bfr --limit 500 --out runs/reference-bfr --threads 1
    python benchmarks/reference_eval.py --preset x32 --limit 500 --out runs/reference-x8 --threads 1

Faces: identities of ``lfw128`` with at least two photos (identity-disjoint from every training set), spread
evenly over the sorted names; A = the first photo, the references = the next one (``ref1``) or three (``ref3``,
identities with four or more photos). The wrong-person control gives face i the references of identity
i + N/2. Degradation: ``--preset`` at 128 px (``x32`` is x8 there, ``x64`` x16), seed = the face's index.

Rows: the degraded input; the IRN alone (mode irn); the full pipeline without a reference; with one reference;
with three (on the identities that have them, against the same faces without); the wrong person's reference,
forced; with ``--blend W``, one reference and the sampler's start latent blended W of the way toward the
reference photo's latent.

Per row: IDS (dlib cosine to the clean A), the same-person rate (dlib's raw descriptor distance < 0.6), both also
after a fixed extra blur (sigma 1 px) + JPEG 75 of the restored face, so that identity carried by an
adversarial pattern of the recogniser that guides and scores alike does not count; LMD with ``--lmd``; FID with
``--fid``. The wrong row also reports its same-person rate to the wrong identity's own clean A.

Verification (rows restored for every face): LFW-style 10-fold accuracy on the identities with >= 3 photos, each
restored A paired with a third photo C of its own identity and with the C of another identity (threshold chosen on
the other folds); C is neither restored nor a reference, so a face pulled toward its reference B is not matched
against B itself.

Calibration (always): the cosine between the degraded A and the reference embedding for the matched and the
wrong pairs; the threshold at which the warning fires on 95 % of wrong pairs, and how often it fires on matched
ones (``clrface.reference.MATCH_THRESHOLD``). Writes OUT/reference_eval.json (per-face values) and OUT/rows.png
(image rows: clean A | degraded | full | full + ref1 | wrong ref | reference B) and prints markdown.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from clrface.bench import embed_faces, header, markdown_table, to_tensor
from clrface.data.degradation import degrade, get_preset
from clrface.data.io import data_root, load_image, to_model_range, to_uint8
from clrface.metrics.bootstrap import bootstrap_ci, paired_diff_ci
from clrface.metrics.fid import folder_stats, frechet_distance_of_set, inception_features, load_inception
from clrface.metrics.ids import DLIB_SAME_PERSON_DISTANCE, descriptor_distance
from clrface.metrics.lmd import lmd_pair
from clrface.metrics.verification import verification_accuracy
from clrface.reference import MATCH_THRESHOLD, mean_identity
from clrface.restorer import Restorer

S = 128


def pick_identities(root: Path, limit: int) -> list[list[Path]]:
    """Photo lists (sorted) of ``limit`` identities with >= 2 photos, evenly spread over the sorted names."""
    people = [sorted(d.glob("*.jpg")) for d in sorted(root.iterdir()) if d.is_dir()]
    people = [p for p in people if len(p) >= 2]
    step = max(1, len(people) // limit)
    return people[::step][:limit]


def blur_jpeg(face: np.ndarray, sigma: float = 1.0, quality: int = 75) -> np.ndarray:
    """The fixed extra degradation of the robustness check: Gaussian blur then JPEG."""
    buf = io.BytesIO()
    Image.fromarray(face).filter(ImageFilter.GaussianBlur(sigma)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def restore(restorer: Restorer, faces: np.ndarray, opts: Any, reference: torch.Tensor | None) -> np.ndarray:
    out = restorer.restore_crops(faces, opts, reference=reference)
    return to_uint8(out.restored[:, 0]).numpy()


def restore_blended(restorer: Restorer, faces: np.ndarray, opts: Any, reference: torch.Tensor, ref_crops: np.ndarray,
                    weight: float) -> np.ndarray:
    """As ``restore`` with the reference, and the sampler's start latent moved ``weight`` of the way from the IRN
    output's latent to the reference photo's own latent (the reference crop, aligned like the input)."""
    out = []
    for i in range(0, len(faces), opts.batch_size):
        with torch.no_grad():
            z_ref = restorer.encode(to_model_range(ref_crops[i:i + opts.batch_size]).to(restorer.device))
        res = restorer.restore_faces(to_model_range(faces[i:i + opts.batch_size]), opts, first_index=i,
                                     reference=reference[i:i + opts.batch_size],
                                     start=lambda z, zr=z_ref: torch.lerp(z, zr.to(z.dtype), weight))
        out.append(to_uint8(res.restored[:, 0]).numpy())
    return np.concatenate(out)


@torch.no_grad()
def descriptors(restorer: Restorer, faces: np.ndarray, batch: int = 64) -> torch.Tensor:
    """dlib's raw descriptors [N,128] float64 of uint8 [N,S,S,3] faces (their distance < 0.6: same person)."""
    fr = restorer.facerec
    return torch.cat([fr.descriptor_from_chip(fr.chip(to_model_range(faces[i:i + batch]).to(restorer.device)))
                      .double().cpu() for i in range(0, len(faces), batch)])


def compare(d: torch.Tensor, d_gt: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, same person) per row of two raw descriptor sets."""
    cos = torch.nn.functional.cosine_similarity(d, d_gt, dim=-1).numpy()
    return cos, (descriptor_distance(d, d_gt) < DLIB_SAME_PERSON_DISTANCE).double().numpy()


def scores(restorer: Restorer, faces: np.ndarray, d_gt: torch.Tensor, gt: np.ndarray, lmd: bool
           ) -> dict[str, np.ndarray]:
    """Per face: cosine to the clean A and same-person, plain and after blur + JPEG; landmark distance."""
    cos, same = compare(descriptors(restorer, faces), d_gt)
    cos_r, same_r = compare(descriptors(restorer, np.stack([blur_jpeg(f) for f in faces])), d_gt)
    out = {"ids": cos, "same": same, "ids_robust": cos_r, "same_robust": same_r}
    if lmd:
        out["lmd"] = np.array([lmd_pair(f, g)[0] for f, g in zip(faces, gt)])
    return out


def verify(e_restored: torch.Tensor, e_third: torch.Tensor, folds: int = 10) -> tuple[float, float]:
    """(mean, std) k-fold verification accuracy of unit embeddings of restored faces [M,D] against those of a third
    photo of the same identity [M,D]: pair j is (restored j, third j), then (restored j, third of j + M/2)."""
    m = len(e_restored)
    other = (torch.arange(m) + m // 2) % m
    sims = torch.stack([(e_restored * e_third).sum(-1), (e_restored * e_third[other]).sum(-1)], 1).flatten()
    same = torch.tensor([True, False]).repeat(m)
    return verification_accuracy(sims.numpy(), same.numpy(), folds)


def fid_of(faces: np.ndarray, inception: torch.nn.Module, ref: dict[str, np.ndarray]) -> float:
    return frechet_distance_of_set(inception_features(inception, to_tensor(faces)), ref["mu"], ref["sigma"])


def calibrate(matched: np.ndarray, wrong: np.ndarray, fire_on_wrong: float = 0.95) -> dict[str, float]:
    """The threshold below which a pair is called a different person, set so the warning fires on
    ``fire_on_wrong`` of the wrong pairs; and the rates at that threshold and at MATCH_THRESHOLD."""
    t = float(np.quantile(wrong, fire_on_wrong))
    return {"threshold_95": t, "fires_on_wrong_at_95": float((wrong < t).mean()),
            "fires_on_matched_at_95": float((matched < t).mean()),
            "shipped_threshold": MATCH_THRESHOLD, "fires_on_wrong": float((wrong < MATCH_THRESHOLD).mean()),
            "fires_on_matched": float((matched < MATCH_THRESHOLD).mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--preset", default="bfr", help="degradation preset at 128 px (x32: x8, x64: x16)")
    ap.add_argument("--limit", type=int, default=500, help="identities (faces)")
    ap.add_argument("--out", default="runs/reference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fidelity", type=float, default=None)
    ap.add_argument("--guidance-scale", type=float, default=None, help="override for the faces without a reference")
    ap.add_argument("--reference-guidance", type=float, default=None, help="override for the faces with one")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--irn-detail", type=float, default=None,
                    help="share of the IRN output's finest octave in mode full (default: the model's); "
                         "faces guided by a reference do not take it")
    ap.add_argument("--calibrate-only", action="store_true", help="only the matched / wrong cosines")
    ap.add_argument("--lmd", action="store_true")
    ap.add_argument("--fid", action="store_true", help="FID against faces128/train (cached statistics)")
    ap.add_argument("--blend", type=float, nargs="*", default=[],
                    help="also rows with one reference and the start latent blended this far toward the reference's")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    restorer = Restorer.from_pretrained(args.model)
    people = pick_identities(data_root() / "lfw128", args.limit)
    n = len(people)
    cfg = get_preset(args.preset, S)
    clean = np.stack([load_image(p[0]) for p in people])
    deg = np.stack([degrade(f, cfg, i)[0] for i, f in enumerate(clean)])
    d_gt = descriptors(restorer, clean)
    e_ref1 = torch.stack([mean_identity(embed_faces(restorer, np.stack([load_image(p[1])])).float())
                          for p in people]).double()
    wrong = [(i + n // 2) % n for i in range(n)]
    e_in = embed_faces(restorer, deg)
    cos_matched = (e_in * e_ref1).sum(-1).numpy()
    cos_wrong = (e_in * e_ref1[wrong]).sum(-1).numpy()
    result: dict[str, Any] = {"preset": args.preset, "faces": n, "names": [p[0].parent.name for p in people],
                              "calibration": calibrate(cos_matched, cos_wrong),
                              "cos_matched": cos_matched.round(5).tolist(), "cos_wrong": cos_wrong.round(5).tolist()}
    log(f"calibration: {result['calibration']}")
    rows: dict[str, dict[str, np.ndarray]] = {}
    images: dict[str, np.ndarray] = {"clean A": clean, "degraded input": deg}
    if not args.calibrate_only:
        full = restorer.options(mode="full", fidelity=args.fidelity, guidance_scale=args.guidance_scale,
                                steps=args.steps, batch_size=8, reference_guidance=args.reference_guidance,
                                irn_detail=args.irn_detail)
        three = [i for i, p in enumerate(people) if len(p) >= 4]
        e_ref3 = torch.stack([mean_identity(embed_faces(restorer, np.stack([load_image(q) for q in people[i][1:4]]))
                                            .float()) for i in three]).double() if three else None
        rows["degraded input"] = scores(restorer, deg, d_gt, clean, args.lmd)
        runs = {"IRN alone (mode irn)": (restorer.options(mode="irn", batch_size=8), None, None),
                "full, no reference": (full, None, None),
                "full + 1 reference": (full, e_ref1, None),
                "full + wrong person's reference (forced)": (full, e_ref1[wrong], None)}
        if three:
            runs["full + 3 references"] = (full, e_ref3, three)
        ref_crops = np.stack([load_image(p[1]) for p in people])
        for w in args.blend:
            runs[f"full + 1 reference, start {w:g} toward it"] = (full, e_ref1, None, w)
        for name, (opts, ref, sel, *blend) in runs.items():
            idx = np.arange(n) if sel is None else np.array(sel)
            log(f"{name}: {len(idx)} faces")
            if blend:
                out = restore_blended(restorer, deg, opts, ref.float(), ref_crops, blend[0])
            else:
                out = restore(restorer, deg[idx], opts, None if ref is None else ref.float())
            rows[name] = scores(restorer, out, d_gt[idx], clean[idx], args.lmd)
            if sel is None:
                images[name] = out
            if "wrong" in name:  # how far the wrong reference pulled the face toward that other person
                rows[name]["same_as_wrong_identity"] = compare(descriptors(restorer, out), d_gt[wrong])[1]
        has3 = np.array([i for i, p in enumerate(people) if len(p) >= 3])
        if len(has3) >= 20:
            e_third = embed_faces(restorer, np.stack([load_image(people[i][2]) for i in has3])).double()
            result["verification"] = {k: verify(embed_faces(restorer, v[has3]).double(), e_third)
                                      for k, v in images.items()}
            result["verification_faces"] = len(has3)
        if args.fid:
            inception = load_inception()
            ref = folder_stats(data_root() / "faces128" / "train", inception, log=log)
            result["fid"] = {k: fid_of(v, inception, ref) for k, v in images.items()}
        result["three_ref_faces"] = three
        result["sampling"] = {"fidelity": full.fidelity, "guidance_scale": full.resolve(restorer.fidelity_map)[1],
                              "reference_guidance": full.reference_guidance,
                              "sigma_start": full.resolve(restorer.fidelity_map)[0], "steps": full.steps,
                              "sampler": full.sampler, "irn_tone": full.irn_tone, "irn_detail": full.irn_detail}
        result["rows"] = {k: {m: v.round(5).tolist() for m, v in r.items()} for k, r in rows.items()}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["header"] = header(restorer.device, args.threads)
    (out_dir / "reference_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    if len(images) > 2:
        cols = [*images.values(), np.stack([load_image(p[1]) for p in people])]
        grid = np.concatenate([np.concatenate([c[i] for c in cols], 1) for i in range(min(8, n))], 0)
        Image.fromarray(grid).save(out_dir / "rows.png")
    print(format_markdown(result, rows))
    return 0


def format_markdown(result: dict[str, Any], rows: dict[str, dict[str, np.ndarray]]) -> str:
    c = result["calibration"]
    lines = [f"LFW, {result['faces']} identities, preset {result['preset']} at 128 px", "",
             f"Calibration: matched cosine (degraded A vs reference B) median {np.median(result['cos_matched']):.3f}, "
             f"wrong {np.median(result['cos_wrong']):.3f}; warning on 95 % of wrong pairs below "
             f"{c['threshold_95']:.3f} (fires on {c['fires_on_matched_at_95']:.1%} of matched); at the shipped "
             f"{c['shipped_threshold']:.2f}: fires on {c['fires_on_wrong']:.1%} of wrong, {c['fires_on_matched']:.1%} "
             "of matched", ""]
    if not rows:
        return "\n".join(lines)
    base = rows["full, no reference"]
    tab = []
    for name, r in rows.items():
        cells = [name, len(r["ids"])]
        for m in ("same", "ids", "same_robust", "ids_robust", "lmd"):
            if m in r:
                lo, hi = bootstrap_ci(r[m])
                cells.append(f"{r[m].mean():.4f} [{lo:.4f}, {hi:.4f}]")
            else:
                cells.append("–")
        fid = result.get("fid", {}).get(name)
        cells.append("–" if fid is None else f"{fid:.1f}")
        if len(r["ids"]) == len(base["ids"]) and name != "full, no reference":
            d, lo, hi = paired_diff_ci(r["same"], base["same"])
            dr, lor, hir = paired_diff_ci(r["same_robust"], base["same_robust"])
            cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]; robust {dr:+.3f} [{lor:+.3f}, {hir:+.3f}]")
        else:
            cells.append("")
        tab.append(cells)
    lines.append(markdown_table(["row", "faces", "same-person ↑", "IDS ↑", "same-person after blur+JPEG ↑",
                                 "IDS after blur+JPEG ↑", "LMD ↓", "FID ↓",
                                 "same-person vs full without reference (paired)"], tab))
    if "full + 3 references" in rows:
        sel = result["three_ref_faces"]
        d, lo, hi = paired_diff_ci(rows["full + 3 references"]["same"], base["same"][sel])
        d1, lo1, hi1 = paired_diff_ci(rows["full + 1 reference"]["same"][sel], base["same"][sel])
        lines += ["", f"On the {len(sel)} identities with >= 4 photos, same-person vs full without reference: "
                      f"3 references {d:+.3f} [{lo:+.3f}, {hi:+.3f}], 1 reference {d1:+.3f} [{lo1:+.3f}, {hi1:+.3f}]"]
    w = rows.get("full + wrong person's reference (forced)")
    if w is not None:
        lines += ["", f"Wrong person's reference, forced: same-person rate to that other person "
                      f"{w['same_as_wrong_identity'].mean():.3f}"]
    if "verification" in result:
        lines += ["", f"LFW-style 10-fold verification, restored A vs a third photo C ({result['verification_faces']} "
                      "identities with >= 3 photos; as many different-person pairs):", "",
                  markdown_table(["row", "accuracy ↑ (mean ± std over folds)"],
                                 [[k, f"{m:.4f} ± {sd:.4f}"] for k, (m, sd) in result["verification"].items()])]
    s = result["sampling"]
    lines += ["", f"full rows: fidelity {s['fidelity']}, guidance scale {s['guidance_scale']} (with a reference "
                  f"{s['reference_guidance']}), sigma_start "
                  f"{s['sigma_start']:.3f}, {s['steps']} {s['sampler']} steps", result["header"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
