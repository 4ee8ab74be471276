"""Folders of photos and videos: ``clrface restore``'s work, resumable and spread over processes.

Output layout: cropped_faces/, restored_faces/, cmp/ (input crop | restored), final/ (whole photos; videos as
``final/<name>.mp4``) and report.json. Each finished input leaves a completion record under ``.clrface-done/``,
so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from clrface.data.io import (
    SAVE_FORMATS,
    copy_image,
    ensure_not_input,
    is_image_file,
    load_image,
    off_white,
    output_names,
    save_image,
    transparency_and_frames,
    upright_exif,
    write_text_atomic,
)
from clrface.errors import ClrfaceError
from clrface.options import FINAL_EXTS, RestoreOptions
from clrface.photo import restore_photo, side_by_side
from clrface.reference import Reference, ReferencePolicy
from clrface.restorer import Restorer
from clrface.video import restore_video
from clrface.video_io import is_video, list_media, probe_video

DONE_DIR = ".clrface-done"
"""Per-input completion records under the output folder: a rerun with the same model and options skips inputs
whose record exists (resumable after a kill); records are written only after all of an input's files."""
#: The folders a run writes its results into, under the output folder.
RESULT_DIRS = ("final", "cropped_faces", "restored_faces", "cmp")
EARLIER_RESULT = "written by an earlier restore into this folder"  # the reason given in report.json
#: From this size a photo's face search takes ~15 s or more on one core (docs/detection.md): say so before it starts.
LARGE_PHOTO_MP = 10.0


def input_stamp(path: Path) -> dict[str, Any]:
    """What identifies an input's content for resuming: path, size and modification time (ns)."""
    st = path.stat()
    return {"input": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_writable(out: Path) -> None:
    """Raises a one-line ``ClrfaceError`` unless files can be created in the folder ``out`` (created if missing)."""
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".clrface-write-test"):
            pass
    except OSError as e:
        raise ClrfaceError(f"{out}: cannot write to this output folder ({e.strerror or e})") from None
    if made:  # made again by the first file written: a run that fails on its options leaves no empty folder
        out.rmdir()


def earlier_results(folder: Path) -> list[Path]:
    """What an earlier ``clrface restore`` wrote into ``folder``: its result folders and report.json, recognised by
    the completion records every run keeps beside them (``DONE_DIR``); none elsewhere."""
    if not (folder / DONE_DIR).is_dir():
        return []
    found = [folder / d for d in RESULT_DIRS if (folder / d).is_dir()]
    return found + [folder / "report.json"] if found and (folder / "report.json").is_file() else found


def prepare_inputs(source: str | Path, out_dir: str | Path, *,
                   recursive: bool = False) -> tuple[list[Path], list[dict[str, str]]]:
    """The inputs of ``clrface restore`` and the files of the folder that will not be restored (with the reason),
    checked before any model is loaded: a single bad input file or an unwritable output folder raises here.

    Files of a folder whose extension is not a known image or video one are restored when PIL reads their header
    (AVIF, PPM, ...); the others are listed as ``{"input", "reason"}``. Hidden files are ignored, and so is the
    output folder where it lies inside the input folder, and the output folder's result folders where the output
    folder is the input folder, and what earlier runs wrote into the input folder or, with ``recursive``, into its
    sub-folders (:func:`earlier_results`: their files are results, not inputs; listed as ignored). ``recursive``: the
    files of sub-folders too.
    """
    src, out = Path(source), Path(out_dir)
    inputs = list_media(src, recursive=recursive)
    ignored: list[dict[str, str]] = []
    if src.is_file():  # a single bad file is the command's error
        probe_video(inputs[0]) if is_video(inputs[0]) else load_image(inputs[0])
    else:
        own, here = out.resolve(), src.resolve()
        # An output folder inside the input folder holds results, not inputs; so do its result folders where it is
        # the input folder. (Restoring OUT/final into OUT, the input folder lies inside a result folder: its files
        # are inputs, and ensure_not_input guards them.)
        results = [own] if not here.is_relative_to(own) else \
            [own / d for d in RESULT_DIRS if not here.is_relative_to(own / d)]
        entries = [f for f in sorted(src.rglob("*") if recursive else src.iterdir())
                   if not any(part.startswith(".") for part in f.relative_to(src).parts)]
        # the folders the search enters (rglob does not follow links to folders)
        folders = [src, *(f for f in entries if recursive and f.is_dir() and not f.is_symlink())]
        earlier = [r for d in folders for r in earlier_results(d)
                   if not any(r.resolve().is_relative_to(o) for o in results)]
        results += [r.resolve() for r in earlier]
        ignored += [{"input": str(r), "reason": EARLIER_RESULT} for r in earlier]

        def is_output(f: Path) -> bool:
            where = f.resolve()
            return any(where.is_relative_to(r) for r in results)

        inputs = [f for f in inputs if not is_output(f)]
        listed = set(inputs)
        for f in entries:
            if f in listed or is_output(f):
                continue
            if f.is_dir():
                if not recursive:
                    ignored.append({"input": str(f), "reason": "a folder: sub-folders are searched with --recursive"})
            elif not f.exists():
                ignored.append({"input": str(f), "reason": "a broken link: its target does not exist"})
            elif not f.is_file():
                ignored.append({"input": str(f), "reason": "not a regular file"})
            elif is_image_file(f):
                inputs.append(f)
            else:
                ext = f.suffix.lower() or "no extension"
                ignored.append({"input": str(f), "reason": f"not an image or video this installation reads ({ext})"})
        inputs.sort()
        if not inputs:
            raise ClrfaceError(f"{src}: no image or video files in this folder")
    if out.is_file():
        raise ClrfaceError(f"{out}: is a file; --output must be a folder")
    check_writable(out)
    return inputs, ignored


