"""Time each stage of a restore: detect, align, IRN, encode, denoiser, refine, decode, paste.

    python benchmarks/restore_speed.py --model default --threads 2 --reps 5 [--md docs/RESULTS.md]
    python benchmarks/restore_speed.py --model runs/pack --device cuda --dtype float32 bfloat16 --reps 10

For 1 face and for a batch of ``--batch`` (16) faces at the model's resolution S, each stage is run once to
warm up and then ``--reps`` times; the table gives the median in ms (for the batch: ms per face). The faces
are the first aligned face of ``--photo`` (a whole photo from shared/data/real_lq/whole), repeated; content
does not change the cost of any stage except detection. Photo stages (dlib detect + landmarks, FFHQ warp,
bicubic paste-back) run on the CPU with dlib's / numpy's own threading whatever ``--device`` is; detection is
per photo, so its batch column is empty. One table per ``--dtype`` (bf16/fp16: the nets under autocast, as
``Restorer``). The table is printed and, with ``--md``, appended to that file under a header naming the
machine (CPU model, threads, GPU, torch version, date) and the exact command.

Rows "refine" run the whole reverse ODE with the model's default RestoreOptions (fidelity 0.5: sigma_start and
guidance scale from its fidelity map) and with ``--steps`` other step counts; "identity gradient" is the
part of a guided denoiser call that guidance adds (decode G(Q(.)) + face recogniser forward and backward).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from clrface.bench import command_line, header, markdown_table, time_ms
from clrface.data.io import data_root, load_image, to_model_range, to_uint8
from clrface.device import DTYPES, resolve_device
from clrface.diffusion.sampler import nfe
from clrface.errors import ClrfaceError
from clrface.faces.align import align_face
from clrface.faces.detect import detect_faces
from clrface.faces.paste import paste_face
from clrface.identity.facerec import load_facerec
from clrface.options import RestoreOptions
from clrface.restorer import Restorer

DEFAULT_PHOTO = data_root() / "real_lq" / "whole" / "gfpgan_00.jpg"
NA = float("nan")  # a stage with no batch figure (detection is per photo)


# ------------------------------------------------------------------------------------------ stages


@dataclasses.dataclass
class PhotoFace:
    """The face the model stages run on: crop uint8 [S,S,3], its affine [2,3] and the dlib Face it came from."""

    photo: np.ndarray
    face: object
    crop: np.ndarray
    affine: np.ndarray
    n_faces: int


def first_face(photo: np.ndarray, size: int) -> PhotoFace:
    """Detects and aligns ``photo`` uint8 [H,W,3]; the largest face. Raises ClrfaceError when none is found."""
    faces = detect_faces(photo)
    if not faces:
        raise ClrfaceError("restore_speed: no face found in the photo; pass another --photo")
    crop, info = align_face(photo, faces[0], size)
    return PhotoFace(photo, faces[0], crop, info.affine, len(faces))


def photo_stage_times(pf: PhotoFace, size: int, n: int, reps: int) -> dict[str, tuple[float, float]]:
    """{stage: (ms for 1 face, total ms for n faces)} of detect (per photo: NaN for n), align and paste-back.

    align/paste of n faces repeat the same face n times: both cost per face and are independent of the others.
    """
    canvas = pf.photo.copy()

    def align(k: int) -> None:
        for _ in range(k):
            align_face(pf.photo, pf.face, size)

    def paste(k: int) -> None:
        for _ in range(k):
            paste_face(canvas, pf.crop, pf.affine, affine_size=size, interpolation="bicubic", out=canvas)

    return {
        "detect": (time_ms(lambda: detect_faces(pf.photo), reps), NA),
        "align": (time_ms(lambda: align(1), reps), time_ms(lambda: align(n), reps)),
        "paste": (time_ms(lambda: paste(1), reps), time_ms(lambda: paste(n), reps)),
    }


def default_refine(restorer: Restorer, options: RestoreOptions) -> tuple[float, float, int]:
    """(sigma_start, guidance_scale, nfe) the restorer uses for ``options``."""
    s, g = options.resolve(restorer.fidelity_map)
    return s, g, nfe(options.sampler, options.steps) if s > 0 else 0


def model_stage_times(restorer: Restorer, x: Tensor, reps: int, options: RestoreOptions | None = None,
                      steps: tuple[int, ...] = ()) -> dict[str, float]:
    """{stage: total ms} of every model stage for the batch x [B,3,S,S] in [-1,1] on ``restorer``'s device/dtype.

    Stages (keys): irn, encode, embed, denoise, denoise_guided, id_grad, refine (``options``), refine_<k>
    (``options`` with k steps, for k in ``steps``), decode, restore_faces (the whole of ``restore_faces`` with
    ``options``), restore_default (with the model's restore.json defaults) and, for one face, aligned_api
    (``Restorer.restore(crop, aligned=True)`` with the defaults: what ``clrface restore --aligned`` runs per crop).
    The guided rows use scale = max(the options' scale, 1), so guidance is timed even where the default is 0.
    """
    o = options or RestoreOptions()
    dev = restorer.device
    x = x.to(dev, torch.float32)
    b = x.shape[0]
    sigma_start, scale, _ = default_refine(restorer, o)
    g_scale = max(scale, 1.0)
    t: dict[str, float] = {}
    with torch.no_grad(), restorer.autocast():  # as restore_faces: no_grad (not inference_mode), autocast
        t["irn"] = time_ms(lambda: restorer.run_irn(x), reps, dev, f"{b} x irn")
        t["encode"] = time_ms(lambda: restorer.encode(x), reps, dev, f"{b} x encode")
        x_id = restorer.run_irn(x)
        t["embed"] = time_ms(lambda: restorer.embed(x_id), reps, dev, f"{b} x embed")
        z_d, z_init, e_id = restorer.encode(x), restorer.encode(x_id), restorer.embed(x_id)
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(z_d.shape, generator=gen)
        sig = torch.full((x.shape[0],), max(sigma_start, 1e-3), device=dev)  # a mid-schedule noise level
        z_t = z_init + sig.view(-1, 1, 1, 1) * noise.to(dev)
        plain = restorer.denoiser(z_d, None, 0.0)
        guided = restorer.denoiser(z_d, e_id, g_scale)
        t["denoise"] = time_ms(lambda: plain(z_t, sig), reps, dev, f"{b} x denoise")
        t["denoise_guided"] = time_ms(lambda: guided(z_t, sig), reps, dev, f"{b} x denoise_guided")
        z0 = plain(z_t, sig)

        def id_grad() -> Tensor:
            with torch.enable_grad():
                z = z0.detach().requires_grad_(True)
                e = torch.nn.functional.normalize(restorer.embed(restorer.decode(z)), dim=-1)
                return torch.autograd.grad((1 - (e * e_id).sum(-1)).sum(), z)[0]

        t["id_grad"] = time_ms(id_grad, reps, dev, f"{b} x id_grad")
        den = restorer.denoiser(z_d, e_id, scale)
        t["refine"] = time_ms(lambda: restorer.refine(z_init, den, sigma_start, o, noise), reps, dev, f"{b} x refine")
        for k in steps:
            ok = dataclasses.replace(o, steps=k)
            t[f"refine_{k}"] = time_ms(lambda: restorer.refine(z_init, den, sigma_start, ok, noise), reps, dev,
                                       f"{b} x refine_{k}")
        t["decode"] = time_ms(lambda: restorer.decode(z_init), reps, dev, f"{b} x decode")
    ob = dataclasses.replace(o, batch_size=b)
    t["restore_faces"] = time_ms(lambda: restorer.restore_faces(x, ob), reps, dev, f"{b} x restore_faces")
    od = restorer.options(batch_size=b)
    t["restore_default"] = time_ms(lambda: restorer.restore_faces(x, od), reps, dev, f"{b} x restore_default")
    if b == 1:  # the user's call on one aligned crop: uint8 in, resize, restore, identity scores, uint8 out
        crop = to_uint8(x[:1])[0].numpy()
        t["aligned_api"] = time_ms(lambda: restorer.restore(crop, aligned=True), reps, dev, "1 x aligned_api")
    return t


# ------------------------------------------------------------------------------------------ report


def stage_labels(restorer: Restorer, options: RestoreOptions, steps: tuple[int, ...], photo_desc: str
                 ) -> list[tuple[str, str]]:
    """[(key, table label)] in pipeline order."""
    s = restorer.resolution
    d = restorer.options()
    default_desc = f"mode {d.mode}" + ("" if d.mode in ("irn", "direct") else f", {d.sampler} {d.steps} steps")
    sigma, scale, calls = default_refine(restorer, options)
    g = max(scale, 1.0)

    def ref(k: int) -> str:
        return (f"refine, {options.sampler} {k} steps ({nfe(options.sampler, k) if sigma > 0 else 0} NFE, "
                f"sigma_start {sigma:.3g}, guidance {scale:.3g})")

    rows = [
        ("detect", f"detect: dlib HOG + 68 landmarks, whole photo {photo_desc} (per photo)"),
        ("align", f"align: FFHQ warp to {s} px"),
        ("irn", "IRN"),
        ("encode", "VQGAN encode (done twice per restore: x_d and x_id)"),
        ("embed", "face recogniser embed (forward)"),
        ("denoise", "denoiser call, no guidance"),
        ("denoise_guided", f"denoiser call, identity-guided (scale {g:.3g})"),
        ("id_grad", "  of which identity gradient: decode + facerec fwd + bwd"),
        ("refine", ref(options.steps)),
    ]
    rows += [(f"refine_{k}", ref(k)) for k in steps]
    rows += [
        ("decode", "VQGAN decode G(Q(z))"),
        ("paste", "paste-back (bicubic) into the photo"),
        ("restore_faces", f"restore_faces total, {options.mode} mode (fidelity {options.fidelity}, {calls} NFE)"),
        ("restore_default", f"restore_faces total, the model's defaults ({default_desc})"),
        ("aligned_api", "Restorer.restore(crop, aligned=True), defaults: uint8 crop in, uint8 out"),
    ]
    return rows


def stage_table(rows: list[tuple[str, str]], one: dict[str, float], many: dict[str, float], n: int) -> str:
    """| stage | 1 face ms | n faces ms per face |; ``many`` holds totals for the n-face batch (NaN: not applicable)."""
    return markdown_table(["stage", "1 face (ms)", f"{n} faces (ms per face)"],
                          [(label, one.get(key, NA), many.get(key, NA) / n) for key, label in rows], fmt=".1f")


def run_benchmark(model: str | Path, photo: np.ndarray, *, device: str = "cpu", dtype: str = "float32",
                  reps: int = 5, batch: int = 16, steps: tuple[int, ...] = (), options: RestoreOptions | None = None,
                  facerec: torch.nn.Module | None = None, photo_name: str = "photo", batch_reps: int | None = None,
                  aligned: bool = False) -> str:
    """Times every stage for 1 face and for ``batch`` faces; returns the markdown section (title + table).
    ``aligned``: ``photo`` is an aligned face crop; the photo stages (detect, align, paste) are left out."""
    o = options or RestoreOptions()
    dev = resolve_device(device)
    r = Restorer.from_pretrained(model, dev, DTYPES[dtype], facerec=facerec)
    s = r.resolution
    if aligned:  # photo is already an aligned crop: model stages only (no dlib needed)
        crop = np.array(Image.fromarray(photo).resize((s, s), Image.BICUBIC))
        photo_t, desc = {}, f"{photo_name} (aligned crop, no photo stages)"
    else:
        pf = first_face(photo, s)
        crop, photo_t = pf.crop, photo_stage_times(pf, s, batch, reps)
        desc = f"{photo_name} {photo.shape[1]}x{photo.shape[0]}, {pf.n_faces} faces"
    x1 = to_model_range(crop[None])
    xn = x1.expand(batch, -1, -1, -1).contiguous()
    one = {k: v[0] for k, v in photo_t.items()} | model_stage_times(r, x1, reps, o, steps)
    many = {k: v[1] for k, v in photo_t.items()} | model_stage_times(r, xn, batch_reps or reps, o, steps)
    rows = stage_labels(r, o, steps, desc)
    title = (f"#### Restore speed: {r.source}, {dev}, {dtype}, S = {s} px, median of {reps} (batch: "
             f"{batch_reps or reps}) after 1 warm-up")
    return title + "\n\n" + stage_table(rows, one, many, batch)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder (vqgan/ prior/ [irn/ mask/]) or installed name")
    ap.add_argument("--photo", default=str(DEFAULT_PHOTO), help="a whole photo with at least one face")
    ap.add_argument("--aligned", action="store_true",
                    help="--photo is an aligned face crop: time the model stages only (no dlib detect/align/paste)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="*", default=[5, 10], help="extra refine step counts")
    ap.add_argument("--full-steps", type=int, default=10, help="steps of the full-mode refine and restore_faces rows")
    ap.add_argument("--sampler", default="heun", help="sampler of the refine and full-mode rows")
    ap.add_argument("--batch-reps", type=int, help="reps for the batch (default: --reps)")
    ap.add_argument("--md", help="append the report to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    photo = load_image(args.photo)
    facerec = load_facerec(dev)
    script = sys.argv[0] if argv is None else __file__  # called from a test: name the script, not pytest
    parts = [f"### Restore speed by stage ({datetime.date.today().isoformat()})",
             header(dev, args.threads, command_line(argv, script))]
    print("\n\n".join(parts), flush=True)
    full = RestoreOptions(mode="full", steps=args.full_steps, sampler=args.sampler)
    for dt in args.dtype:
        parts.append(run_benchmark(args.model, photo, device=args.device, dtype=dt, reps=args.reps, batch=args.batch,
                                   steps=tuple(args.steps), options=full, facerec=facerec,
                                   photo_name=Path(args.photo).name, batch_reps=args.batch_reps,
                                   aligned=args.aligned))
        print("\n" + parts[-1], flush=True)
    report = "\n\n".join(parts) + "\n"
    if args.md:
        with open(args.md, "a") as f:
            f.write("\n" + report)
    return report


if __name__ == "__main__":
    main()
