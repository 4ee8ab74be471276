"""Datasets over folders of aligned faces (the layout of shared/data: flat folders of JPEG/PNG faces)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clrface.data.degradation import DegradationConfig, degrade, get_preset
from clrface.data.io import (
    IMAGE_EXTENSIONS,
    ensure_not_input,
    list_images,
    load_image,
    output_names,
    save_image,
    to_model_range,
    to_uint8,
)
from clrface.data.realistic import RealisticConfig, degrade_realistic
from clrface.errors import ClrfaceError, ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_face_folder(folder: str | Path | list[str | Path], size: int | None = None,
                     limit: int | None = None) -> torch.Tensor:
    """Loads every face image of a flat folder into memory: uint8 [N, S, S, 3], sorted by file name.
    A list of folders is read in order and concatenated (e.g. ``[faces128/train, faces128/train_extra]``);
    ``limit`` then applies to the whole.

    Faces are small (128 px: ~50 KB each), so the whole training set fits in RAM and decoding
    happens once instead of every epoch.
    """
    if isinstance(folder, (list, tuple)):
        if not folder:
            raise ClrfaceError("no face folders given")
        faces = torch.cat([load_face_folder(f, size=size) for f in folder])
        return faces[:limit] if limit else faces
    folder = Path(folder)
    if not folder.is_dir():
        where = "" if folder.is_absolute() else f" (relative to the current folder {Path.cwd()})"
        raise ClrfaceError(f"{folder}: no such folder{where}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ClrfaceError(f"{folder}: no face images found")
    files = files[:limit] if limit else files

    def read(p: Path) -> np.ndarray:
        im = Image.open(p).convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im)

    with ThreadPoolExecutor(4) as ex:
        arrays = list(ex.map(read, files))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ClrfaceError(f"{folder}: faces have different sizes {sorted(shapes)[:3]}; pass size=")
    return torch.from_numpy(np.stack(arrays))


# ---------------------------------------------------------------- paired (GT, LQ) faces


def _resize_square(img: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 HWC to size x size with PIL bicubic (the resize of ``load_face_folder``); None keeps it."""
    if size is None or img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def _config_for(preset: str | DegradationConfig, size: int) -> DegradationConfig:
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    return cfg.scale_to(size)


class PairedFaces(torch.utils.data.Dataset):
    """Aligned faces with a synthetic degradation drawn on the fly (numpy path of ``degradation``).

    Items: ``dict(gt=[3, S, S], lq=[3, S, S], params=dict, index=int)``, images float in [-1, 1];
    ``params`` holds no None, so the default collate works.

    source: a folder (read once with ``load_face_folder``) or a uint8 tensor [N, S, S, 3] from it.
    preset: a ``PRESETS`` name or a ``DegradationConfig``; either is scaled to S (``scale_to``).
    deterministic: item i always uses seed ``base_seed + i`` (validation; equals ``build_testset``);
        otherwise seeds come from torch's global RNG, which DataLoader seeds per worker and epoch.
    hflip: flip GT and LQ together with probability 1/2 (training augmentation).
    """

    def __init__(
        self,
        source: str | Path | torch.Tensor,
        preset: str | DegradationConfig = "bfr",
        *,
        size: int | None = None,
        deterministic: bool = False,
        base_seed: int = 0,
        hflip: bool = False,
        limit: int | None = None,
    ):
        if isinstance(source, torch.Tensor):
            faces = source[:limit] if limit else source
            if size is not None and faces.shape[1:3] != (size, size):
                faces = torch.from_numpy(np.stack([_resize_square(f.numpy(), size) for f in faces]))
        else:
            faces = load_face_folder(source, size=size, limit=limit)
        if faces.dtype != torch.uint8 or faces.ndim != 4 or faces.shape[3] != 3 or faces.shape[1] != faces.shape[2]:
            raise ClrfaceError(f"PairedFaces needs uint8 [N, S, S, 3] faces, got {faces.dtype} {tuple(faces.shape)}")
        self.faces = faces
        self.size = int(faces.shape[1])
        self.cfg = _config_for(preset, self.size)
        self.deterministic = deterministic
        self.base_seed = base_seed
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> dict:
        if self.deterministic:
            seed = self.base_seed + index
        else:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        rng = np.random.default_rng(seed)
        gt = self.faces[index].numpy()
        if self.hflip and rng.random() < 0.5:
            gt = np.ascontiguousarray(gt[:, ::-1])
        lq, params = degrade(gt, self.cfg, rng)
        pair = to_model_range(torch.from_numpy(np.stack([gt, lq])))
        return {"gt": pair[0], "lq": pair[1], "params": params.to_dict(), "index": index}


# ---------------------------------------------------------------- files: test sets and `clrface degrade`


def _write_manifest(path: Path, manifest: dict) -> dict:
    """Writes atomically; returns the manifest as read back (tuples become lists), so callers see the file."""
    text = json.dumps(manifest, indent=1) + "\n"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return json.loads(text)


