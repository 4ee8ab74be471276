"""Packs what a GPU training session needs into .gpu/ (git-ignored; it is copied with the repository to a GPU
machine that has neither the data folder nor the dlib models), sized to a byte budget:

    .gpu/faces.zip           train/*.webp: training faces, evenly spread over the given folders, re-encoded as WebP
                             (quality 85: ~2.2 KB and ~39 dB to the 128-px JPEG originals); val/*.jpg: the first
                             --val faces of the validation folder. One stored (uncompressed) zip: thousands of small
                             files cost ~4 KB of disk each and copy slowly;
                             benchmarks/gpu_session.sh unpacks it into .gpu/data/
    .gpu/cache/facerec/      the dlib face-recognition ResNet, fp16, in the cache layout of identity/facerec.py
    .gpu/init/NAME/          with --init NAME=DIR: the model folder DIR (a run's model/), fp16, to start a run from
                             (stage.init_from); the runs of benchmarks/gpu_session.sh that need one name it

    python benchmarks/gpu_data.py --budget-mib 18 --init irn-deep=runs/irn-b128-deep-id2a05/model
"""

from __future__ import annotations

import argparse
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from clrface.data.datasets import IMAGE_SUFFIXES
from clrface.data.io import cache_root
from clrface.identity.facerec import load_facerec

ROOT = Path(__file__).resolve().parents[1]


def save_fp16(src: Path, dst: Path) -> None:
    """A safetensors file with its floating-point tensors in fp16 (the bytes halved), metadata kept; ``dst`` may be
    ``src``."""
    with safe_open(str(src), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(dst), metadata=meta)


def name_and_folder(item: str) -> tuple[str, Path]:
    """--init's NAME=DIR, DIR a model folder (config.json + model.safetensors)."""
    name, sep, folder = item.partition("=")
    if not sep or not name or not (Path(folder) / "model.safetensors").is_file():
        raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=DIR, DIR holding model.safetensors")
    return name, Path(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", nargs="+",
                    default=["../shared/data/faces128/train", "../shared/data/faces128/train_extra"])
    ap.add_argument("--val-dir", default="../shared/data/faces128/val")
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--budget-mib", type=float, default=18.0, help="MiB for the training faces")
    ap.add_argument("--quality", type=int, default=85)
    ap.add_argument("--init", nargs="*", type=name_and_folder, default=[], metavar="NAME=DIR",
                    help="model folders carried (fp16) as .gpu/init/NAME, the start weights of a run (without "
                         "--init, those already in .gpu/init stay)")
    ap.add_argument("--out", default=str(ROOT / ".gpu"))
    a = ap.parse_args()
    out = Path(a.out)
    inits = dict(a.init)
    shutil.rmtree(out / "data", ignore_errors=True)
    if inits:
        shutil.rmtree(out / "init", ignore_errors=True)
    out.mkdir(exist_ok=True)
    for name, src in inits.items():
        save_fp16(src / "model.safetensors", out / "init" / name / "model.safetensors")
        shutil.copy(src / "config.json", out / "init" / name / "config.json")
    faces = zipfile.ZipFile(out / "faces.zip", "w", zipfile.ZIP_STORED)

    load_facerec()  # fills the local cache if it is empty
    save_fp16(cache_root() / "facerec" / "dlib_resnet_v1.safetensors",
              out / "cache" / "facerec" / "dlib_resnet_v1.safetensors")

    for p in sorted(Path(a.val_dir).iterdir())[: a.val]:
        faces.write(p, f"val/{p.name}")

    files = sorted(p for d in a.train for p in Path(d).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    encoded = []
    for p in files:  # every face once, then keep an even spread that fits
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, "WEBP", quality=a.quality)
        encoded.append((p.stem, buf.getvalue()))
    sizes = np.array([len(b) for _, b in encoded])
    n = min(len(encoded), int(a.budget_mib * 2**20 / sizes.mean()))
    while n and sizes[np.linspace(0, len(encoded) - 1, n).round().astype(int)].sum() > a.budget_mib * 2**20:
        n -= 50
    keep = np.unique(np.linspace(0, len(encoded) - 1, n).round().astype(int))
    for i in keep:
        faces.writestr(f"train/{encoded[i][0]}.webp", encoded[i][1])
    faces.close()
    print(f"{len(keep)} of {len(files)} training faces, {sizes[keep].sum() / 2**20:.1f} MiB; "
          f"{a.val} validation faces; facerec fp16" + "".join(f"; {n} from {d}" for n, d in inits.items()))


if __name__ == "__main__":
    main()