def summary_line(report: dict[str, Any], out_dir: str | Path, world: int = 1) -> str:
    """The one line ``clrface restore`` prints at the end of a run."""
    n_ok, n_bad = len(report["images"]), len(report["failures"])
    # an earlier restore's own results in the input folder are not inputs a user would miss
    missed = [i for i in report.get("ignored", []) if i["reason"] != EARLIER_RESULT]
    ignored = f", {len(missed)} other file(s) or folder(s) not restored" if missed else ""
    if n_ok and report["skipped"] == n_ok and not n_bad:
        return (f"nothing to do: the {n_ok} input(s) were already restored into {out_dir} with these options "
                "(--overwrite redoes them)")
    if n_ok and report["skipped"] == n_ok:
        return (f"nothing new restored into {out_dir}: {n_ok} input(s) were already restored with these options, "
                f"{n_bad} failed{ignored}")
    no_face = sum(r["no_face"] for r in report["images"])
    skipped = f", {report['skipped']} of them by an earlier run" if report["skipped"] else ""
    procs = f" by {world} processes" if world > 1 else ""
    vids = [r for r in report["images"] if r.get("video")]
    what = [f"{report['faces_total']} face(s) in {n_ok - len(vids)} image(s)"] if n_ok > len(vids) or not vids else []
    what += [f"{sum(r['face_frames'] for r in vids)} face(s) in {sum(r['frames'] for r in vids)} frame(s) of "
             f"{len(vids)} video(s)"] if vids else []
    return (f"restored {' and '.join(what)} into {out_dir}{procs} ({no_face} without a face, {n_bad} failed"
            f"{skipped}{ignored}) in {report['seconds']:.1f} s")


def run_key(restorer: Restorer, options: RestoreOptions, aligned: bool) -> str:
    """What must match for an earlier result to be reused: model folder, options, aligned, precision, background."""
    spec = {"model": restorer.source, "options": asdict(options), "aligned": aligned,
            "dtype": str(restorer.dtype), "background": getattr(restorer.background, "__name__",
                                                                type(restorer.background).__name__)}
    return json.dumps(spec, sort_keys=True)


def sample_suffix(j: int, samples: int) -> str:
    """The name suffix of sample ``j`` of ``samples`` results per face: none for a single one."""
    return f"_s{j}" if samples > 1 else ""


def record_files(out: Path, name: str, record: dict[str, Any]) -> set[Path]:
    """The files under ``out`` that the report record of the input named ``name`` says were written: its final
    image(s) or video and, per face, the input crop and per sample the restored crop and side-by-side. From names,
    not from the record's paths, which may be relative to another working folder."""
    finals = record.get("final", [])
    sfx = [sample_suffix(j, len(finals)) for j in range(max(len(finals), 1))]
    files = {out / "final" / Path(f).name for f in finals}
    for face in record.get("faces", []):
        k = face["index"]
        files.add(out / "cropped_faces" / f"{name}_{k}.png")
        files.update(out / d / f"{name}_{k}{s}.png" for s in sfx for d in ("restored_faces", "cmp"))
    return files


