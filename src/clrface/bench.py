"""What the scripts under ``benchmarks/`` share: one timer, one machine header, one markdown table, one way to
load faces, the named rows of restore settings that the comparison scripts put side by side, the known camera
motion of the synthetic video clips, and labelled panels for figures."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np
import scipy.ndimage
import torch
from PIL import Image, ImageDraw

from clrface.data.datasets import load_face_folder
from clrface.data.io import to_model_range, to_uint8
from clrface.device import cpu_flags
from clrface.errors import ClrfaceError
from clrface.options import MODES, RestoreOptions
from clrface.restorer import Restorer


def sync(device: torch.device | str) -> None:
    """Waits for queued kernels, so wall time covers the work (CUDA launches are asynchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], reps: int, device: torch.device | str = "cpu", label: str = "", *,
            warmup: int = 1, clock: Callable[[], float] = perf_counter) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` runs after ``warmup`` runs (allocator, autotune, caches),
    each run ended by a device sync. With ``label`` the figure is also printed to stderr at once, so a run cut
    short still shows what it measured."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(max(int(reps), 1)):
        t = clock()
        fn()
        sync(device)
        ts.append((clock() - t) * 1e3)
    ms = statistics.median(ts)
    if label:
        print(f"  {label}: {ms:.1f} ms", file=sys.stderr, flush=True)
    return ms


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """One line naming the machine: CPU and its bf16 flags, torch threads, GPU, torch version."""
    device = torch.device(device)
    bf16 = ", ".join(sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"})) or "none"
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    n = torch.get_num_threads() if threads is None else threads
    return f"CPU {cpu_name()} (bf16 flags: {bf16}), torch threads {n}{gpu}; torch {torch.__version__}"


def command_line(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """The command that ran: ``python <script> <args>`` (argv None: this process's own)."""
    script = sys.argv[0] if script is None else script
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(a) for a in ["python", script, *args])


def header(device: torch.device | str = "cpu", threads: int | None = None, command: str | None = None) -> str:
    """The environment header above every table: machine, date and the exact command."""
    when = datetime.datetime.now().isoformat(timespec="seconds")
    return f"{machine(device, threads)}; {when}\ncommand: `{command or command_line()}`"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]], *, align: str | None = None,
                   fmt: str = ".3f") -> str:
    """A markdown table; floats are written with ``fmt`` and NaN as an em dash. ``align``: one character per
    column, "l" or "r" (default: the first column left, the others right)."""
    align = align or "l" + "r" * (len(columns) - 1)

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "—" if v != v else format(v, fmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def load_faces(folder: str | Path, limit: int | None = None, size: int | None = None) -> torch.Tensor:
    """The faces of a folder (sorted by name) as float32 [N,3,S,S] in [-1, 1]."""
    return to_model_range(load_face_folder(folder, size=size, limit=limit))


# ---------------------------------------------------------------- rows: named restore settings compared in one table


def add_row_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of the scripts that compare named rows: --row, --only, --device, --threads, --batch-size."""
    ap.add_argument("--row", action="append", default=[], metavar="NAME=MODE[:k=v,...]",
                    help="extra row, e.g. 'f0.8=full:fidelity=0.8,steps=10' or 'no mask=full:mask=off' (repeatable)")
    ap.add_argument("--only", nargs="*", help="run only these row names")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)


def _value(s: str) -> Any:
    if s.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def select_rows(defaults: dict[str, Any], specs: Sequence[str], only: Sequence[str] | None) -> dict[str, Any]:
    """The default rows plus ``--row`` specs, restricted to ``--only`` names (an unknown name raises)."""
    rows = dict(defaults)
    for spec in specs:
        name, kw = parse_row(spec)
        rows[name] = kw
    if only:
        missing = sorted(set(only) - set(rows))
        if missing:
            raise ClrfaceError(f"--only: no row named {', '.join(missing)}; rows are {', '.join(rows)}")
        rows = {k: v for k, v in rows.items() if k in only}
    return rows


def parse_row(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME=MODE[:key=val,key=val]`` -> (NAME, {"mode": MODE, key: val, ...}); values become int/float/None
    where they parse, ``mask=off|on`` is kept for :func:`row_options`. Raises ClrfaceError on a malformed spec."""
    m = re.fullmatch(rf"(?P<name>.+?)=(?P<mode>{'|'.join(MODES)})(?::(?P<kvs>.*))?", spec.strip())
    if m is None or not m["name"].strip():
        raise ClrfaceError(f"--row {spec!r}: expected NAME=MODE[:key=val,...] with MODE one of {', '.join(MODES)}, "
                           "e.g. 'f0.8=full:fidelity=0.8'")
    name, kvs = m["name"], m["kvs"] or ""
    kw: dict[str, Any] = {"mode": m["mode"]}
    for item in filter(None, (p.strip() for p in kvs.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ClrfaceError(f"--row {spec!r}: {item!r} is not key=val")
        kw[k.strip()] = _value(v.strip())
    row_options(kw)  # validate now, not after an hour of restoring
    return name.strip(), kw


def row_options(kw: dict[str, Any], batch_size: int = 8, defaults: dict[str, Any] | None = None
                ) -> tuple[RestoreOptions, bool]:
    """(RestoreOptions, use the learned mask) of a row spec over the model's ``defaults`` (restore.json; e.g. the
    sampler and steps a distilled model was made for); unknown keys raise ClrfaceError."""
    kw = dict(kw)
    mask = str(kw.pop("mask", "on")).lower()
    if mask not in ("on", "off", "1", "0", "true", "false"):
        raise ClrfaceError(f"mask must be on or off, got {mask!r}")
    known = {f.name for f in dataclasses.fields(RestoreOptions)}
    bad = sorted(set(kw) - known)
    if bad:
        raise ClrfaceError(f"unknown RestoreOptions field(s) {', '.join(bad)}; "
                           f"choose from {', '.join(sorted(known))}, mask")
    kw.setdefault("batch_size", batch_size)
    return RestoreOptions(**{**(defaults or {}), **kw}), mask in ("on", "1", "true")


def slug(name: str) -> str:
    """A file-name-safe version of a row name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "row"


def ablation_row_dir(out: str | Path, row: str) -> Path:
    """Where ``benchmarks/ablation.py`` writes the faces of a row (``LQ_input`` and ``GT`` link the test set's)."""
    if row.startswith("LQ input"):
        return Path(out) / "LQ_input"
    if row == "GT":
        return Path(out) / "GT"
    return Path(out) / row.replace(" ", "_").replace("/", "-").replace("^", "")


def consecutive_runs(indices: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """(start position, length) chunks of at most ``batch`` items whose ``indices`` are consecutive integers, so
    each chunk can go to restore_faces with first_index = its first index (per-face noise seeds stay global)."""
    out, start = [], 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[i - 1] + 1 or i - start == batch:
            out.append((start, i - start))
            start = i
    return out


def restore_row(restorer: Restorer, faces: np.ndarray, opts: RestoreOptions, use_mask: bool = True,
                indices: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """Restores uint8 [N,S,S,3] faces -> (uint8 [N,S,S,3] first samples, seconds per face of restoration).

    ``indices``: global face numbers for the per-face noise seeds (default 0..N-1), so a face restores the same
    whatever subset it is restored with. The learned mask is removed for the call when ``use_mask`` is False.
    """
    idx = list(range(len(faces))) if indices is None else [int(i) for i in indices]
    mask = restorer.mask
    restorer.mask = mask if use_mask else None
    parts = []
    t0 = perf_counter()
    try:
        for start, n in consecutive_runs(idx, opts.batch_size):
            x = to_model_range(faces[start:start + n])
            parts.append(restorer.restore_faces(x, opts, first_index=idx[start]).restored[:, 0].cpu())
        sync(restorer.device)
    finally:
        restorer.mask = mask
    dt = (perf_counter() - t0) / max(len(faces), 1)
    return to_uint8(torch.cat(parts)).numpy(), dt


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> [size,size,3], PIL bicubic (antialiased when shrinking)."""
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))


def to_tensor(faces: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> uint8 [N,3,H,W]."""
    return torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2)


@torch.no_grad()
def embed_faces(restorer: Restorer, faces: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Unit dlib descriptors [N,128] float64 (CPU) of uint8 [N,S,S,3] faces."""
    out = []
    for i in range(0, len(faces), batch):
        x = to_model_range(faces[i:i + batch]).to(restorer.device)
        out.append(torch.nn.functional.normalize(restorer.embed(x).double(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 128, dtype=torch.float64)


# ---------------------------------------------------------------- a still photo under a known camera motion


def camera_offset(t: int, subpixel: bool = False) -> tuple[float, float]:
    """Known camera motion of frame t: (dx, dy) = (2 sin(2 pi t / 12), sin(2 pi t / 8)) px, rounded to whole
    pixels unless ``subpixel`` (undoing a whole-pixel shift is exact; a fractional one blurs)."""
    dx, dy = 2.0 * np.sin(2 * np.pi * t / 12), 1.0 * np.sin(2 * np.pi * t / 8)
    return (dx, dy) if subpixel else (float(round(dx)), float(round(dy)))


def shift_image(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Translate uint8/float [H, W, 3] by (dx, dy) px (content moves right/down), cubic spline, float32."""
    return scipy.ndimage.shift(img.astype(np.float32), (dy, dx, 0), order=3, mode="reflect")


def undo_camera_motion(frames: Sequence[np.ndarray], subpixel: bool = False) -> list[np.ndarray]:
    """Frame t shifted back by its :func:`camera_offset`: every frame of a static scene then lines up."""
    return [shift_image(f, -dx, -dy) for t, f in enumerate(frames) for dx, dy in [camera_offset(t, subpixel)]]


LABEL_H = 18


def labelled(img: np.ndarray, text: str) -> Image.Image:
    """The image with a white label strip above it."""
    im = Image.fromarray(img)
    out = Image.new("RGB", (im.width, im.height + LABEL_H), "white")
    out.paste(im, (0, LABEL_H))
    ImageDraw.Draw(out).text((4, 3), text, fill="black")
    return out


def hstack(panels: list[Image.Image], gap: int = 6) -> Image.Image:
    h = max(p.height for p in panels)
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), h), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def vstack(rows: list[Image.Image], gap: int = 6) -> Image.Image:
    w = max(r.width for r in rows)
    out = Image.new("RGB", (w, sum(r.height for r in rows) + gap * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + gap
    return out
