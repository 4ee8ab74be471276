"""Torch vs onnxruntime, per face: the same restore of aligned faces in both runtimes.

    python benchmarks/onnx_speed.py --model default --threads 1 --reps 3 [--onnx DIR] [--md docs/RESULTS.md]

The faces are the demo portrait's face (``clrface.demo.demo_image()``), FFHQ-aligned at the model's S and degraded
with the bfr preset, repeated to 1 and ``--batch`` (16) faces. Modes: ``irn`` and ``prior`` (the model's default
fidelity, so sigma_start from its fidelity map, ``--steps`` Heun steps = 2 steps - 1 denoiser calls). Columns, ms
per face, median of ``--reps`` runs after one warm-up run:

* torch restore_faces: ``Restorer.restore_faces`` as the pipeline runs it, identity scores included (the dlib
  face recogniser embeds input, IRN output and result);
* torch nets: the same network work as the ONNX runtime does, no identity scores (IRN; or encode, sampler,
  decode);
* onnxruntime: ``OnnxRestorer.restore_faces`` on the graphs of ``clrface export onnx`` (exported into a
  temporary folder unless ``--onnx`` names one), with the same start noise as torch.

torch and onnxruntime both get ``--threads`` intra-op threads. The table is printed and, with ``--md``,
appended to that file under a header naming the machine and the exact command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np
import onnxruntime
import torch

from clrface.bench import command_line, header, markdown_table, time_ms
from clrface.data.degradation import degrade, get_preset
from clrface.data.io import to_model_range
from clrface.demo import DEMO_SEED, demo_image
from clrface.export import export_restorer
from clrface.faces.align import align_faces
from clrface.onnx_runtime import OnnxRestorer
from clrface.options import RestoreOptions
from clrface.restorer import Restorer, face_noise


def demo_faces(size: int, n: int) -> torch.Tensor:
    """[n,3,S,S] in [-1,1]: the bfr-degraded demo face, repeated (content does not change the cost)."""
    crop = align_faces(demo_image(), size, max_faces=1)[0][0]
    lq, _ = degrade(crop, get_preset("bfr", size), DEMO_SEED)
    return to_model_range(np.repeat(lq[None], n, 0))


def torch_nets(restorer: Restorer, x: torch.Tensor, o: RestoreOptions, noise: torch.Tensor) -> torch.Tensor:
    """The network work of ``restore_faces`` for modes irn/prior (what the ONNX runtime does), no identity scores."""
    with torch.no_grad():
        if o.mode == "irn":
            return restorer.run_irn(x)
        sigma_start, _ = o.resolve(restorer.fidelity_map)
        z_d = restorer.encode(x)
        z_init = torch.zeros_like(z_d) if sigma_start >= restorer.prior.config.schedule.sigma_max else z_d
        z = restorer.refine(z_init, restorer.denoiser(z_d, None, 0.0), sigma_start, o, noise)
        return restorer.decode(z).clamp(-1, 1)


def measure(restorer: Restorer, runtime: OnnxRestorer, x: torch.Tensor, o: RestoreOptions, reps: int
            ) -> dict[str, float]:
    """{column: ms per face} for the batch x and options o, plus the max abs difference torch vs onnxruntime."""
    b = x.shape[0]
    h = restorer.resolution // restorer.vqgan.config.downsample
    noise = face_noise((b, restorer.vqgan.config.latent_channels, h, h), o.seed, 0)
    xo, oo = x.numpy(), runtime.options(**{k: getattr(o, k) for k in ("mode", "steps", "sampler", "fidelity")})
    out = {
        "torch restore_faces": time_ms(lambda: restorer.restore_faces(x, o), reps) / b,
        "torch nets": time_ms(lambda: torch_nets(restorer, x, o, noise), reps) / b,
        "onnxruntime": time_ms(lambda: runtime.restore_faces(xo, oo, noise=noise.numpy()[:, None]), reps) / b,
    }
    ref = restorer.restore_faces(x, o).restored[:, 0].numpy()
    out["max |diff|"] = float(np.abs(runtime.restore_faces(xo, oo, noise=noise.numpy()[:, None])["restored"][:, 0]
                                     - ref).max())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="model folder or installed name (default: %(default)s)")
    ap.add_argument("--onnx", help="folder written by `clrface export onnx` for --model (default: export now)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime (default 1)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per cell after one warm-up (default 3)")
    ap.add_argument("--batch", type=int, default=16, help="faces in the batch row (default 16)")
    ap.add_argument("--steps", type=int, default=10, help="Heun steps in mode prior (default 10)")
    ap.add_argument("--md", help="append the table to this markdown file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    restorer = Restorer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.onnx
        if folder is None:
            folder = str(export_restorer(restorer, tmp).parent)
        runtime = OnnxRestorer(folder, threads=args.threads)
        faces = demo_faces(restorer.resolution, args.batch)
        rows = []
        for mode in ("irn", "prior"):
            o = restorer.options(mode=mode, steps=args.steps, sampler="heun", samples=1)
            for b in (1, args.batch):
                t = measure(restorer, runtime, faces[:b], o, args.reps)
                sigma = o.resolve(restorer.fidelity_map)[0] if mode == "prior" else 0.0
                label = ("irn" if mode == "irn"
                         else f"prior, Heun {args.steps} ({2 * args.steps - 1} NFE, sigma_start {sigma:.3g})")
                rows.append((label, b, t))
                print(f"{label}, {b} face(s): " + ", ".join(f"{k} {v:.4g}" for k, v in t.items()), file=sys.stderr)

    env = header("cpu", args.threads, command_line(argv)) + f"; onnxruntime {onnxruntime.__version__}"
    cells = [(label, b, f"{t['torch restore_faces']:.0f}", f"{t['torch nets']:.0f}", f"{t['onnxruntime']:.0f}",
              f"{t['torch nets'] / t['onnxruntime']:.2f}x", f"{t['max |diff|']:.1e}") for label, b, t in rows]
    table = (f"ONNX vs torch, ms per face, median of {args.reps} runs\n\n{env}\n\n"
             + markdown_table(["mode", "faces", "torch restore_faces (incl. id scores)", "torch nets", "onnxruntime",
                               "nets / ORT", "max abs diff"], cells))
    print(table)
    if args.md:
        with open(args.md, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