def remove_stale(out: Path, name: str, old: dict[str, Any], new: dict[str, Any], inputs: list[Path]) -> None:
    """Deletes what an earlier result under ``name`` wrote and this one did not (faces it no longer has, samples,
    another final format), so the output folder shows one result per name. Never an input."""
    for f in record_files(out, name, old) - record_files(out, name, new):
        with contextlib.suppress(ClrfaceError, OSError):  # ClrfaceError: the file is an input, so it stays
            ensure_not_input(f, inputs)
            f.unlink(missing_ok=True)


def restore_input(path: Path, name: str, out: Path, restorer: Restorer, options: RestoreOptions, aligned: bool,
                  inputs: list[Path], emit: Callable[[str], None], stabilize: bool = True, keep_detail: bool = True,
                  reference: Reference | None = None, reference_policy: ReferencePolicy = ReferencePolicy(),
                  final_ext: str = "png", frame_progress: bool = False) -> dict[str, Any]:
    """Restores one photo or video into ``out`` and returns its report record (whole photos as ``final_ext``;
    ``frame_progress``: a video shows a bar over its frames)."""
    t0 = time.perf_counter()

    def sfx(j: int) -> str:
        return sample_suffix(j, options.samples)

    video = is_video(path)
    finals = [out / "final" / f"{name}.mp4"] if video else \
        [out / "final" / f"{name}{sfx(j)}.{final_ext}" for j in range(options.samples)]
    for final in finals:  # before any work: a result that would land on an input (restoring OUT/final into OUT)
        ensure_not_input(final, inputs)
    if video:  # final/<name>.mp4; faces are detected per frame, so --aligned does not apply
        rec = restore_video(path, finals[0], restorer, options, stabilize=stabilize,
                            inputs=inputs, progress=frame_progress)
        rec.update(video=True, no_face=rec["frames_without_face"] == rec["frames"], faces=[])
        rec["warnings"] += ["--aligned does not apply to videos: faces are detected per frame"] if aligned else []
        rec["warnings"] += ["--reference applies to photos: the video was restored without it"] if reference else []
        for wmsg in rec["warnings"]:
            emit(f"clrface: warning: {path}: {wmsg}")
        return rec
    photo = load_image(path)
    megapixels = photo.shape[0] * photo.shape[1] / 1e6
    if megapixels >= LARGE_PHOTO_MP and not aligned:  # minutes without output otherwise (no bar for one input)
        emit(f"clrface: {path}: {megapixels:.1f} MP; searching it for faces takes a while"
             + ("" if options.min_face else " (--min-face 64 searches ~3.5x faster when its faces are larger)"))
    res = restore_photo(restorer, photo, options, aligned=aligned, keep_detail=keep_detail, reference=reference,
                        reference_policy=reference_policy)
    alpha, frames = transparency_and_frames(path)
    if frames > 1:
        what, unit = ("a multi-page image", "pages") if path.suffix.lower() in (".tif", ".tiff") else \
            ("an animated image", "frames")
        res.warnings.append(f"{what}: only the first of its {frames} {unit} was restored")
    if alpha is not None and final_ext != "png":
        res.warnings.append(f"its transparency is not kept in {final_ext.upper()} (--ext png keeps it)")
        alpha = None
    rec: dict[str, Any] = {"input": str(path), "size": [int(photo.shape[1]), int(photo.shape[0])],
                           "no_face": res.no_face, "sampling": res.sampling, "faces": [], "final": []}
    # no face and no enlarging: the photo is returned as it is, so its file is copied (no second JPEG generation)
    unchanged = (res.no_face and options.upscale == 1
                 and SAVE_FORMATS.get(path.suffix.lower()) == SAVE_FORMATS[f".{final_ext}"])
    exif = None if unchanged else upright_exif(path)  # the photo's date, camera, place: upright now
    for j, im in enumerate(res.images):
        if unchanged:
            rec["final"].append(str(copy_image(path, finals[j], inputs=inputs)))
            continue
        if alpha is not None:  # the photo's transparency, at the final size (a cut-out portrait stays cut out)
            a = np.asarray(Image.fromarray(alpha).resize(im.shape[1::-1], Image.Resampling.BILINEAR))
            im = np.dstack([off_white(im, a), a])
        rec["final"].append(str(save_image(finals[j], im, inputs=inputs, exif=exif)))
    for k, f in enumerate(res.faces):
        fr: dict[str, Any] = {"index": k, "box": [round(float(v), 2) for v in f.box],
                              "id_vs_irn": [round(v, 4) for v in f.id_vs_irn],
                              "id_vs_input": [round(v, 4) for v in f.id_vs_input]}
        if f.detail is not None:  # what the input kept: estimates, gate and high-band weight (clrface.faces.detail)
            fr["keep_detail"] = f.detail
        if f.reference is not None:  # whether the reference guided this face, and the cosines
            fr["reference"] = f.reference
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