def build_testset(
    src_folder: str | Path,
    out_folder: str | Path,
    preset: str = "bfr",
    seed: int = 0,
    size: int | None = None,
    limit: int | None = None,
    *,
    realistic: RealisticConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Writes a fixed synthetic test set (CelebA-Test-like): ``out/gt/*.png``, ``out/lq/*.png``, ``out/manifest.json``.

    Image i of the sorted source folder (``list_images``) gets seed ``seed + i``, so
    ``PairedFaces(src, preset, size=size, deterministic=True, base_seed=seed)`` yields the same pairs.
    Faces must be square unless ``size`` resizes them. Unreadable files are reported (``log``) and
    listed under ``failures``; the rest is written. The manifest's ``config`` is the 512-px preset;
    each image's ``params`` were drawn from ``config.scale_to(image["size"])``. Returns the manifest.

    ``realistic``: the preset's round inside the realistic mix of ``data/realistic.py`` instead (a second round,
    faded colours, grain, grayscale; image i drawn from a torch generator seeded ``seed + i``); a face made gray
    has a gray ``gt``. The manifest then records the mix, not per-image parameters.
    """
    src, out = Path(src_folder), Path(out_folder)
    if not src.is_dir():
        raise ClrfaceError(f"{src}: not a folder")
    files = list_images(src)
    if limit is not None and limit < 1:
        raise ClrfaceError(f"limit must be at least 1, got {limit}")
    files = files[:limit]
    if not files:
        raise ClrfaceError(f"{src}: no images found")
    cfg0 = get_preset(preset)
    images, failures = [], []
    for i, (f, stem) in enumerate(zip(files, output_names(files))):
        name = stem + ".png"  # a.jpg beside a.png: a_jpg.png, a_png.png, never one pair over the other
        try:
            gt = _resize_square(load_image(f), size)
            if gt.shape[0] != gt.shape[1]:
                raise ImageError(f, f"not square ({gt.shape[1]}x{gt.shape[0]}); pass size= to resize")
            if realistic is None:
                lq, params = degrade(gt, cfg0.scale_to(gt.shape[0]), seed + i)
            else:
                x_d, x = degrade_realistic(to_model_range(gt[None]), cfg0.scale_to(gt.shape[0]), realistic,
                                           torch.Generator().manual_seed(seed + i))
                lq, gt, params = to_uint8(x_d)[0].numpy(), to_uint8(x)[0].numpy(), None
            save_image(out / "gt" / name, gt, inputs=files)
            save_image(out / "lq" / name, lq, inputs=files)
        except ClrfaceError as e:
            failures.append({"source": str(f), "error": str(e)})
            if log:
                log(f"skipped: {e}")
            continue
        images.append({"name": name, "source": f.name, "seed": seed + i, "size": int(gt.shape[0]),
                       **({"params": params.to_dict()} if params is not None else {})})
    manifest = {"preset": preset, "config": dataclasses.asdict(cfg0), "seed": seed, "size": size,
                "source": str(src), "images": images, "failures": failures}
    if realistic is not None:
        manifest["realistic"] = dataclasses.asdict(realistic)
    out.mkdir(parents=True, exist_ok=True)
    return _write_manifest(out / "manifest.json", manifest)


def degrade_files(
    inp: str | Path,
    out: str | Path,
    preset: str = "bfr",
    seed: int = 0,
    size: int | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Degrades one image or every image of a folder (the ``clrface degrade`` command).

    A file with an image-suffixed ``out`` writes that file plus ``<out>.json``; otherwise ``out`` is a
    folder receiving ``<name>.png`` per image (:func:`clrface.data.io.output_names`: the stem, ``a_jpg`` where
    stems clash) and ``manifest.json``. Image i (sorted) uses seed ``seed + i``; the preset is scaled to ``size``
    (images resized to size x size first, a non-square one stretched, with a warning) or, without ``size``, to
    each image's shorter side. In a folder run failures are logged, listed and skipped (a single file raises);
    inputs are never overwritten.
    Returns the manifest.
    """
    inp, out = Path(inp), Path(out)
    files = list_images(inp)
    if not files:
        raise ClrfaceError(f"{inp}: no images found")
    single = inp.is_file() and out.suffix.lower() in IMAGE_EXTENSIONS  # save_image rejects e.g. .webp
    if inp.is_dir() and out.suffix.lower() in IMAGE_EXTENSIONS:
        raise ClrfaceError(f"{out}: a folder input writes a folder of images; give a folder name, not an image file")
    if single:
        targets = [out]
        manifest_path = out.with_suffix(".json")
    else:
        targets = [out / f"{name}.png" for name in output_names(files)]
        manifest_path = out / "manifest.json"
    for t in [*targets, manifest_path]:
        ensure_not_input(t, files)
    cfg0 = get_preset(preset)
    images, failures = [], []
    for i, (f, t) in enumerate(zip(files, targets)):
        try:
            img = load_image(f)
            if size is not None and img.shape[0] != img.shape[1] and log:
                log(f"clrface: warning: {f}: {img.shape[1]}x{img.shape[0]} stretched to {size}x{size} (--size "
                    "makes images square; crop it square first to keep its proportions)")
            img = _resize_square(img, size)
            cfg = cfg0.scale_to(size or min(img.shape[:2]))
            lq, params = degrade(img, cfg, seed + i)
            save_image(t, lq, inputs=files)
        except ClrfaceError as e:
            if inp.is_file():
                raise
            failures.append({"input": str(f), "error": str(e)})
            if log:
                log(f"skipped: {e}")
            continue
        images.append({"input": str(f), "output": str(t), "seed": seed + i, "size": int(cfg.size),
                       "params": params.to_dict()})
    manifest = {"preset": preset, "config": dataclasses.asdict(cfg0), "seed": seed, "size": size,
                "images": images, "failures": failures}
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    return _write_manifest(manifest_path, manifest)
