"""Image files in and out: every photo becomes uint8 HWC RGB, every failure an ``ImageError``.

Real photos arrive as EXIF-rotated JPEGs, palette or 16-bit PNGs, CMYK JPEGs, RGBA with
transparency, truncated downloads or decompression bombs. ``load_image`` normalises the
readable ones and rejects the rest with a one-line reason naming the file, so the CLI can
report it and move on to the next photo.

Transparency is composited on **white**: a transparent background is what viewers show as
white page, and a restoration model should see a plain background rather than the arbitrary
colour that the hidden RGB channels carry under alpha 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from clrface.errors import ClrfaceError, ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}

#: Default pixel cap: 120 MP holds the largest camera files (61 MP full frame, 102 MP medium format) and a
#: 2-face 42 MP photo peaks at ~3.7 GB; anything larger is almost certainly a decompression bomb or a scan at
#: absurd dpi, which would exhaust memory in detection and paste-back.
MAX_PIXELS = 120_000_000
#: Smaller than this no face can be found or restored.
MIN_SIDE = 16

DATA_ENV = "CLRFACE_DATA"
DEFAULT_DATA = "../shared/data"


def data_root() -> Path:
    """The shared data folder (faces128/, lfw128/, real_lq/, ...): ``$CLRFACE_DATA``, else ``../shared/data``
    (relative to the current folder, as the paths in configs/*.yaml are)."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


def cache_root() -> Path:
    """Where derived files are cached (the face recogniser's converted weights, FID statistics):
    ``$CLRFACE_CACHE``, else ``~/.cache/clrface``."""
    return Path(os.environ.get("CLRFACE_CACHE", Path.home() / ".cache" / "clrface")).expanduser()


def to_model_range(x: torch.Tensor | np.ndarray, *, channels_last: bool = True) -> torch.Tensor:
    """uint8 [B,H,W,3] (``channels_last=False``: [B,3,H,W]) -> float32 [B,3,H,W] in [-1, 1]: the nets' range."""
    t = torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x
    return (t.permute(0, 3, 1, 2) if channels_last else t).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor, *, channels_last: bool = True) -> torch.Tensor:
    """float [B,3,H,W] in [-1, 1] -> uint8 [B,H,W,3] (``channels_last=False``: [B,3,H,W]) on the CPU, clamped and
    rounded; ``.numpy()`` for an array."""
    u = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return (u.permute(0, 2, 3, 1) if channels_last else u).cpu()


@contextlib.contextmanager
def _quiet_pil() -> Iterator[None]:
    """Reading an image without PIL's warnings that mean nothing here: its decompression-bomb warning (it fires from
    89 MP; ``load_image`` applies ``MAX_PIXELS`` from the header instead, and PIL still raises above 179 MP) and
    damaged EXIF (it costs only the orientation tag; the pixels load)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", message=".*orrupt EXIF", category=UserWarning)
        yield


def load_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """Reads an image file as ``uint8 [H, W, 3]`` RGB, upright (EXIF orientation applied).

    Grey, palette, CMYK, 16-bit and float images are converted; transparency is composited on
    white; 16-bit samples are scaled by 255/65535 (not truncated). Multi-frame files give their
    first frame. Raises ``ImageError(path, reason)`` for a missing path, a directory, an empty,
    truncated or non-image file, more than ``max_pixels`` pixels, or a side below ``min_side``.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(p, "no such file")
    if p.is_dir():
        raise ImageError(p, "is a directory, not an image file")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageError(p, f"cannot read ({e.strerror or e})") from e
    if size == 0:
        raise ImageError(p, "empty file (0 bytes)")
    with _quiet_pil():
        try:
            with Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(p, f"too large: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the "
                                        f"{max_pixels / 1e6:g} MP cap")
                if min(w, h) < min_side:
                    raise ImageError(p, f"too small: {w}x{h}, need at least {min_side} px on each side")
                im.load()
                return to_rgb_uint8(ImageOps.exif_transpose(im))
        except ImageError:
            raise
        except Image.DecompressionBombError as e:  # PIL refuses to open one above 179 MP, before the cap's check
            found = re.search(r"\((\d+) pixels\)", str(e))
            what = f"{int(found.group(1)) / 1e6:.1f} MP" if found else f"over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP"
            cap = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)  # a larger cap than PIL's still stops at PIL's
            raise ImageError(p, f"too large: {what} exceeds the {cap / 1e6:g} MP cap") from e
        except UnidentifiedImageError as e:
            raise ImageError(p, "not an image (unrecognised file format)") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            # Truncated JPEG/PNG data surfaces as OSError("image file is truncated ...") or a
            # decoder error; keep PIL's first line as the reason.
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ImageError(p, f"unreadable or corrupt image ({reason})") from e


def transparency_and_frames(path: str | os.PathLike) -> tuple[np.ndarray | None, int]:
    """What :func:`load_image` drops of a readable image file: its transparency as uint8 [H, W] upright (None
    where every pixel is opaque) and its number of frames (an animated GIF or WebP has several)."""
    with _quiet_pil(), Image.open(path) as im:
        # an MPO's further pictures (a phone's gain map, a camera's preview) are not frames of an animation
        frames = 1 if im.format == "MPO" else int(getattr(im, "n_frames", 1))
        if not (im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info):
            return None, frames
        alpha = np.asarray(ImageOps.exif_transpose(im).convert("RGBA").getchannel("A"))
    return (None if alpha.min() == 255 else alpha), frames


def to_srgb(im: Image.Image) -> Image.Image:
    """An RGB(A) image with an embedded colour profile (a phone's Display P3, a camera's Adobe RGB) converted to
    sRGB, the space the models were trained in and in which a PNG without a profile is shown; unchanged without a
    profile, with an sRGB one, or with one LittleCMS cannot read (then its numbers are taken as sRGB, as before)."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA"):
        return im
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if ImageCms.getProfileDescription(src).strip().lower().startswith("srgb"):
            return im
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode=im.mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im


def to_rgb_uint8(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3] RGB (sRGB where the image names another colour space: :func:`to_srgb`)."""
    im = to_srgb(im)
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("L", "1") and "transparency" in im.info:
        im = im.convert("LA")
    elif mode == "RGB" and "transparency" in im.info:
        im = im.convert("RGBA")
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16"):
            a = a * (255.0 / 65535.0)
        elif mode == "I" and a.max(initial=0) > 255:
            # 32-bit integer mode holds 16-bit PNG/TIFF samples in some PIL versions.
            a = a * (255.0 / 65535.0)
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        out = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


def off_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The colour under ``alpha`` uint8 [H, W] that composited on white gives ``rgb`` uint8 [H, W, 3]: the inverse
    of the compositing in :func:`to_rgb_uint8`, so a transparent photo restored on white gets its own colours back
    where nothing changed (to rounding: 0.5 / alpha levels) instead of colours already blended with white, which
    the alpha would blend a second time. Where alpha is 0 the colour stays; where the restored colour is darker
    than alpha allows it is clipped to black."""
    a = alpha[..., None].astype(np.float32) / 255.0
    under = (rgb.astype(np.float32) - 255.0 * (1.0 - a)) / np.maximum(a, 1e-6)
    return np.where(a > 0, np.clip(np.rint(under), 0, 255), rgb).astype(np.uint8)


def array_to_rgb_uint8(a: np.ndarray) -> np.ndarray:
    """A photo as an array -> uint8 [H, W, 3] RGB, read as ``load_image`` reads files: uint8 or uint16 (scaled by
    255/65535), grey [H, W] or [H, W, 1] repeated, RGBA [H, W, 4] composited on white. Float arrays are refused:
    whether they span [0, 1] or [0, 255] would be a guess."""
    a = np.asarray(a)
    if a.dtype == np.uint16:
        a = np.rint(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        hint = " (scale floats to 0..255 and cast to uint8)" if a.dtype.kind == "f" else ""
        raise ClrfaceError(f"a photo as an array is uint8 or uint16 [H, W], [H, W, 3] or [H, W, 4], got {a.dtype} "
                           f"{a.shape}{hint}")
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    return to_rgb_uint8(Image.fromarray(np.ascontiguousarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)))


def ensure_not_input(out_path: str | os.PathLike, input_paths: Iterable[str | os.PathLike]) -> None:
    """Raises ``ClrfaceError`` if writing ``out_path`` would overwrite one of ``input_paths``.

    Compares resolved paths, and for existing files the inode too (hard links, symlinks, case-
    insensitive file systems).
    """
    out = Path(out_path)
    out_res = out.resolve()
    for inp in input_paths:
        ip = Path(inp)
        same = ip.resolve() == out_res
        if not same and out.exists() and ip.exists():
            try:
                same = os.path.samefile(out, ip)
            except OSError:
                same = False
        if same:
            raise ClrfaceError(f"{out}: refusing to overwrite the input file {ip}; choose another output path")


#: What the EXIF of a restored photo keeps: the tags that describe the picture (not a TIFF's layout, XMP or ICC
#: data, which belong to the input's encoding), and the Exif and GPS sub-directories.
EXIF_KEPT = (270, 271, 272, 305, 306, 315, 33432)  # description, make, model, software, date, artist, copyright
EXIF_DROPPED = (0x927C, 0xA002, 0xA003, 0xA005)  # maker note (offsets into the old file), pixel size, interop
EXIF_MAX_BYTES = 65_000  # a JPEG APP1 segment holds 64 KiB


def upright_exif(path: str | os.PathLike) -> bytes | None:
    """The EXIF of an image file that still describes its restored copy: date, camera, place and the like
    (``EXIF_KEPT``, the Exif and GPS directories without ``EXIF_DROPPED``), orientation 1 (:func:`load_image` turned
    the pixels upright) and colour space sRGB. None when the file has none, it cannot be read, or it is over
    ``EXIF_MAX_BYTES``."""
    with _quiet_pil(), contextlib.suppress(OSError, ValueError, SyntaxError), Image.open(path) as im:
        old = im.getexif()
        new = Image.Exif()
        for tag in EXIF_KEPT:
            if tag in old:
                new[tag] = old[tag]
        exif_ifd = {k: v for k, v in old.get_ifd(ExifTags.IFD.Exif).items() if k not in EXIF_DROPPED}
        if exif_ifd:
            new[ExifTags.IFD.Exif] = {**exif_ifd, 0xA001: 1}
        gps = old.get_ifd(ExifTags.IFD.GPSInfo)
        if gps:
            new[ExifTags.IFD.GPSInfo] = dict(gps)
        if not len(new):
            return None
        new[ExifTags.Base.Orientation] = 1
        data = new.tobytes()
        return data if len(data) <= EXIF_MAX_BYTES else None
    return None


def save_image(path: str | os.PathLike, img: np.ndarray, *, inputs: Iterable[str | os.PathLike] = (),
               quality: int = 95, exif: bytes | None = None) -> Path:
    """Writes ``img: uint8 [H, W, 3]`` (or ``[H, W]``, or ``[H, W, 4]`` RGBA as PNG) as PNG or JPEG, chosen by the
    extension, with the EXIF block ``exif`` where given.

    Parent folders are created. Never overwrites a file listed in ``inputs``. JPEG uses
    4:4:4 chroma (no subsampling), like the shared data. Returns the path written.
    """
    p = Path(path)
    fmt = SAVE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ClrfaceError(f"{p}: unsupported output extension {p.suffix!r}; use .png, .jpg or .jpeg")
    a = np.asarray(img)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ClrfaceError(f"{p}: save_image needs uint8 [H, W, 3], [H, W, 4] or [H, W], got {a.dtype} {a.shape}")
    if a.ndim == 3 and a.shape[2] == 4 and fmt == "JPEG":
        raise ClrfaceError(f"{p}: JPEG has no transparency; write RGBA images as .png")
    ensure_not_input(p, inputs)
    im = Image.fromarray(np.ascontiguousarray(a))
    options: dict[str, Any] = {"quality": quality, "subsampling": 0} if fmt == "JPEG" else {}
    if exif:
        options["exif"] = exif
    return write_via_temporary(p, lambda tmp: im.save(tmp, fmt, **options))


def copy_image(src: str | os.PathLike, dst: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Copies an image file byte for byte (an unchanged photo keeps its encoding, metadata and colour profile);
    written as :func:`save_image` writes, never over a file listed in ``inputs``."""
    p = Path(dst)
    ensure_not_input(p, inputs)
    return write_via_temporary(p, lambda tmp: shutil.copyfile(src, tmp))


def write_via_temporary(p: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a hidden temporary name in the same folder (made if missing), then renamed over ``p``: a
    kill or a full disk mid-write leaves the earlier file (or none), never a truncated one under the final name. An
    OSError is raised as ClrfaceError "P: cannot write (reason)"."""
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, p)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ClrfaceError(f"{p}: cannot write ({e.strerror or e})") from e
        raise
    return p


def write_text_atomic(p: Path, text: str) -> Path:
    """``text`` written as :func:`write_via_temporary` writes: a reader never sees half a file."""
    return write_via_temporary(p, lambda tmp: tmp.write_text(text))


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether PIL recognises the file's header (whatever its extension): formats such as AVIF or PPM that
    ``IMAGE_EXTENSIONS`` does not list but this PIL build reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path):
                return True
        except Exception:  # any reader's failure means "not an image we can restore"
            return False


def list_images(path: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """The image files named by ``path``: the file itself, or a folder's images sorted by path.

    Folders are filtered by extension (``IMAGE_EXTENSIONS``, case-insensitive); hidden files are
    skipped. A file given explicitly is returned whatever its extension, so ``load_image`` can
    say what is wrong with it.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ClrfaceError(f"{p}: no such file or folder")
    it = p.rglob("*") if recursive else p.iterdir()
    files = [
        f for f in it
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
    ]
    return sorted(files)


def output_names(inputs: list[Path]) -> list[str]:
    """The output name of each input, unique (also ignoring case) by construction.

    Its stem, with the extension appended where two inputs share a stem (``x.png``, ``x.jpg`` -> ``x_png``,
    ``x_jpg``). Where that still collides (``x_png.jpg`` beside those two), each colliding input gets a suffix
    hashed from its file name, else from its path: the names depend on the list alone, never on which process
    restores which input, and the names without a collision stay as they are.
    """
    stems = Counter(p.stem for p in inputs)
    base = [p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in inputs]
    names = list(base)
    for key in (lambda i, p: p.name, lambda i, p: p.as_posix(), lambda i, p: f"{i}:{p.as_posix()}"):
        count = Counter(n.casefold() for n in names)
        if max(count.values(), default=1) == 1:
            break
        names = [n if count[n.casefold()] == 1
                 else f"{b}_{hashlib.sha1(key(i, p).encode()).hexdigest()[:8]}"
                 for i, (p, n, b) in enumerate(zip(inputs, names, base))]
    return names


def same_size_runs(arrays: Sequence[np.ndarray]) -> list[slice]:
    """Slices of consecutive HWC arrays of one height and width: each stacks into one batch, so a folder may
    mix sizes."""
    cuts = [i for i in range(1, len(arrays)) if arrays[i].shape[:2] != arrays[i - 1].shape[:2]]
    return [slice(a, b) for a, b in zip([0, *cuts], [*cuts, len(arrays)])] if len(arrays) else []


def stack_images(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays of one size -> uint8 [B,3,H,W]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def image_batches(files: Sequence[str | os.PathLike]) -> list[torch.Tensor]:
    """Image files -> uint8 [B,3,H,W] batches in file order, one per run of consecutive files of one size."""
    arrays = [load_image(f) for f in files]
    return [stack_images(arrays[run]) for run in same_size_runs(arrays)]
