"""Does restoring make a face worse than it came in? Clean portraits and real degraded faces, restored with and
without keeping the input's own detail (``clrface.photo.restore_photo(keep_detail=...)``, ``clrface.faces.detail``).

    OMP_NUM_THREADS=1 python benchmarks/keep_detail.py --model default --threads 1 --out runs/keep-detail

Clean portraits: the public-domain astronaut portrait (``clrface.demo.demo_image``) FFHQ-aligned at 512 and 1024 px,
and clean ``faces128/val`` faces enlarged (Lanczos) to 512 and 1024 px; each is restored as a photo (detect -> align
at S -> restore -> paste), as ``clrface restore`` does. Against the input: the Laplacian variance of the face region
(``clrface.metrics.noref``) as a share of the input's, and the PSNR of the whole image. Acceptance: >= 90 % and
>= 32 dB. (The enlarged faces hold almost no detail above S px: their Laplacian variance, 1-10, is of the order of
what uint8 rounding alone adds, ~1.7, so their share says little; their PSNR does.)

Real degraded faces: ``real_lq/cropped`` (48 aligned crops, 512 px, restored as aligned crops) and the faces dlib
finds in ``real_lq/whole`` (restored in their photos). Each output face is scored as ``benchmarks/real_world.py``
scores faces, on its S-px aligned crop (FID vs faces128/train, Laplacian variance, noise, identity cosine to the
S-px input), and at the input's own resolution (Laplacian variance share and PSNR vs the input).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clrface.bench import embed_faces, header, markdown_table, resize_square, to_tensor
from clrface.data.io import data_root, list_images, load_image
from clrface.demo import demo_image
from clrface.faces.align import align_faces, warp_face
from clrface.faces.detail import input_face
from clrface.metrics import noref
from clrface.metrics.bootstrap import paired_set_diff_ci
from clrface.metrics.fid import folder_stats, frechet_distance_of_set, inception_features, load_inception
from clrface.options import RestoreOptions
from clrface.photo import restore_photo
from clrface.restorer import Restorer

DATA = data_root()
ROWS = {"today": False, "keep": True}  # row -> keep_detail


def lapvar(img: np.ndarray) -> float:
    """Laplacian variance of the face region of an aligned uint8 [N, N, 3] crop."""
    return float(noref.laplacian_variance(to_tensor(img[None]))[0])


PSNR_CAP = 60.0  # identical images (a face kept as it is) count as 60 dB in means


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(10 * np.log10(255.0**2 / mse), PSNR_CAP)


def clean_portraits(val_faces: int) -> dict[str, np.ndarray]:
    """name -> clean aligned portrait uint8 [N, N, 3] (N = 512 or 1024)."""
    out = {}
    photo = demo_image()
    for n in (512, 1024):
        out[f"astronaut {n}"] = align_faces(photo, n, max_faces=1, resample="bicubic")[0][0]
    for f in list_images(DATA / "faces128" / "val")[:val_faces]:
        face = Image.fromarray(load_image(f))
        for n in (512, 1024):
            out[f"val {f.stem} {n}"] = np.asarray(face.resize((n, n), Image.Resampling.LANCZOS))
    return out


def run_clean(restorer: Restorer, options: RestoreOptions, val_faces: int, log: Callable[[str], None]
              ) -> list[dict[str, Any]]:
    rows = []
    for name, img in clean_portraits(val_faces).items():
        row: dict[str, Any] = {"name": name, "size": img.shape[0], "input_lapvar": lapvar(img)}
        for k, keep in ROWS.items():
            t0 = time.perf_counter()
            res = restore_photo(restorer, img, options, keep_detail=keep)
            row[k] = {"lapvar_share": lapvar(res.image) / row["input_lapvar"], "psnr": psnr(res.image, img),
                      "seconds": time.perf_counter() - t0, "faces": [f.detail for f in res.faces]}
            row["no_face"] = res.no_face
        log(f"{name}: today {row['today']['lapvar_share']:.1%} {row['today']['psnr']:.2f} dB; keep "
            f"{row['keep']['lapvar_share']:.1%} {row['keep']['psnr']:.2f} dB {row['keep']['faces'][:1]}")
        rows.append(row)
    return rows


def run_real(restorer: Restorer, options: RestoreOptions, log: Callable[[str], None], fid_ref: Path | None
             ) -> dict[str, Any]:
    """real_lq: per face, the S-px input and the S-px aligned crops of both outputs, scored as real_world.py does,
    plus Laplacian-variance share and PSNR at the input's own resolution."""
    s = restorer.resolution
    names: list[str] = []
    inputs: list[np.ndarray] = []
    outs: dict[str, list[np.ndarray]] = {k: [] for k in ROWS}
    native: dict[str, list[tuple[float, float]]] = {k: [] for k in ROWS}
    details: list[dict | None] = []
    for f in list_images(DATA / "real_lq" / "cropped"):
        x = load_image(f)
        names.append(f"cropped/{f.stem}")
        inputs.append(resize_square(x, s))
        for k, keep in ROWS.items():
            res = restore_photo(restorer, x, options, aligned=True, keep_detail=keep)
            outs[k].append(resize_square(res.image, s))
            native[k].append((lapvar(res.image) / max(lapvar(x), 1e-9), psnr(res.image, x)))
            if keep:
                details.append(res.faces[0].detail)
        log(f"{f.name}: {details[-1]}")
    for f in list_images(DATA / "real_lq" / "whole"):
        photo = load_image(f)
        res = {k: restore_photo(restorer, photo, options, keep_detail=keep) for k, keep in ROWS.items()}
        for i, face in enumerate(res["today"].faces):
            names.append(f"whole/{f.stem}_{i}")
            inputs.append(warp_face(photo, face.affine, s, resample="bicubic"))
            x_n = input_face(photo, face.affine, s)
            for k in ROWS:
                outs[k].append(warp_face(res[k].image, face.affine, s, resample="bicubic"))
                o_n = input_face(res[k].image, face.affine, s)
                native[k].append((lapvar(o_n) / max(lapvar(x_n), 1e-9), psnr(o_n, x_n)))
            details.append(res["keep"].faces[i].detail)
        log(f"{f.name}: {[fc.detail for fc in res['keep'].faces]}")

    inception, ref = None, None
    if fid_ref is not None:
        inception = load_inception(device=restorer.device)
        ref = folder_stats(fid_ref, inception, log=log)
    faces_in = np.stack(inputs)
    e_input = embed_faces(restorer, faces_in)
    group = np.array([n.split("/")[0] for n in names])
    result: dict[str, Any] = {"names": names, "details": details, "rows": {}}
    all_feats: dict[str, np.ndarray] = {}

    def fid_of(feats: np.ndarray) -> float:
        return frechet_distance_of_set(feats, ref["mu"], ref["sigma"])

    for k, faces in [("input", faces_in)] + [(k, np.stack(v)) for k, v in outs.items()]:
        per = {key: v.numpy() for key, v in noref.noref_scores(to_tensor(faces)).items()}
        per["id_vs_input"] = (embed_faces(restorer, faces) * e_input).sum(-1).numpy()
        feats = None
        if inception is not None:
            feats = all_feats[k] = inception_features(inception, to_tensor(faces))
        row = {}
        for g in ("cropped", "whole", "all"):
            sel = np.ones(len(names), bool) if g == "all" else group == g
            v = {key: float(per[key][sel].mean()) for key in per} | {"n": int(sel.sum())}
            if feats is not None:
                v["fid"] = fid_of(feats[sel])
            if k in native:
                nat = np.array(native[k])[sel]
                v["native_lapvar_share"], v["native_psnr"] = float(nat[:, 0].mean()), float(nat[:, 1].mean())
            row[g] = v
        result["rows"][k] = row
        result.setdefault("per_face", {})[k] = {key: [round(float(x), 5) for x in val] for key, val in per.items()}
    if all_feats:  # FID is a statistic of the set: its change gets a paired bootstrap over faces
        result["fid_keep_minus_today"] = paired_set_diff_ci(fid_of, all_feats["keep"], all_feats["today"])
    return result


