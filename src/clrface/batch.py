"""Folders of photos and videos: ``clrface restore``'s work, resumable and spread over processes.

Output layout: cropped_faces/, restored_faces/, cmp/ (input crop | restored), final/ (whole photos; videos as
``final/<name>.mp4``) and report.json. Each finished input leaves a completion record under ``.clrface-done/``,
so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clrface.data.io import ensure_not_input, load_image, save_image
from clrface.errors import ClrfaceError
from clrface.options import RestoreOptions
from clrface.photo import restore_photo, side_by_side
from clrface.restorer import Restorer
from clrface.video import restore_video
from clrface.video_io import is_video

DONE_DIR = ".clrface-done"
"""Per-input completion records under the output folder: a rerun with the same model and options skips inputs
whose record exists (resumable after a kill); records are written only after all of an input's files."""


def output_names(inputs: list[Path]) -> list[str]:
    """The output name of each input: its stem, with the extension appended where two inputs share a stem."""
    dup = Counter(p.stem for p in inputs)
    return [p.stem if dup[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in inputs]


def run_key(restorer: Restorer, options: RestoreOptions, aligned: bool) -> str:
    """What must match for an earlier result to be reused: model folder, options, aligned, precision, background."""
    spec = {"model": restorer.source, "options": asdict(options), "aligned": aligned,
            "dtype": str(restorer.dtype), "background": getattr(restorer.background, "__name__",
                                                                type(restorer.background).__name__)}
    return json.dumps(spec, sort_keys=True)


def write_atomic(path: Path, text: str) -> None:
    """Writes through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def restore_input(path: Path, name: str, out: Path, restorer: Restorer, options: RestoreOptions, aligned: bool,
                  inputs: list[Path], emit: Callable[[str], None], stabilize: bool = True, keep_detail: bool = True
                  ) -> dict[str, Any]:
    """Restores one photo or video into ``out`` and returns its report record."""
    t0 = time.perf_counter()
    if is_video(path):  # final/<name>.mp4; faces are detected per frame, so --aligned does not apply
        rec = restore_video(path, out / "final" / f"{name}.mp4", restorer, options, stabilize=stabilize,
                            inputs=inputs, progress=False)
        rec.update(video=True, no_face=rec["frames_without_face"] == rec["frames"], faces=[])
        rec["warnings"] += ["--aligned does not apply to videos: faces are detected per frame"] if aligned else []
        for wmsg in rec["warnings"]:
            emit(f"clrface: warning: {path}: {wmsg}")
        return rec
    photo = load_image(path)
    res = restore_photo(restorer, photo, options, aligned=aligned, keep_detail=keep_detail)

    def sfx(j: int) -> str:
        return f"_s{j}" if options.samples > 1 else ""

    rec: dict[str, Any] = {"input": str(path), "size": [int(photo.shape[1]), int(photo.shape[0])],
                           "no_face": res.no_face, "sampling": res.sampling, "faces": [], "final": []}
    for j, im in enumerate(res.images):
        rec["final"].append(str(save_image(out / "final" / f"{name}{sfx(j)}.png", im, inputs=inputs)))
    for k, f in enumerate(res.faces):
        fr: dict[str, Any] = {"index": k, "box": [round(float(v), 2) for v in f.box],
                              "id_vs_irn": [round(v, 4) for v in f.id_vs_irn],
                              "id_vs_input": [round(v, 4) for v in f.id_vs_input]}
        if f.detail is not None:  # what the input kept: estimates, gate and high-band weight (clrface.faces.detail)
            fr["keep_detail"] = f.detail
        save_image(out / "cropped_faces" / f"{name}_{k}.png", f.crop_in, inputs=inputs)
        for j, c in enumerate(f.crops_out):
            save_image(out / "restored_faces" / f"{name}_{k}{sfx(j)}.png", c, inputs=inputs)
            save_image(out / "cmp" / f"{name}_{k}{sfx(j)}.png", side_by_side(f.crop_in, c), inputs=inputs)
        rec["faces"].append(fr)
    for wmsg in res.warnings:
        rec.setdefault("warnings", []).append(wmsg)
        emit(f"clrface: warning: {path}: {wmsg}")
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def restore_files(inputs: list[Path], out_dir: str | Path, restorer: Restorer, options: RestoreOptions, *,
                  aligned: bool = False, log: Callable[[str], None] | None = None, progress: bool = True,
                  rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                  overwrite: bool = False, stabilize: bool = True, keep_detail: bool = True) -> dict[str, Any]:
    """Restores each input photo into ``out_dir``: cropped_faces/, restored_faces/, cmp/, final/, report.json.

    Videos (``clrface.video.VIDEO_EXTENSIONS``) go to ``final/<name>.mp4`` with their audio, every face of every
    frame restored; ``stabilize`` turns their temporal stabilisation on (see clrface.video). ``keep_detail``: faces
    keep the input's own detail where it has it (see clrface.photo.restore_photo; photos only).

    Files: ``<name>_<k>.png`` per face k (``_s<j>`` appended per sample when samples > 1), ``final/<name>.png``.
    Unreadable inputs are reported through ``log`` and recorded under ``failures``; photos without a face go to
    final/ unchanged (resized by upscale) with a warning. Never writes over an input.

    Distributed: process ``rank`` of ``world`` restores inputs rank, rank+world, ... (names are fixed on the
    whole list, so every output has one writer); ``barrier`` waits for all processes, then rank 0 merges the
    completion records of all inputs into report.json. Inputs finished by an earlier run with the same model and
    options are skipped (``skipped`` in the report) unless ``overwrite``. Returns the report (rank 0: all
    inputs; other ranks: their own).
    """
    out = Path(out_dir)
    inputs = [Path(p) for p in inputs]
    emit = log or (lambda line: tqdm.write(line, file=sys.stderr))
    key = run_key(restorer, options, aligned) + ("" if stabilize else " no-stabilize")
    key += " keep-detail" if keep_detail else ""
    done = out / DONE_DIR
    done.mkdir(parents=True, exist_ok=True)
    named = list(zip(inputs, output_names(inputs)))

    def finished(name: str) -> dict[str, Any] | None:
        try:
            rec = json.loads((done / f"{name}.done.json").read_text())
        except (OSError, ValueError):
            return None
        return rec if rec.get("key") == key else None

    mine = named[rank::world]
    todo = [(p, n) for p, n in mine if overwrite or finished(n) is None]
    failures: list[dict[str, str]] = []
    t_all = time.perf_counter()
    bar = tqdm(todo, desc="restore" if world == 1 else f"restore [{rank}/{world}]", unit="img",
               disable=not progress or len(todo) < 2, file=sys.stderr)
    for path, name in bar:
        try:
            rec = restore_input(path, name, out, restorer, options, aligned, inputs, emit, stabilize, keep_detail)
            write_atomic(done / f"{name}.done.json", json.dumps({"key": key, "record": rec}))
        except (ClrfaceError, MemoryError) as e:
            msg = str(e) if isinstance(e, ClrfaceError) else f"{path}: out of memory"
            failures.append({"input": str(path), "error": msg})
            emit(f"clrface: error: {msg}")
    skipped = len(mine) - len(todo)
    write_atomic(done / f"_process{rank}.json", json.dumps({"failures": failures, "skipped": skipped}))
    barrier()
    covered = mine
    if rank == 0:  # the merged view of every process's records
        covered, failures, skipped = named, [], 0
        for r in range(world):
            part = json.loads((done / f"_process{r}.json").read_text())
            failures, skipped = failures + part["failures"], skipped + part["skipped"]
    failed = {f["input"] for f in failures}
    report: dict[str, Any] = {"model": restorer.source, "device": str(restorer.device),
                              "dtype": str(restorer.dtype).removeprefix("torch."), "aligned": aligned,
                              "options": asdict(options), "processes": world,
                              "images": [rec["record"] for p, n in covered
                                         if str(p) not in failed and (rec := finished(n)) is not None],
                              "failures": failures, "skipped": skipped}
    report["seconds"] = round(time.perf_counter() - t_all, 3)
    report["faces_total"] = sum(len(r["faces"]) for r in report["images"])
    if rank == 0:
        ensure_not_input(out / "report.json", inputs)
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