def process_group(device: str) -> tuple[int, int, Callable[[], None], str]:
    """(rank, world, barrier, device): one process, or the process group of `accelerate launch -m clrface restore
    ...` (each process then restores every world-th input, on its own GPU when ``device`` is cuda: cuda:RANK)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None, device
    from accelerate import PartialState  # noqa: PLC0415  only under accelerate launch: a plain run skips it

    state = PartialState(cpu=device == "cpu")
    return (state.process_index, state.num_processes, state.wait_for_everyone,
            str(state.device) if device == "cuda" else device)


def restore_files(inputs: list[Path], out_dir: str | Path, restorer: Restorer, options: RestoreOptions, *,
                  aligned: bool = False, log: Callable[[str], None] | None = None, progress: bool = True,
                  rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                  overwrite: bool = False, stabilize: bool = True, keep_detail: bool = True,
                  ignored: Sequence[dict[str, str]] = (), reference: Reference | None = None,
                  reference_policy: ReferencePolicy = ReferencePolicy(), final_ext: str = "png") -> dict[str, Any]:
    """Restores each input photo into ``out_dir``: cropped_faces/, restored_faces/, cmp/, final/, report.json.

    Videos (``clrface.video.VIDEO_EXTENSIONS``) go to ``final/<name>.mp4`` with their audio, every face of every
    frame restored; ``stabilize`` turns their temporal stabilisation on (see clrface.video). ``keep_detail``: faces
    keep the input's own detail where it has it (see clrface.photo.restore_photo; photos only). ``reference``
    guides the identity of the faces ``reference_policy`` gives it to (photos only; clrface.reference).

    Files: ``<name>_<k>.png`` per face k (``_s<j>`` appended per sample when samples > 1), ``final/<name>.png``
    (``.jpg`` with ``final_ext="jpg"``: quality 95, 4:4:4 chroma, no transparency);
    ``<name>`` from ``output_names``, unique per input. Images and report.json are written under a temporary name
    and renamed, so a kill never leaves a truncated file. Unreadable inputs and write errors (``OSError``: disk
    full, permissions) are reported through ``log`` and recorded under ``failures``, and the run goes on with the
    other inputs; ``ignored`` (files not restored, with the reason, see ``prepare_inputs``) is copied to the
    report. Photos without a face go to final/ unchanged (resized by upscale) with a warning. Never writes over
    an input.

    Distributed: process ``rank`` of ``world`` restores inputs rank, rank+world, ... (names are fixed on the
    whole list, so every output has one writer); ``barrier`` waits for all processes, then rank 0 merges the
    completion records of all inputs into report.json. Inputs finished by an earlier run with the same model and
    options, whose file has not changed since (path, size, mtime), are skipped (``skipped`` in the report) unless
    ``overwrite``. A single process interrupted by Ctrl-C writes the report of what finished before it stops.
    Returns the report (rank 0: all inputs; other ranks: their own).
    """
    out = Path(out_dir)
    inputs = [Path(p) for p in inputs]
    emit = log or (lambda line: tqdm.write(line, file=sys.stderr))
    key = run_key(restorer, options, aligned) + ("" if stabilize else " no-stabilize")
    key += " keep-detail" if keep_detail else ""
    if final_ext not in FINAL_EXTS:
        raise ClrfaceError(f"final_ext must be one of {', '.join(FINAL_EXTS)}, got {final_ext!r}")
    key += "" if final_ext == "png" else f" final {final_ext}"
    if reference is not None:  # another reference (or policy) is another result
        key += f" reference {reference.embedding.tolist()} {asdict(reference_policy)}"
    done = out / DONE_DIR
    done.mkdir(parents=True, exist_ok=True)
    named = list(zip(inputs, output_names(inputs)))

    def completion(name: str) -> dict[str, Any]:
        """The completion record an earlier run wrote under ``name`` ({} if none or unreadable)."""
        try:
            rec = json.loads((done / f"{name}.done.json").read_text())
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def finished(path: Path, name: str) -> dict[str, Any] | None:
        """The completion record of ``path`` if its outputs are there and were made with these options."""
        rec = completion(name)
        same = bool(rec) and rec.get("key") == key and rec.get("source") == input_stamp(path)
        return rec if same and all(Path(f).is_file() for f in rec["record"].get("final", [])) else None

    mine = named[rank::world]
    todo = [(p, n) for p, n in mine if overwrite or finished(p, n) is None]
    failures: list[dict[str, str]] = []
    t_all = time.perf_counter()

    def write_report(covered: list[tuple[Path, str]], failures: list[dict[str, str]], skipped: int,
                     **extra: Any) -> dict[str, Any]:
        failed = {f["input"] for f in failures}
        report: dict[str, Any] = {"model": restorer.source, "device": str(restorer.device),
                                  "dtype": str(restorer.dtype).removeprefix("torch."), "aligned": aligned,
                                  "options": asdict(options), "processes": world,
                                  "images": [rec["record"] for p, n in covered
                                             if str(p) not in failed and (rec := finished(p, n)) is not None],
                                  "failures": failures, "skipped": skipped, "ignored": list(ignored), **extra}
        if reference is not None:
            report["reference"] = {"photos": list(reference.sources), **asdict(reference_policy)}
        report["seconds"] = round(time.perf_counter() - t_all, 3)
        report["faces_total"] = sum(len(r["faces"]) for r in report["images"])
        if rank == 0:
            path = out / "report.json"
            ensure_not_input(path, inputs)
            write_text_atomic(path, json.dumps(report, indent=1) + "\n")
        return report

    bar = tqdm(todo, desc="restore" if world == 1 else f"restore [{rank}/{world}]", unit="img",
               disable=not progress or len(todo) < 2, file=sys.stderr)
    for path, name in bar:
        earlier = completion(name)
        other = earlier.get("source", {}).get("input")  # whose results the name holds now
        if other is not None and Path(other).resolve() != path.resolve():
            emit(f"clrface: warning: {path}: replaces the results of {other} (same output name {name})")
        try:
            stamp = input_stamp(path)  # before reading: a file replaced during its restore is redone next time
            rec = restore_input(path, name, out, restorer, options, aligned, inputs, emit, stabilize, keep_detail,
                                reference, reference_policy, final_ext, frame_progress=progress and len(todo) == 1)
            write_text_atomic(done / f"{name}.done.json", json.dumps({"key": key, "source": stamp, "record": rec}))
            if isinstance(earlier.get("record"), dict):
                remove_stale(out, name, earlier["record"], rec, inputs)
        except (ClrfaceError, MemoryError, OSError) as e:
            if isinstance(e, ClrfaceError):
                msg = str(e)
            elif isinstance(e, MemoryError):
                msg = f"{path}: out of memory"
            else:
                msg = f"{path}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
            failures.append({"input": str(path), "error": msg})
            emit(f"clrface: error: {msg}")
        except KeyboardInterrupt:
            if world == 1:
                write_report(named, failures, len(mine) - len(todo), interrupted=True)
            raise
    skipped = len(mine) - len(todo)
    write_text_atomic(done / f"_process{rank}.json", json.dumps({"failures": failures, "skipped": skipped}))
    barrier()
    covered = mine
    if rank == 0:  # the merged view of every process's records
        covered, failures, skipped = named, [], 0
        for r in range(world):
            part = json.loads((done / f"_process{r}.json").read_text())
            failures, skipped = failures + part["failures"], skipped + part["skipped"]
    return write_report(covered, failures, skipped)