def _pct(v: float) -> str:
    return f"{v:.1%}"


def format_markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["clean"]:
        if r["no_face"]:
            rows.append([r["name"].rsplit(" ", 1)[0], r["size"], round(r["input_lapvar"], 1), "no face found",
                         "", "", "", "", ""])
            continue
        e = r["keep"]["faces"][0]
        rows.append([r["name"].rsplit(" ", 1)[0], r["size"], round(r["input_lapvar"], 1),
                     _pct(r["today"]["lapvar_share"]), f"{r['today']['psnr']:.2f}",
                     _pct(r["keep"]["lapvar_share"]), f"{r['keep']['psnr']:.2f}",
                     f"{e.get('gate', float('nan')):.2f}", f"{e.get('high_weight', float('nan')):.2f}"])
    for n in (512, 1024):
        sel = [r for r in result["clean"] if r["size"] == n and not r["no_face"]]
        ok = sum(r["keep"]["lapvar_share"] >= 0.9 and r["keep"]["psnr"] >= 32 for r in sel)
        ok_today = sum(r["today"]["lapvar_share"] >= 0.9 and r["today"]["psnr"] >= 32 for r in sel)
        if sel:
            rows.append(["**pass (>= 90 %, >= 32 dB)**", n, "", f"{ok_today}/{len(sel)}", "", f"{ok}/{len(sel)}",
                         "", "", ""])
    lines = [markdown_table(["clean portrait", "px", "input Lap. var", "today: Lap. var kept", "today: PSNR dB",
                             "keep detail: Lap. var kept", "keep detail: PSNR dB", "gate", "high-band weight"], rows)]
    real = result.get("real")
    if real:
        for g in ("cropped", "whole", "all"):
            tab = []
            for k, label in (("input", "input (S px)"), ("today", "restored, --no-keep-detail"),
                             ("keep", "restored, --keep-detail")):
                v = real["rows"][k][g]
                tab.append([label, f"{v['fid']:.1f}" if "fid" in v else "–", f"{v['laplacian_var']:.1f}",
                            f"{v['noise_sigma']:.2f}", f"{v['excess_laplacian_var']:.1f}", f"{v['id_vs_input']:.4f}",
                            _pct(v["native_lapvar_share"]) if "native_psnr" in v else "–",
                            f"{v['native_psnr']:.2f}" if "native_psnr" in v else "–"])
            lines += ["", f"real_lq {g} ({real['rows']['input'][g]['n']} faces)", "",
                      markdown_table(["row", "FID ↓", "Laplacian var", "noise σ̂", "excess Lap. var",
                                      "ID cos vs input ↑", "native Lap. var kept", "native PSNR dB"], tab)]
        if "fid_keep_minus_today" in real:
            d, lo, hi = real["fid_keep_minus_today"]
            lines += ["", f"FID change with keep-detail, all faces: {d:+.2f} [{lo:+.2f}, {hi:+.2f}] (paired bootstrap "
                          "95 % interval over faces)"]
        det = [d for d in real["details"] if d is not None]
        gates = np.array([d["gate"] for d in det])
        hw = np.array([d["high_weight"] for d in det])
        lines += ["", (f"real_lq weights: gate > 0 on {int((gates > 0).sum())} of {len(det)} faces (mean "
                       f"{gates.mean():.3f}, max {gates.max():.2f}); high-band weight mean {hw.mean():.2f}, "
                       f"> 0 on {int((hw > 0).sum())}")]
    lines += ["", f"PSNR capped at {PSNR_CAP:.0f} dB (identical images) before means.", result["meta"]["header"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default="runs/keep-detail")
    ap.add_argument("--val-faces", type=int, default=8, help="clean faces128/val faces enlarged to 512 and 1024 px")
    ap.add_argument("--no-real", action="store_true", help="clean portraits only")
    ap.add_argument("--fid-ref", default=str(DATA / "faces128" / "train"), help="'' to skip FID")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    restorer = Restorer.from_pretrained(args.model)
    options = restorer.options()
    result: dict[str, Any] = {"meta": {"model": restorer.source, "resolution": restorer.resolution,
                                       "header": header(restorer.device, args.threads)}}
    result["clean"] = run_clean(restorer, options, args.val_faces, log)
    if not args.no_real:
        result["real"] = run_real(restorer, options, log, Path(args.fid_ref) if args.fid_ref else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "keep_detail.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(format_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
