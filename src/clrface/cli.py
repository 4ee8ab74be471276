"""The ``clrface`` command: thin argument parsing; each subcommand calls into the package.

Each subcommand imports the modules it needs when it runs, so that ``clrface --help`` and the commands that do
not restore start without loading torch and the models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from clrface import __version__
from clrface.errors import ClrfaceError
from clrface.options import (
    COLOR_MODES,
    DTYPE_NAMES,
    FINAL_EXTS,
    MAX_UPSCALE,
    MIN_FACE_PX,
    MODES,
    PACK_STAGES,
    SAMPLER_NAMES,
    finite_float,
    int_at_least,
    mode_for_reference,
    positive_int,
    unit_float,
    unused_options,
)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one stage (vqgan, prior, irn, mask, distill: the few-step prior; "
                                     "vqvae-rest: the ablation baseline) with the shared Accelerate engine",
                       description="Trains one stage from a YAML config (run from a checkout: configs/ and the "
                                   "configs' data paths are relative to it). The order: vqgan (configs/vqgan-128.yaml, "
                                   "then the decoder alone: vqgan-128-ft*.yaml), prior (prior-128*.yaml, on the frozen "
                                   "encoder's latents), irn (irn-128*.yaml), mask (mask-128.yaml: needs the prior and "
                                   "the IRN), distill (distill-128*.yaml: from a packed model folder); then `clrface "
                                   "pack`. Every config entry can be changed with --set; the run folder gets model/, "
                                   "train_state/, log.csv and val/ grids (README, 'Training').")
    p.add_argument("stage", choices=["vqgan", "prior", "irn", "mask", "distill", "vqvae-rest"],
                   help="which model to train")
    p.add_argument("--config", required=True, help="YAML file under configs/ (model + training settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set train.steps=1000 (repeatable); VALUE is read as YAML, "
                        "so quote words YAML takes for booleans: --set \"train.mixed_precision='no'\"")
    p.add_argument("--out", help="run folder (default: the config's train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state after a crash or kill")

    def run(args: argparse.Namespace) -> int:
        try:
            from clrface.train.run import run_stage
        except ModuleNotFoundError as e:
            if e.name != "accelerate":
                raise
            raise ClrfaceError("training needs accelerate: pip install 'clrface[train]'") from None

        run_stage(args.stage, args.config, overrides=args.set, out=args.out, resume=args.resume)
        return 0

    p.set_defaults(func=run)


PRESETS = ["bfr", "x32", "x64", "extreme", "gray"]
# identity-guidance scales were measured up to 40 (docs/RESULTS.md); far beyond, the gradient step swamps the face
GUIDANCE_WARN = 100.0


def _add_degradation_args(p: argparse.ArgumentParser, item: str, size_help: str) -> None:
    """--preset, --seed and --size of the commands that degrade images (``item``: what the seeds number)."""
    p.add_argument("--preset", default="bfr", choices=PRESETS,
                   help="degradation preset, its ranges given for 512 px faces: bfr (paper Sec. 4.1: Gaussian blur "
                        "sigma 0.1-10, downscale x1-x32, noise 0-20, JPEG q30-90), gray (bfr on a grayscale copy: the "
                        "colorization task), x32/x64 (blur, a fixed x32/x64 downscale and noise, no JPEG: x8/x16 at "
                        "128 px), extreme (the same at x32-x64); default bfr")
    p.add_argument("--seed", type=int, default=0, help=f"{item} i of the sorted input gets seed SEED+i")
    p.add_argument("--size", type=int_at_least(16), help=size_help)


def _summary(manifest: dict, done: str) -> int:
    """Prints what a degrading command did (and how many inputs failed); the exit status."""
    bad = len(manifest["failures"])
    print(done + (f"; {bad} failed" if bad else ""))
    return 1 if bad else 0


def _add_degrade(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "degrade", help="apply the synthetic BFR degradation (blur, downscale, noise, JPEG) to images",
        description="Applies the paper's training degradation x_d = JPEG_q((x * k) downscaled by s + noise), "
                    "upsampled back to the input's size, to an image or every image of a folder. Each image's "
                    "drawn parameters are recorded (OUTPUT.json beside a single output, manifest.json in an output "
                    "folder), so a degraded set can be rebuilt exactly. A folder's outputs are <stem>.png "
                    "(<stem>_<ext>.png where two inputs share a stem); inputs are never overwritten.")
    p.add_argument("input", help="an image file or a folder of images")
    p.add_argument("output", help="output image (for a file input, .png/.jpg; the parameters go to the same "
                                  "name with .json beside it) or folder (the parameters go to its manifest.json)")
    _add_degradation_args(p, "image", "resize to SIZE x SIZE first; the preset's 512-px ranges scale to SIZE "
                                      "(default: to each image's shorter side)")

    def run(args: argparse.Namespace) -> int:
        from clrface.data.datasets import degrade_files

        m = degrade_files(args.input, args.output, args.preset, args.seed, args.size,
                          log=lambda s: print(s, file=sys.stderr))
        return _summary(m, f"degraded {len(m['images'])} image(s) with preset {args.preset}")

    p.set_defaults(func=run)


def _add_make_testset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-testset",
                       help="build a fixed synthetic test set (gt/, lq/, manifest.json) from aligned faces",
                       description="Degrades every aligned face of SRC once, with a seed per face, and writes the "
                                   "pairs as OUT/gt/ (the face resized to SIZE) and OUT/lq/ (its degraded copy) with "
                                   "OUT/manifest.json (the preset and each face's degradation parameters): a test "
                                   "set that every method is scored on with `clrface evaluate --pred ... --gt "
                                   "OUT/gt`.")
    p.add_argument("src", help="folder of aligned square faces")
    p.add_argument("out", help="output folder")
    _add_degradation_args(p, "face", "resize faces to SIZE x SIZE (ranges scale to SIZE)")
    p.add_argument("--limit", type=positive_int, help="use only the first LIMIT faces of the sorted folder "
                                                       "(default: all)")
    p.add_argument("--realistic", action="store_true",
                   help="degrade with the preset inside the realistic mix the models train on (a second round, "
                        "faded colours, grain, grayscale; clrface.data.realistic defaults): old-photo-like faces "
                        "with ground truth")

    def run(args: argparse.Namespace) -> int:
        from clrface.data.datasets import build_testset
        from clrface.data.realistic import RealisticConfig

        m = build_testset(args.src, args.out, args.preset, args.seed, args.size, args.limit,
                          realistic=RealisticConfig() if args.realistic else None,
                          log=lambda s: print(s, file=sys.stderr))
        return _summary(m, f"wrote {len(m['images'])} pair(s) to {args.out}")

    p.set_defaults(func=run)


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "align", help="detect faces and write FFHQ-aligned crops + faces.json (box, landmarks, affine)",
        description="Finds every face of a photo (or of each photo of a folder) with dlib, fits its 68 landmarks and "
                    "writes the FFHQ-aligned crop as OUT/<name>_<k>.png (<name>: the photo's file name without "
                    "its extension, <stem>_<ext> where two photos share a stem; k = 0 for the largest face), the crops "
                    "`clrface restore --aligned` and the models take. OUT/faces.json records per face its box, "
                    "landmarks, the FFHQ quad and the affine map from photo to crop. Photos that fail to load are "
                    "reported and skipped (exit status 1); photos without a face are listed.")
    p.add_argument("input", help="a photo or a folder of photos")
    p.add_argument("out", help="output folder: <name>_<k>.png crops and faces.json")
    p.add_argument("--size", type=int_at_least(16), default=512,
                   help="crop size in pixels, at least 16 (default 512; the models work at 128)")
    p.add_argument("--max-faces", type=positive_int, default=None, metavar="N",
                   help="keep only the N largest faces per photo (default: all)")
    p.add_argument("--min-face", type=int_at_least(MIN_FACE_PX), default=32, metavar="PX",
                   help="smallest face searched for, as the width of its box in px (default 32; 64 searched 12 MP "
                        "photos 3.5x faster, docs/detection.md)")
    p.add_argument("--upsample", type=int_at_least(0), default=None, metavar="N",
                   help="one detector pass with N doublings of the photo, for photos whose faces are known to be "
                        "large (default: the multi-scale tiled search, which finds faces from 32 px wide at any "
                        "photo size)")
    p.add_argument("--detector", choices=["hog", "cnn"], default="hog", help="dlib HOG (fast) or CNN mmod (slower)")
    p.add_argument("--recursive", action="store_true", help="also look into sub-folders")

    def run(args: argparse.Namespace) -> int:
        from clrface.data.io import list_images, load_image
        from clrface.faces.align import align_files

        inputs = list_images(args.input, recursive=args.recursive)
        if Path(args.input).is_file():
            load_image(inputs[0])  # a single bad file is the command's error, not a skipped item
        elif not inputs:
            raise ClrfaceError(f"{args.input}: no image files in this folder")
        records, failures, no_face = align_files(
            inputs, args.out, args.size, max_faces=args.max_faces, upsample=args.upsample,
            detector=args.detector, min_face=args.min_face, log=lambda line: print(line, file=sys.stderr))
        print(f"aligned {len(records)} faces from {len(inputs) - len(failures)} photos into {args.out}"
              f" ({len(no_face)} without a face, {len(failures)} failed)")
        return 1 if failures else 0

    p.set_defaults(func=run)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate",
                       help="PSNR/SSIM/LPIPS/IDS/LMD/FID of restored faces vs ground truth; LFW verification",
                       description="Scores a folder of restored faces: against ground truth (--gt, matched by file "
                                   "name) with PSNR, SSIM, LPIPS, the face-recognition perceptual distance, identity "
                                   "similarity (IDS) and landmark distance (LMD); against a reference set with FID "
                                   "(--fid-ref); or as LFW 10-fold verification accuracy (--pairs). Prints one row "
                                   "per metric with its mean and bootstrap 95 % interval; a metric whose weights "
                                   "are not installed is shown as unavailable, never as a number.")
    p.add_argument("--pred", required=True,
                   help="folder of restored faces (files matched to --gt by name, any extension)")
    p.add_argument("--gt", help="folder of ground-truth faces, same size as the restored ones")
    p.add_argument("--pairs", help="LFW pairs.txt: 10-fold verification on --pred laid out as <Name>/<Name>_NNNN.*")
    p.add_argument("--fid-ref", help="reference folder for FID (statistics cached) or a stats .npz")
    p.add_argument("--metrics", default=None,
                   help="comma-separated subset of psnr,ssim,psnr_y,ssim_y,lpips,facerec_perceptual,ids,ids_blur,"
                        "lmd,fid (default: all; ids_blur: IDS with both faces blurred first, identity without the "
                        "finest detail)")
    p.add_argument("--lpips-weights", help="folder holding alexnet-owt-7be5be79.pth and alex.pth for LPIPS")
    p.add_argument("--json", help="also write the result rows (with protocols and timings) to this JSON file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"],
                   help="torch device for the networks (default cpu)")
    p.add_argument("--batch-size", type=positive_int, default=25, help="faces per chunk (default 25)")

    def run(args: argparse.Namespace) -> int:
        from clrface.device import resolve_device
        from clrface.metrics.evaluate import ALL_METRICS, evaluate_folders, format_table

        metrics = ALL_METRICS if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
        if not metrics:
            raise ClrfaceError(f"--metrics {args.metrics!r}: no metric named; choose from {', '.join(ALL_METRICS)}")
        res = evaluate_folders(args.pred, args.gt, metrics=metrics, fid_ref=args.fid_ref,
                               device=resolve_device(args.device),
                               batch_size=args.batch_size, lpips_dir=args.lpips_weights, pairs=args.pairs,
                               log=lambda s: print(s, file=sys.stderr))
        print(format_table(res))
        if args.json:
            try:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=2)
            except OSError as e:
                raise ClrfaceError(f"{args.json}: cannot write ({e.strerror})") from None
        return 0

    p.set_defaults(func=run)


def _add_restore_model_args(p: argparse.ArgumentParser) -> None:
    """Model and sampling flags shared by ``restore`` and ``demo``."""
    p.add_argument("--model", default="default",
                   help="model folder (with vqgan/, prior/ and optional irn/, mask/, restore.json) or the name of an "
                        "installed model under clrface/weights/: default, extreme (faces that were 8-16 px across, "
                        "enlarged x8-x16; on faces with more detail it draws ghosted features), colorize "
                        "(black-and-white photos), fast (the full pipeline in one step); default: %(default)s")
    p.add_argument("--fidelity", type=unit_float, default=None,
                   help="0..1, one knob for realism vs faithfulness in the sampling modes (full, as --model fast "
                        "restores, and prior; the default model's mode irn is one pass and ignores it) (default: the "
                        "model's, else 0.5). High fidelity starts the sampler close to the IRN output (small "
                        "sigma_start) with stronger identity guidance; low fidelity lets the prior regenerate more. "
                        "The installed models: sigma_start = "
                        "2.56^(1-f) * 0.25^f, guidance scale = 6.7 * f (fast: 13.3 * f), default fidelity 0.75; a "
                        "folder without restore.json: sigma_start = 4.0^(1-f) * 0.05^f, guidance scale = 10.0 * f")
    p.add_argument("--sigma-start", type=finite_float, default=None,
                   help="override the noise level the sampler starts from (0: no sampling, decode the start latent)")
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="override the identity-guidance scale (0: off)")
    p.add_argument("--irn-detail", type=unit_float, default=None, metavar="W",
                   help="mode full: share 0..1 of the finest detail (the octave above half resolution) taken from the "
                        "IRN output instead of the VQGAN decoder, which keeps ~40%% of a face's fine detail "
                        "(default: the model's, else 0 = the paper's pipeline; more octaves: --irn-detail-octaves). "
                        "A face guided by a --reference keeps the decoder's detail: the IRN's carries the degraded "
                        "photo's identity (docs/reference.md)")
    p.add_argument("--irn-detail-octaves", type=int, default=None, choices=(1, 2, 3), metavar="N",
                   help="how many of the finest octaves --irn-detail takes from the IRN: 1 (detail above half "
                        "resolution), 2 or 3 (default: the model's, else 1)")
    p.add_argument("--irn-tone", type=int, default=None, metavar="PX",
                   help="mode full: the tone (colour and shading of what a PX-px image of the face holds) taken from "
                        "the IRN output, whose colours stay closer to the photo than the quantized latent's "
                        "(default: the model's, 8 for the installed models; 0 = the paper's pipeline)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampler steps from sigma_start to 0 (default: the model's, else 20)")
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                   help="ODE solver: heun (2 evaluations per step, the paper's), euler or dpmpp_2m (1 each); "
                        "default: the model's, else heun")
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed (default 0); face i, sample k always get the same noise")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="N results per face (modes full and prior, which sample; the IRN alone gives one), written as "
                        "<name>_<k>_s0 .. _s<N-1>, best first: ranked by the identity cosine to the IRN output "
                        "(id_vs_irn in report.json; to the input in mode prior) (default 1)")
    p.add_argument("--mode", default=None, choices=MODES,
                   help="default: the model's measured-best configuration (its restore.json; see docs/RESULTS.md): "
                        "irn for default, extreme and colorize, full for fast; a folder without restore.json: full. "
                        "full = IRN + prior + masked identity guidance; prior = the prior alone from the degraded "
                        "latent (from pure noise at --sigma-start >= sigma_max) (fidelity, steps, sampler and seed "
                        "act in these two); irn = the IRN output alone; direct = the VQGAN reconstruction "
                        "G(Q(E(x)))")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="torch device (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: the CPUs this process may use less those other work keeps busy "
                        "by the load average; on a busy 2-core machine 1 thread was 9-38x faster than 2)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="compute precision: below float32 the nets run under torch autocast (weights, latents "
                        "and sampler steps stay float32); auto (default): bfloat16 on a CPU with native bf16 "
                        "(AMX / AVX512-BF16: 1.25-3.4x faster, same scores in docs/RESULTS.md), else float32 "
                        "(also on GPUs: bf16 measured slower for single faces on an H200)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="faces per forward pass (x samples); default: the fastest measured, 16 on a GPU (H200: 13x "
                        "faster per face than 1 at a time) and on CPU under bfloat16 (2.2x), 4 on CPU under float32 "
                        "(larger batches are slower there)")
    p.add_argument("--bg-upscale", "--upscale", dest="upscale", type=int_at_least(1, at_most=MAX_UPSCALE), default=1,
                   metavar="N",
                   help="integer factor: the whole photo is enlarged by N (Lanczos, or Real-ESRGAN with --bg-model) "
                        "before the restored faces are pasted at that resolution (aligned crops: the crop size x N); "
                        f"1 to {MAX_UPSCALE}, default 1")
    p.add_argument("--bg-model", default=None, metavar="WEIGHTS",
                   help="Real-ESRGAN RRDBNet weights for the background (e.g. RealESRGAN_x4plus.pth or x2plus, "
                        "placed by you; nothing is downloaded); run on tiles, then resampled to --bg-upscale")
    p.add_argument("--bg-tile", type=int_at_least(64), default=None,
                   help="tile size in input pixels for --bg-model, at least 64 (smaller: less memory; default 192)")
    p.add_argument("--max-faces", type=positive_int, default=None, metavar="N",
                   help="restore only the N largest faces of each photo")
    p.add_argument("--min-face", type=int_at_least(MIN_FACE_PX), default=None, metavar="PX",
                   help=f"smallest face searched for, as the width of its box in px, at least {MIN_FACE_PX} "
                        "(default 32 in photos, 64 in video frames). Detection is most of a large photo's time and "
                        "costs ~(32/PX)^2 of the default: 64 searched 12 MP photos 3.5x faster and found the faces "
                        "from 64 px as often as the default (docs/detection.md)")
    p.add_argument("--color", default=None, choices=COLOR_MODES,
                   help="full: paste the restored colours (on a monochrome photo on the face's skin only, not on "
                        "hair or background); keep: paste only the restored luminance, keeping the photo's tone "
                        "(grayscale/sepia stay so, no colour cast at the seam); auto (default): keep for monochrome "
                        "photos, else full. --model colorize defaults to full: it colours the faces of gray photos")


def _restore_setup(args: argparse.Namespace):
    from clrface.background import BG_TILE, RealESRGANUpscaler, lanczos_upscale, load_rrdbnet
    from clrface.device import DTYPES, native_bf16, resolve_device, resolve_dtype, set_threads
    from clrface.restorer import Restorer

    set_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.bg_tile is not None and not args.bg_model:
        raise ClrfaceError("--bg-tile needs --bg-model (it sets the Real-ESRGAN tile size)")
    background = lanczos_upscale
    if args.bg_model:
        background = RealESRGANUpscaler(load_rrdbnet(args.bg_model, device), tile=args.bg_tile or BG_TILE)
    restorer = Restorer.from_pretrained(args.model, device, DTYPES[dtype], background=background)
    given = {"fidelity": args.fidelity, "steps": args.steps, "sampler": args.sampler, "sigma_start": args.sigma_start,
             "guidance_scale": args.guidance_scale, "irn_detail": args.irn_detail,
             "irn_detail_octaves": args.irn_detail_octaves, "irn_tone": args.irn_tone, "seed": args.seed}
    native = dtype == "bfloat16" and native_bf16(device)  # emulated bf16, like float32 on a CPU, is slower in batches
    batch = args.batch_size or (16 if native or device.type == "cuda" else 4)
    options = restorer.options(**given, samples=args.samples, mode=args.mode, batch_size=batch, upscale=args.upscale,
                               max_faces=args.max_faces, min_face=args.min_face, color=args.color)
    unused = unused_options(options.mode, [k for k, v in given.items() if v is not None])
    if unused:  # the default model's mode irn: --fidelity, --steps and --seed would change nothing, silently
        print(f"clrface: warning: {unused}", file=sys.stderr)
    if (args.guidance_scale or 0) > GUIDANCE_WARN:
        print(f"clrface: warning: --guidance-scale {args.guidance_scale:g} is far above the measured range (up to "
              "40, docs/RESULTS.md); guidance this strong can turn the face into noise", file=sys.stderr)
    return restorer, options


def _add_restore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore", help="restore the faces of photos, videos (or of aligned face crops) with CLR-Face",
        description="Detects and aligns every face, restores it and pastes it back: by default with the Identity "
                    "Recovery Network alone (one pass, the measured best), with --model fast or --mode full through "
                    "the paper's pipeline (IRN -> conditional latent prior with masked identity guidance -> VQGAN "
                    "decoder). Writes OUTPUT/cropped_faces/, restored_faces/, cmp/ (input crop | restored), final/ "
                    "(whole photos) and report.json (boxes, identity cosines "
                    "restored-vs-IRN and restored-vs-input, timings, failures). Inputs are never overwritten. "
                    "Videos (.mp4 .mov .mkv .avi .webm) go to final/<name>.mp4 with their audio: every face of every "
                    "frame is restored, tracked across frames and stabilised (see --no-stabilize). report.json "
                    "describes the inputs of this run. A large folder can be split over processes: `accelerate "
                    "launch --multi_gpu --num_processes N -m clrface restore FOLDER -o OUT` (also on CPUs).")
    p.add_argument("input", help="a photo, a video or a folder of them")
    p.add_argument("-o", "--output", default="results",
                   help="output folder (default: %(default)s in the current folder, as GFPGAN's and CodeFormer's)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are already FFHQ-aligned face crops (any size): no detection, restored at their "
                        "size; a square input whose face is not where an aligned crop has it (a whole photo, a "
                        "face-box crop) gets a warning")
    p.add_argument("--recursive", action="store_true",
                   help="also restore the photos and videos of sub-folders (the output folder stays flat: names "
                        "that would clash get the extension or a short hash; report.json names each input)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo inputs that an earlier run into OUTPUT finished with the same model and options "
                        "(by default they are skipped, so a killed run resumes where it stopped)")
    p.add_argument("--no-stabilize", action="store_true",
                   help="videos: restore every frame as an independent photo (no face tracking, landmark smoothing, "
                        "per-track noise or temporal blending); for comparison, it flickers more")
    p.add_argument("--ext", choices=FINAL_EXTS, default="png",
                   help="format of the whole photos in final/: png (default: lossless, transparency kept) or jpg "
                        "(quality 95, no chroma subsampling: 3.8x smaller on the real_lq photos, transparency "
                        "dropped); face crops and cmp/ stay PNG, videos MP4")
    p.add_argument("--keep-detail", action=argparse.BooleanOptionalAction, default=True,
                   help="photos: paste each face at the input's own resolution, the restored face supplying only "
                        "what the input lacks: the input's detail above the model's resolution is kept where it is "
                        "signal rather than noise or JPEG blocking, and a face that is already clean is kept as it "
                        "is; report.json records per face the estimates and weights (keep_detail). "
                        "--no-keep-detail pastes the restored face alone (default: on)")
    p.add_argument("--reference", nargs="+", default=None, metavar="PHOTO",
                   help="clean photo(s) of the person, files or a folder (aligned crops with --aligned): the face "
                        "that matches them best is guided toward their identity instead of the IRN output's (mode "
                        "full; another --mode is refused). A face that looks like "
                        "another person is restored without it, with a warning; report.json says per face whether "
                        "the reference was used (docs/reference.md)")
    p.add_argument("--reference-all", action="store_true",
                   help="with --reference: every face of a photo that matches the reference takes it, not only the "
                        "best-matching one")
    p.add_argument("--reference-guidance", type=finite_float, default=None, metavar="SCALE",
                   help="with --reference: the identity-guidance scale of the face the reference guides (default "
                        "30, measured in docs/reference.md; --guidance-scale sets that of the other faces)")
    p.add_argument("--force-reference", action="store_true",
                   help="with --reference: use it even on a face that looks like another person (it pulls that "
                        "face toward the reference's identity)")
    _add_restore_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from clrface.batch import prepare_inputs, process_group, restore_files, summary_line
        from clrface.reference import ReferencePolicy, load_reference

        if (args.reference_all or args.force_reference or args.reference_guidance is not None) and not args.reference:
            raise ClrfaceError("--reference-all, --force-reference and --reference-guidance need --reference")
        if args.reference:
            args.mode = mode_for_reference(args.mode)
        inputs, ignored = prepare_inputs(args.input, args.output, recursive=args.recursive)  # before any model
        rank, world, barrier, args.device = process_group(args.device)
        restorer, options = _restore_setup(args)
        if args.reference_guidance is not None:
            options = dataclasses.replace(options, reference_guidance=args.reference_guidance)
        reference = load_reference(restorer, args.reference, aligned=args.aligned) if args.reference else None
        report = restore_files(inputs, args.output, restorer, options, aligned=args.aligned, rank=rank, world=world,
                               barrier=barrier, overwrite=args.overwrite, stabilize=not args.no_stabilize,
                               keep_detail=args.keep_detail, ignored=ignored, reference=reference,
                               final_ext=args.ext,
                               reference_policy=ReferencePolicy(all_faces=args.reference_all,
                                                                force=args.force_reference))
        if rank == 0:
            print(summary_line(report, args.output, world))
        return 1 if report["failures"] else 0

    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="degrade and restore a public-domain portrait; writes OUTPUT/demo_cmp.png",
        description="Degrades the public-domain NASA astronaut portrait shipped with scikit-image (bfr preset, fixed "
                    "seed), restores it and writes OUTPUT/demo_cmp.png (degraded | restored | original), "
                    "OUTPUT/original.png and OUTPUT/degraded.png (the input it restores), plus the "
                    "outputs of `clrface restore` (cropped_faces/, restored_faces/, cmp/, final/, report.json).")
    p.add_argument("-o", "--output", default="results/demo", help="output folder (default: results/demo)")
    _add_restore_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from clrface.demo import run_demo

        restorer, options = _restore_setup(args)
        report = run_demo(args.output, restorer, options)
        faces = report["faces_total"]
        print(f"demo: {faces} face(s) restored; see {Path(args.output) / 'demo_cmp.png'}"
              + ("" if faces else " (no face was found in the degraded portrait)"))
        return 0

    p.set_defaults(func=run)


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="assemble trained stages into one model folder for `clrface restore --model` "
                                    "(fp16 by default)",
                       description="Writes a model folder that `clrface restore --model OUT` and "
                                   "`Restorer.from_pretrained(OUT)` load: the stages given (each a checkpoint folder "
                                   "with config.json + model.safetensors, stored in --dtype) and restore.json; the "
                                   "stages not given and the restore settings come from --base.")
    p.add_argument("-o", "--out", required=True,
                   help="model folder to write (gets the stages given; a restore.json already there keeps its "
                        "settings, its base becomes --base)")
    for stage in PACK_STAGES:
        p.add_argument(f"--{stage}",
                       help=f"checkpoint folder of the {stage} stage (e.g. runs/{stage}-128/model)"
                       + ("; required unless --base" if stage in ("vqgan", "prior") else "; optional"))
    p.add_argument("--base", help="an installed model (e.g. default) that supplies the stages not given here and "
                                  "the restore settings (mode, steps, fidelity map): a fine-tuned model ships only "
                                  "what it changed (written to restore.json)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage dtype of the weights (default %(default)s: half the size; restore casts them back "
                        "to float32)")

    def run(args: argparse.Namespace) -> int:
        import torch

        from clrface.model_folder import pack_model

        stages = {stage: getattr(args, stage) for stage in PACK_STAGES if getattr(args, stage)}
        pack_model(Path(args.out), stages, args.base, getattr(torch, args.dtype))
        return 0

    p.set_defaults(func=run)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="a local web page: upload a photo, pick fidelity/steps/seed/mode, compare and download",
        description="Serves a page on http://HOST:PORT/ (standard library HTTP server, no extra dependency): upload a "
                    "photo, restore it with the options chosen, see input and result side by side with each face's "
                    "identity scores, download the PNG. The model is loaded once; restores run one at a time. "
                    "Nothing is written to disk except each upload, briefly, in a temporary folder.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0 exposes it, "
                        "without authentication)")
    p.add_argument("--port", type=int_at_least(0, at_most=65535), default=7860,
                   help="TCP port (default %(default)s; 0: any free port)")
    p.add_argument("--model", default="default", help="model folder or installed model name (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="torch device (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: the CPUs this process may use less those other work keeps busy "
                        "by the load average; on a busy 2-core machine 1 thread was 9-38x faster than 2)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="compute precision (see `clrface restore --help`; default auto)")
    p.add_argument("--max-upload-mb", type=finite_float, default=20.0,
                   help="refuse larger uploads (default %(default)s)")
    p.add_argument("--max-megapixels", type=finite_float, default=16.0,
                   help="refuse photos with more pixels, read from the header before decoding (default %(default)s)")

    def run(args: argparse.Namespace) -> int:
        from clrface.device import DTYPES, resolve_device, resolve_dtype, set_threads
        from clrface.restorer import Restorer
        from clrface.serve import make_server, serve
        from clrface.serve_app import App, ServeLimits

        if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
            raise ClrfaceError("--max-upload-mb and --max-megapixels must be > 0")
        limits = ServeLimits(max_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6))
        set_threads(args.threads)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        server = make_server(None, args.host, args.port, limits)  # a taken port is said before the model loads
        try:
            server.app = App(Restorer.from_pretrained(args.model, device, DTYPES[dtype]), limits)
            serve(server)
        finally:
            server.server_close()
        return 0

    p.set_defaults(func=run)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model for other runtimes (onnx: torch-free restore with onnxruntime)")
    fmt = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    o = fmt.add_parser(
        "onnx", help="write encoder/decoder/denoiser/irn .onnx graphs and runtime.json into a folder",
        description="Exports the VQGAN encoder (with the latent normalisation), the decoder G(Q(z)) (nearest-code "
                    "lookup inside), the preconditioned prior denoiser D(x; sigma, z_d) and the IRN as ONNX graphs "
                    "with a dynamic batch axis, plus runtime.json (resolution, schedule, latent mean/std, default "
                    "options) for clrface.onnx_runtime.OnnxRestorer (numpy + onnxruntime, no torch). Identity "
                    "guidance needs autograd and stays torch-only.")
    o.add_argument("--model", default="default", help="model folder or installed model name (default: %(default)s)")
    o.add_argument("-o", "--output", required=True, help="output folder")
    o.add_argument("--opset", type=int, default=18,
                   help="ONNX opset, from 17 to the newest the installed onnx package defines (default %(default)s)")
    o.add_argument("--torchscript", action="store_true",
                   help="use torch's legacy TorchScript exporter (deprecated; faster, needs no onnxscript)")

    def run(args: argparse.Namespace) -> int:
        if Path(args.output).exists() and not Path(args.output).is_dir():  # before the minute of exporting
            raise ClrfaceError(f"{args.output}: exists and is not a folder; --output must be a folder")
        from clrface.export import export_onnx

        path = export_onnx(args.model, args.output, opset=args.opset, dynamo=not args.torchscript)
        graphs = json.loads(path.read_text())["graphs"].values()
        print(f"exported {args.model} to {path.parent}: {', '.join(graphs)}, {path.name}")
        return 0

    o.set_defaults(func=run)


# Subcommands are added by one function each; keep each block self-contained.
_COMMANDS = [_add_train, _add_degrade, _add_make_testset, _add_align, _add_evaluate, _add_restore, _add_demo, _add_pack,
             _add_serve, _add_export]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line; the usage block is what --help is for
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="clrface",
        description="Restore degraded face photos (CLR-Face: conditional latent refinement with a score-based prior).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Python warnings as the command's other warnings: one line on stderr, without the source line."""
    print(f"clrface: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            return int(args.func(args) or 0)
    # OSError: an output the system refuses (read-only, full disk, a file where a folder goes)
    except (ClrfaceError, OSError) as e:
        print(f"clrface: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clrface: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
