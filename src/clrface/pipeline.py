"""The Restorer: degraded photo -> restored photo, end to end (paper Sec. 3, Fig. 2).

Data flow (one call per arrow; faces of one photo travel as one batch)::

    photo -> faces.align_faces -> x_d [B,3,S,S], affine M          (S = the VQGAN's resolution)
    x_d  -> vqgan.encode -> normalize ----------------> z_d   condition of the prior, never noised
    x_d  -> irn -> x_id -> vqgan.encode -> normalize -> z_id  start latent (x_init)
    x_id -> facerec.embed ----------------------------> e_id  identity-guidance target
    z    = sampler(identity_guided(prior(., cond=z_d)), z_id + sigma_start * eps, sigmas from sigma_start)
    z    -> denormalize -> vqgan.decode (G(Q(z))) -> face -> faces.paste(photo, face, M, bicubic)

One knob, ``fidelity`` in [0, 1], trades the prior's realism against faithfulness to the input/IRN output:

    sigma_start(f)    = sigma_lo_fid^(1 - f) * sigma_hi_fid^f          (geometric; default 4.0 -> 0.05)
    guidance_scale(f) = guid_lo_fid + f * (guid_hi_fid - guid_lo_fid)  (linear;    default 0.0 -> 10.0)

High fidelity starts the reverse ODE close to the IRN latent (little noise: the prior only polishes) and
pulls harder toward the IRN identity; low fidelity drowns more of the IRN latent in noise so that the prior
(conditioned on z_d) regenerates more of the face, with little identity guidance. The end points live in
:class:`FidelityMap`; a model folder may override them with ``restore.json`` (``{"fidelity_map": {...}}``)
once they are calibrated for its weights. ``RestoreOptions.sigma_start`` / ``guidance_scale`` override the
knob explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from clrface.background import Upscaler, lanczos_upscale
from clrface.diffusion.prior import LatentPrior, load_prior
from clrface.diffusion.sampler import SAMPLERS, Denoise, nfe, sample
from clrface.diffusion.schedule import sigmas_from
from clrface.errors import CheckpointError, ClrfaceError
from clrface.identity.guidance import LatentMask, identity_guided, load_mask
from clrface.vqgan.model import VQGAN

MODES = ("full", "prior", "irn", "direct")
"""full: IRN + prior + (masked) identity guidance; prior: the prior alone, started from z_d (from pure noise
when sigma_start >= the schedule's sigma_max), no IRN, no guidance; irn: the IRN output x_id alone;
direct: G(Q(E(x_d))), the VQGAN's reconstruction of the input."""

COLOR_MODES = ("auto", "keep", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_UPSCALE = 8


@dataclass(frozen=True)
class FidelityMap:
    """End points of the fidelity knob (see the module docstring). Uncalibrated defaults: replace them per
    model through ``restore.json`` once benchmarks have measured the trade-off."""

    sigma_start_at_0: float = 4.0
    sigma_start_at_1: float = 0.05
    guidance_at_0: float = 0.0
    # Calibrated on the 128 px models: one guided x0 step on 16 test faces lowered the dlib identity loss to the
    # GT most at scale ~10 (update RMS ~0.01 in normalised latents); 100+ overshoots (docs/RESULTS.md).
    guidance_at_1: float = 10.0

    def __post_init__(self) -> None:
        if not (self.sigma_start_at_0 > 0 and self.sigma_start_at_1 > 0):
            raise ValueError(f"fidelity sigma end points must be > 0: {self}")
        if self.guidance_at_0 < 0 or self.guidance_at_1 < 0:
            raise ValueError(f"fidelity guidance end points must be >= 0: {self}")

    def sigma_start(self, fidelity: float) -> float:
        return math.exp((1 - fidelity) * math.log(self.sigma_start_at_0) + fidelity * math.log(self.sigma_start_at_1))

    def guidance_scale(self, fidelity: float) -> float:
        return self.guidance_at_0 + fidelity * (self.guidance_at_1 - self.guidance_at_0)


@dataclass
class RestoreOptions:
    """How to restore. ``fidelity`` sets sigma_start and guidance_scale unless those are given explicitly.

    steps: sampler steps from sigma_start down to 0 (a fresh Karras schedule, rho of the prior's schedule).
    seed: face i, sample k draws its start noise from its own generator seeded by (seed, k, i), so results do
    not depend on batch_size or the device. samples: independent results per face. batch_size: faces per
    forward pass (times ``samples``). upscale: integer factor of the output photo/crop over the input.
    color: what the pasted face takes from the restored crop. "full": its colours; "keep": its luminance only,
    with the chroma of the photo under it, so grayscale and sepia photos keep their tone; "auto": "keep" for
    monochrome photos (see :func:`is_monochrome`), else "full". A colorization model sets "full" in its
    restore.json.
    """

    fidelity: float = 0.5
    steps: int = 20
    sampler: str = "heun"
    sigma_start: float | None = None
    guidance_scale: float | None = None
    seed: int = 0
    samples: int = 1
    mode: str = "full"
    batch_size: int = 8
    upscale: int = 1
    max_faces: int | None = None
    color: str = "auto"

    def __post_init__(self) -> None:
        if self.color not in COLOR_MODES:
            raise ClrfaceError(f"unknown color {self.color!r}; choose from {', '.join(COLOR_MODES)}")
        if not 0.0 <= float(self.fidelity) <= 1.0:
            raise ClrfaceError(f"fidelity must be in [0, 1], got {self.fidelity}")
        if self.steps < 1:
            raise ClrfaceError(f"steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ClrfaceError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.mode not in MODES:
            raise ClrfaceError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.sigma_start is not None and self.sigma_start < 0:
            raise ClrfaceError(f"sigma_start must be >= 0, got {self.sigma_start}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ClrfaceError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.samples < 1 or self.batch_size < 1:
            raise ClrfaceError(f"samples and batch_size must be >= 1, got {self.samples}, {self.batch_size}")
        if not (isinstance(self.upscale, int) and 1 <= self.upscale <= MAX_UPSCALE):
            raise ClrfaceError(f"upscale must be an integer in [1, {MAX_UPSCALE}], got {self.upscale}")
        if self.max_faces is not None and self.max_faces < 1:
            raise ClrfaceError(f"max_faces must be >= 1, got {self.max_faces}")

    def resolve(self, fmap: FidelityMap) -> tuple[float, float]:
        """(sigma_start, guidance_scale): the explicit values, else the fidelity map's."""
        s = fmap.sigma_start(self.fidelity) if self.sigma_start is None else float(self.sigma_start)
        g = fmap.guidance_scale(self.fidelity) if self.guidance_scale is None else float(self.guidance_scale)
        return s, g


@dataclass
class FaceResult:
    """One face of a photo. crop_in: uint8 [S,S,3] model input; crops_out: ``samples`` uint8 [S,S,3];
    box: [4] x0,y0,x1,y1 in input-photo pixels; affine: [2,3] photo -> crop of S px; id_*: cosine per sample."""

    crop_in: np.ndarray
    crops_out: list[np.ndarray]
    box: np.ndarray
    affine: np.ndarray
    id_vs_irn: list[float]
    id_vs_input: list[float]


@dataclass
class RestoreResult:
    """images: ``samples`` uint8 [H*u, W*u, 3] outputs; ``no_face``: nothing was detected (images are the input)."""

    images: list[np.ndarray]
    faces: list[FaceResult]
    no_face: bool = False
    warnings: list[str] = field(default_factory=list)
    sampling: dict[str, float] = field(default_factory=dict)  # sigma_start, guidance_scale, nfe actually used

    @property
    def image(self) -> np.ndarray:
        return self.images[0]


def _face_seed(seed: int, sample_k: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, sample_k, index]).generate_state(1)[0])


def face_noise(shape: tuple[int, ...], seed: int, sample_k: int, first_index: int = 0) -> Tensor:
    """Start noise [B,...] for faces first_index.. first_index+B-1, sample k: fp32 on CPU, one generator per face."""
    rows = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(_face_seed(seed, sample_k, first_index + i)))
            for i in range(shape[0])]
    return torch.stack(rows)


def _u8(x: Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]."""
    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _from_u8(a: np.ndarray) -> Tensor:
    """uint8 [B,H,W,3] -> [B,3,H,W] float32 in [-1,1]."""
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    if img.shape[1] == w and img.shape[0] == h:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.LANCZOS))


def _ycbcr(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).convert("YCbCr"), dtype=np.float32)


def is_monochrome(photo: np.ndarray, tol: float = 1.5) -> bool:
    """True for grayscale and single-hue (sepia, cyanotype) photos: the chroma vectors (Cb-128, Cr-128) of the
    pixels lie on one ray from neutral gray, within ``tol`` (0-255 scale, rms distance off the ray; colour photos
    of ../shared/data/real_lq measure 2.6 to 9.3, a warm film still the lowest)."""
    c = _ycbcr(photo)[..., 1:].reshape(-1, 2).astype(np.float64) - 128.0
    if len(c) > 65536:  # a fixed subsample is plenty for a 2-D direction
        c = c[:: len(c) // 65536]
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    d = vt[0]
    along = c @ d
    if along.mean() < 0:
        d, along = -d, -along
    off = c - along[:, None] * d
    return bool(np.sqrt((off ** 2).sum(1).mean()) <= tol and np.quantile(along, 0.01) >= -tol)


def keep_tone(restored: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The luminance of ``restored`` with the chroma of ``reference`` (same size, uint8 [S,S,3])."""
    y = _ycbcr(restored)[..., :1]
    cbcr = _ycbcr(reference)[..., 1:]
    ycc = np.clip(np.rint(np.concatenate([y, cbcr], -1)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(ycc, "YCbCr").convert("RGB"))


BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags() -> frozenset[str]:
    """The ISA flags of this CPU from /proc/cpuinfo (empty where it cannot be read, e.g. macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        return frozenset()


def resolve_dtype(name: str, device: torch.device) -> str:
    """A ``--dtype`` value made concrete: "auto" becomes :func:`auto_dtype`'s choice, other names stay."""
    return auto_dtype(device) if name == "auto" else name


def auto_dtype(device: torch.device, flags: frozenset[str] | None = None) -> str:
    """The compute precision ``--dtype auto`` picks: bfloat16 on a CPU with native bf16 (AMX or AVX512-BF16),
    where it measured 1.25-3.4x faster at equal quality (docs/RESULTS.md, "Cheap speed-ups"); else float32
    (emulated bf16 is slower; on an H200 bf16 autocast was slower for one face and at most 1.25x faster per face
    in batches of 16: docs/RESULTS.md, "GPU session")."""
    if device.type == "cpu" and (cpu_flags() if flags is None else flags) & BF16_CPU_FLAGS:
        return "bfloat16"
    return "float32"


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device that exists here; raises ClrfaceError (one line) for cuda/mps when unavailable."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClrfaceError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ClrfaceError("device 'mps' requested but MPS is not available; use --device cpu")
    return dev


def _package_weights(name: str) -> Path:
    return Path(str(importlib.resources.files("clrface") / "weights" / name))


def resolve_model(path_or_name: str | Path | None) -> Path:
    """A model folder from a path or the name of a model shipped under ``clrface/weights/`` (None: "default")."""
    if path_or_name is None:
        path_or_name = "default"
    p = Path(path_or_name).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_name)
    if "/" not in name and "\\" not in name:
        pkg = _package_weights(name)
        if pkg.is_dir():
            return pkg
        root = _package_weights("")
        avail = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        raise CheckpointError(f"model {name!r}: no such folder and no installed model of that name in {root} "
                              f"(installed: {', '.join(avail) or 'none'}); pass --model FOLDER")
    raise CheckpointError(f"{p}: model folder not found")


class Restorer:
    """Blind face restorer: VQGAN (E, Q, G), conditional latent prior, optional IRN, optional latent mask, face
    recogniser, all with fp32 weights on one device. ``dtype`` is the compute precision: below fp32 the nets run
    under ``torch.autocast`` (as in training), while latents, sampler updates and sigma math stay fp32."""

    def __init__(self, vqgan: VQGAN, prior: LatentPrior, irn: nn.Module | None = None, mask: LatentMask | None = None,
                 facerec: nn.Module | None = None, *, fidelity_map: FidelityMap = FidelityMap(),
                 source: str | None = None, dtype: torch.dtype | None = None, defaults: dict[str, Any] | None = None,
                 background: Upscaler = lanczos_upscale):
        self.vqgan, self.prior, self.irn, self.mask = vqgan, prior, irn, mask
        self.background = background  # enlarges the whole photo by options.upscale before faces are pasted
        self.fidelity_map = fidelity_map
        # The model's measured-best RestoreOptions (restore.json "defaults"); explicit options override them.
        self.defaults: dict[str, Any] = dict(defaults or {})
        self.source = source
        p = next(vqgan.parameters())
        self.device, self.dtype = p.device, dtype or p.dtype
        if facerec is None:
            from clrface.identity.facerec import load_facerec

            facerec = load_facerec(self.device)
        self.facerec = facerec
        _check_compatible(vqgan, prior, mask, source or "model")

    @property
    def resolution(self) -> int:
        """S: the face size the models work at."""
        return int(self.vqgan.config.resolution)

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, *, facerec: nn.Module | None = None,
                        background: Upscaler = lanczos_upscale) -> "Restorer":
        """Loads ``vqgan/``, ``prior/`` (required), ``irn/``, ``mask/`` (optional) and ``restore.json`` (optional)
        from a model folder, or from ``clrface/weights/<name>`` for a name (None or "default": the shipped
        default). A restore.json ``"base": NAME`` supplies the stages the folder lacks from the installed model NAME
        (a fine-tuned model ships only what it changed). Weights load in fp32 on ``device``; ``dtype`` is the
        compute precision (autocast). A missing or incomplete folder or a checkpoint of the wrong kind/shape raises
        CheckpointError."""
        from clrface.train.vqgan import load_vqgan

        folder = resolve_model(path_or_name)
        spec: dict[str, Any] = {}
        if (folder / "restore.json").is_file():
            try:
                spec = json.loads((folder / "restore.json").read_text())
            except ValueError as e:
                raise CheckpointError(f"{folder / 'restore.json'}: invalid ({e})") from None
        # A fine-tuned model ships only the stages it changed; "base" names the model that supplies the rest.
        base = resolve_model(spec["base"]) if spec.get("base") else None

        def stage(sub: str) -> Path:
            own = folder / sub
            return base / sub if base is not None and not own.is_dir() else own

        missing = [sub for sub in ("vqgan", "prior") if not (stage(sub) / "config.json").is_file()
                   or not (stage(sub) / "model.safetensors").is_file()]
        if missing:
            raise CheckpointError(f"{folder}: incomplete model folder, missing {' and '.join(s + '/' for s in missing)}"
                                  " (need vqgan/ and prior/ checkpoints; irn/ and mask/ are optional)")
        device = torch.device(device)
        vqgan = load_vqgan(stage("vqgan"), device)
        prior = load_prior(stage("prior"), device)
        irn = mask = None
        if stage("irn").is_dir():
            from clrface.identity.irn import load_irn

            irn = load_irn(stage("irn"), device)
        if stage("mask").is_dir():
            mask = load_mask(stage("mask"), device)
        try:
            fmap = FidelityMap(**spec.get("fidelity_map", {}))
            defaults = spec.get("defaults", {})
            RestoreOptions(**defaults)  # validate now, not at the first restore
        except (ValueError, TypeError, ClrfaceError) as e:
            raise CheckpointError(f"{folder / 'restore.json'}: invalid ({e})") from None
        return cls(vqgan, prior, irn, mask, facerec, fidelity_map=fmap, source=str(folder), dtype=dtype,
                   defaults=defaults, background=background)

    def options(self, **overrides: Any) -> RestoreOptions:
        """RestoreOptions: the model's defaults (restore.json), then ``overrides`` that are not None."""
        return RestoreOptions(**{**self.defaults, **{k: v for k, v in overrides.items() if v is not None}})

    # ------------------------------------------------------------------------------------------ steps

    def encode(self, x: Tensor) -> Tensor:
        """x [B,3,S,S] in [-1,1] -> normalised latent (E(x) - mean) / std [B,d,S/f,S/f] fp32."""
        return self.prior.normalize(self.vqgan.encode(x.to(self.device, torch.float32)).float())

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent -> G(Q(denormalize(z))) [B,3,S,S] (Q straight-through, so differentiable in z)."""
        return self.vqgan.decode(self.prior.denormalize(z.float())).float()

    def run_irn(self, x_d: Tensor) -> Tensor:
        """f_IRN(x_d) clamped to [-1,1] [B,3,S,S] (an image: it is encoded, embedded and may be the output);
        without an IRN the input itself (the start then is z_d)."""
        if self.irn is None:
            return x_d.float()
        return self.irn(x_d.to(self.device, torch.float32)).float().clamp(-1, 1)

    def embed(self, x: Tensor) -> Tensor:
        """Normalised identity embedding [B,D] of aligned faces [B,3,S,S] (differentiable)."""
        return self.facerec.embed(x.float()).float()

    def denoiser(self, z_d: Tensor, e_id: Tensor | None, scale: float) -> Denoise:
        """D(.; sigma, z_d), wrapped by masked identity guidance toward e_id when scale > 0 (Sec. 3.3)."""
        denoise: Denoise = functools.partial(self.prior, cond=z_d)
        if scale > 0 and e_id is not None:
            mask = None if self.mask is None else (lambda x, s: self.mask(x, s).float())
            denoise = identity_guided(denoise, mask, self.decode, self.embed, e_id, scale)
        return denoise

    def refine(self, z_init: Tensor, denoise: Denoise, sigma_start: float, options: RestoreOptions,
               noise: Tensor) -> Tensor:
        """Reverse ODE (paper Eq. 10) from z_init + sigma_start * noise to sigma 0 -> latent [B,d,h,w] fp32."""
        sigmas = sigmas_from(self.prior.config.schedule, sigma_start, options.steps)
        z = sample(SAMPLERS[options.sampler], denoise, z_init.float(), sigmas, noise=noise.to(self.device, torch.float32))
        return z.float()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The compute-precision context: autocast to ``dtype`` below fp32, else nothing."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()  # guided sampling needs autograd islands, so no inference_mode
    def restore_faces(self, x_d: Tensor, options: RestoreOptions | None = None, *, first_index: int = 0,
                      face_ids: Sequence[int] | None = None, start: Callable[[Tensor], Tensor] | None = None
                      ) -> dict[str, Any]:
        """Restores aligned faces x_d [B,3,S,S] in [-1,1].

        Returns a dict: ``restored`` [B,N,3,S,S] fp32 in [-1,1] (N = options.samples), ``x_id`` [B,3,S,S] (the
        IRN output; x_d when there is none or mode is not "full"/"irn"), ``id_vs_irn`` / ``id_vs_input`` [B,N]
        cosine similarities of the restored faces' embeddings with those of x_id and x_d, ``sigma_start``,
        ``guidance_scale`` and ``nfe`` (denoiser calls per face and sample), ``latent`` [B,N,d,h,w] (the sampled
        latent; None in modes irn/direct). ``first_index`` numbers the faces for the per-face noise seeds (see
        RestoreOptions); ``face_ids`` [B] numbers them explicitly instead (video: a face track keeps its noise).
        ``start`` maps the start latent z_init [B,d,h,w] to the one the sampler starts from (video: blends in the
        previous frame's latent); diffusion modes only.
        """
        o = options or RestoreOptions()
        s = self.resolution
        if x_d.ndim != 4 or x_d.shape[1] != 3 or tuple(x_d.shape[2:]) != (s, s):
            raise ClrfaceError(f"restore_faces needs faces [B,3,{s},{s}], got {tuple(x_d.shape)}")
        with self.autocast():
            return self._restore_faces(x_d.to(self.device, torch.float32), o, first_index, face_ids, start)

    def _restore_faces(self, x_d: Tensor, o: RestoreOptions, first_index: int,
                       face_ids: Sequence[int] | None = None, start: Callable[[Tensor], Tensor] | None = None
                       ) -> dict[str, Any]:
        s = self.resolution
        b, n = x_d.shape[0], o.samples
        sigma_start, scale = o.resolve(self.fidelity_map)
        calls, z, e_irn = 0, None, None
        x_id, has_id = x_d, False
        if o.mode == "direct":
            restored = self.vqgan.decode(self.vqgan.encode(x_d)).float()
            restored = restored[:, None].expand(b, n, 3, s, s)
            sigma_start, scale = 0.0, 0.0
        elif o.mode == "irn":
            if self.irn is None:
                raise ClrfaceError(f"mode 'irn' needs an irn/ checkpoint in the model folder ({self.source})")
            x_id, has_id = self.run_irn(x_d), True
            restored = x_id[:, None].expand(b, n, 3, s, s)
            sigma_start, scale = 0.0, 0.0
        else:
            z_d = self.encode(x_d)
            if o.mode == "full":
                x_id, has_id = self.run_irn(x_d), self.irn is not None
                z_init = self.encode(x_id) if has_id else z_d
                e_id = e_irn = self.embed(x_id)
            else:  # prior alone: no IRN, no guidance; at the top of the schedule it is plain sampling from noise
                scale, e_id = 0.0, None
                z_init = torch.zeros_like(z_d) if sigma_start >= self.prior.config.schedule.sigma_max else z_d
            rep = lambda t: t.repeat_interleave(n, 0)  # noqa: E731  [B,...] -> [B*N,...], samples of a face adjacent
            ids = range(first_index, first_index + b) if face_ids is None else face_ids
            noise = torch.stack([torch.cat([face_noise((1, *z_d.shape[1:]), o.seed, k, i) for i in ids])
                                 for k in range(n)], 1)
            if start is not None:
                z_init = start(z_init)
            denoise = self.denoiser(rep(z_d), None if e_id is None else rep(e_id), scale)
            z = self.refine(rep(z_init), denoise, sigma_start, o, noise.flatten(0, 1))
            restored = self.decode(z).clamp(-1, 1).view(b, n, 3, s, s)
            calls = nfe(o.sampler, o.steps) if sigma_start > 0 else 0
        restored = restored.float().clamp(-1, 1)
        flat = restored.reshape(b * n, 3, s, s)
        e_in = self.embed(x_d)
        if o.mode == "irn":  # the output is x_id: embed it once
            e_irn = self.embed(x_id)
            e_out = e_irn[:, None].expand(b, n, -1)
        else:
            e_out = self.embed(flat).view(b, n, -1)
            e_irn = e_in if e_irn is None else e_irn  # full mode embedded x_id already (the guidance target)
        return {
            "restored": restored,
            "x_id": x_id.float(),
            "id_vs_irn": (e_out * e_irn[:, None]).sum(-1),
            "id_vs_input": (e_out * e_in[:, None]).sum(-1),
            "sigma_start": sigma_start,
            "guidance_scale": scale if o.mode == "full" else 0.0,
            "nfe": calls,
            "latent": None if z is None else z.view(b, n, *z.shape[1:]),
        }

    def restore_crops(self, crops: np.ndarray, options: RestoreOptions) -> dict[str, Any]:
        """uint8 [F,S,S,3] aligned faces -> restore_faces' dict, in chunks of ``options.batch_size`` faces."""
        parts = [self.restore_faces(_from_u8(crops[i:i + options.batch_size]), options, first_index=i)
                 for i in range(0, len(crops), options.batch_size)]
        out = {k: torch.cat([p[k].cpu() for p in parts]) for k in ("restored", "x_id", "id_vs_irn", "id_vs_input")}
        out.update({k: parts[0][k] for k in ("sigma_start", "guidance_scale", "nfe")})
        return out

    def restore(self, image: str | Path | np.ndarray | Image.Image, *, aligned: bool = False, **options: Any
                ) -> RestoreResult:
        """The Python API: restores a photo given as a path, a PIL image or a uint8 [H,W,3] array.

        ``options`` are RestoreOptions fields (fidelity, steps, sampler, seed, samples, mode, upscale, ...); those
        not given take the model's measured-best defaults. The result holds the whole restored photo
        (``.image``), and per face its input crop, restored crops, box and identity cosines (``.faces``).
        """
        if isinstance(image, (str, Path)):
            from clrface.data.io import load_image

            photo = load_image(image)
        elif isinstance(image, Image.Image):
            from PIL import ImageOps

            from clrface.data.io import to_rgb_uint8

            photo = to_rgb_uint8(ImageOps.exif_transpose(image))
        else:
            photo = np.asarray(image)
        return self.restore_image(photo, self.options(**options), aligned=aligned)

    def restore_image(self, photo: np.ndarray, options: RestoreOptions | None = None, *, aligned: bool = False
                      ) -> RestoreResult:
        """Restores every face of ``photo`` uint8 [H,W,3] and pastes them back (bicubic) at ``upscale`` x the size.

        aligned=False: faces are detected and FFHQ-aligned at S px; the photo is resized by ``upscale`` (PIL
        Lanczos) and each restored face is pasted into it through its alignment affine, so faces are rendered at
        the output resolution. Pixels outside the faces' paste masks are the (resized) photo's exactly. No face:
        the (resized) photo is returned with ``no_face=True`` and a warning.
        aligned=True: ``photo`` is one aligned face crop of any size; it is resized to S x S, restored and
        resized back to (W*u, H*u).
        """
        o = options or RestoreOptions()
        img = np.asarray(photo)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ClrfaceError(f"restore_image needs uint8 [H, W, 3], got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        s, u = self.resolution, o.upscale
        keep = o.color == "keep" or (o.color == "auto" and is_monochrome(img))
        if aligned:
            crop = _resize(img, s, s)
            out = self.restore_crops(crop[None], o)
            crops_out = list(_u8(out["restored"][0]))
            if keep:
                crops_out = [keep_tone(c, crop) for c in crops_out]
            images = [_resize(c, w * u, h * u) for c in crops_out]
            affine = np.array([[s / w, 0, 0.5 * s / w - 0.5], [0, s / h, 0.5 * s / h - 0.5]])
            face = FaceResult(crop, crops_out, np.array([0.0, 0.0, w, h]), affine,
                              out["id_vs_irn"][0].tolist(), out["id_vs_input"][0].tolist())
            return RestoreResult(images, [face], sampling=_sampling(out))
        from clrface.faces.align import align_faces
        from clrface.faces.paste import paste_face

        # bicubic warp + bicubic paste: the round trip keeps > 47 dB on every real_lq photo (docs/RESULTS.md)
        found = align_faces(img, s, max_faces=o.max_faces, resample="bicubic")
        base = self.background(img, u)
        if not found:
            return RestoreResult([base.copy() for _ in range(o.samples)], [], no_face=True,
                                 warnings=["no face found; returned unchanged"])
        crops = np.stack([c for c, _ in found])
        out = self.restore_crops(crops, o)
        restored = [_u8(out["restored"][i]) for i in range(len(found))]  # per face: [N,S,S,3]
        if keep:  # the aligned input crop is the photo under the face: its chroma is the photo's tone there
            restored = [np.stack([keep_tone(c, crops[i]) for c in r]) for i, r in enumerate(restored)]
        faces = [FaceResult(crops[i], list(restored[i]), info.box, info.affine, out["id_vs_irn"][i].tolist(),
                            out["id_vs_input"][i].tolist()) for i, (_, info) in enumerate(found)]
        images = []
        for k in range(o.samples):
            res = base.copy()
            for f in reversed(faces):  # largest face last: it wins where pastes overlap
                paste_face(res, f.crops_out[k], f.affine, affine_size=s, scale=u, interpolation="bicubic", out=res)
            images.append(res)
        return RestoreResult(images, faces, sampling=_sampling(out))


def _sampling(out: dict[str, Any]) -> dict[str, float]:
    return {"sigma_start": round(float(out["sigma_start"]), 6), "guidance_scale": round(float(out["guidance_scale"]), 6),
            "nfe": int(out["nfe"])}


def _check_compatible(vqgan: VQGAN, prior: LatentPrior, mask: LatentMask | None, where: str) -> None:
    vc, uc = vqgan.config, prior.config.unet
    lat = vc.resolution // vc.downsample
    if uc.latent_channels != vc.latent_channels or uc.cond_channels != vc.latent_channels or uc.resolution != lat:
        raise CheckpointError(
            f"{where}: prior (latent {uc.latent_channels} ch, cond {uc.cond_channels} ch, {uc.resolution} px) does not "
            f"fit the VQGAN (latent {vc.latent_channels} ch, {lat} px)")
    if mask is not None and mask.config.latent_channels != vc.latent_channels:
        raise CheckpointError(f"{where}: mask expects {mask.config.latent_channels} latent channels, "
                              f"VQGAN has {vc.latent_channels}")


# ---------------------------------------------------------------------------------------------- files


def _names(inputs: list[Path]) -> list[str]:
    dup = Counter(p.stem for p in inputs)
    return [p.stem if dup[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in inputs]


def _side_by_side(*imgs: np.ndarray) -> np.ndarray:
    h = max(i.shape[0] for i in imgs)
    return np.concatenate([_resize(i, round(i.shape[1] * h / i.shape[0]), h) for i in imgs], axis=1)


DONE_DIR = ".clrface-done"
"""Per-input completion records under the output folder: a rerun with the same model and options skips inputs
whose record exists (resumable after a kill); records are written only after all of an input's files."""


def _run_key(restorer: Restorer, options: RestoreOptions, aligned: bool) -> str:
    """What must match for an earlier result to be reused: model folder, options, aligned."""
    spec = {"model": restorer.source, "options": asdict(options), "aligned": aligned,
            "dtype": str(restorer.dtype), "background": getattr(restorer.background, "__name__",
                                                                type(restorer.background).__name__)}
    return json.dumps(spec, sort_keys=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _restore_one(path: Path, name: str, out: Path, restorer: Restorer, options: RestoreOptions, aligned: bool,
                 inputs: list[Path], emit: Callable[[str], None], stabilize: bool = True) -> dict[str, Any]:
    from clrface.data.io import load_image, save_image
    from clrface.video import is_video, restore_video

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
    res = restorer.restore_image(photo, options, aligned=aligned)
    sfx = (lambda j: f"_s{j}") if options.samples > 1 else (lambda j: "")
    rec: dict[str, Any] = {"input": str(path), "size": [int(photo.shape[1]), int(photo.shape[0])],
                           "no_face": res.no_face, "sampling": res.sampling, "faces": [], "final": []}
    for j, im in enumerate(res.images):
        rec["final"].append(str(save_image(out / "final" / f"{name}{sfx(j)}.png", im, inputs=inputs)))
    for k, f in enumerate(res.faces):
        fr: dict[str, Any] = {"index": k, "box": [round(float(v), 2) for v in f.box],
                              "id_vs_irn": [round(v, 4) for v in f.id_vs_irn],
                              "id_vs_input": [round(v, 4) for v in f.id_vs_input]}
        save_image(out / "cropped_faces" / f"{name}_{k}.png", f.crop_in, inputs=inputs)
        for j, c in enumerate(f.crops_out):
            save_image(out / "restored_faces" / f"{name}_{k}{sfx(j)}.png", c, inputs=inputs)
            save_image(out / "cmp" / f"{name}_{k}{sfx(j)}.png", _side_by_side(f.crop_in, c), inputs=inputs)
        rec["faces"].append(fr)
    for wmsg in res.warnings:
        rec.setdefault("warnings", []).append(wmsg)
        emit(f"clrface: warning: {path}: {wmsg}")
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def restore_files(inputs: list[Path], out_dir: str | Path, restorer: Restorer, options: RestoreOptions, *,
                  aligned: bool = False, log: Callable[[str], None] | None = None, progress: bool = True,
                  rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                  overwrite: bool = False, stabilize: bool = True) -> dict[str, Any]:
    """Restores each input photo into ``out_dir``: cropped_faces/, restored_faces/, cmp/, final/, report.json.

    Videos (``clrface.video.VIDEO_EXTENSIONS``) go to ``final/<name>.mp4`` with their audio, every face of every
    frame restored; ``stabilize`` turns their temporal stabilisation on (see clrface.video).

    Files: ``<name>_<k>.png`` per face k (``_s<j>`` appended per sample when samples > 1), ``final/<name>.png``.
    Unreadable inputs are reported through ``log`` and recorded under ``failures``; photos without a face go to
    final/ unchanged (resized by upscale) with a warning. Never writes over an input.

    Distributed: process ``rank`` of ``world`` restores inputs rank, rank+world, ... (names are fixed on the
    whole list, so every output has one writer); ``barrier`` waits for all processes, then rank 0 merges the
    completion records of all inputs into report.json. Inputs finished by an earlier run with the same model and
    options are skipped (``skipped`` in the report) unless ``overwrite``. Returns the report (rank 0: all
    inputs; other ranks: their own).
    """
    from tqdm import tqdm

    from clrface.data.io import ensure_not_input

    out = Path(out_dir)
    inputs = [Path(p) for p in inputs]
    emit = log or (lambda line: tqdm.write(line, file=sys.stderr))
    key = _run_key(restorer, options, aligned) + ("" if stabilize else " no-stabilize")
    done = out / DONE_DIR
    done.mkdir(parents=True, exist_ok=True)
    named = list(zip(inputs, _names(inputs)))

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
            rec = _restore_one(path, name, out, restorer, options, aligned, inputs, emit, stabilize)
            _write_atomic(done / f"{name}.done.json", json.dumps({"key": key, "record": rec}))
        except (ClrfaceError, MemoryError) as e:
            msg = str(e) if isinstance(e, ClrfaceError) else f"{path}: out of memory"
            failures.append({"input": str(path), "error": msg})
            emit(f"clrface: error: {msg}")
    skipped = len(mine) - len(todo)
    _write_atomic(done / f"_process{rank}.json", json.dumps({"failures": failures, "skipped": skipped}))
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


# ----------------------------------------------------------------------------------------------- demo

DEMO_SEED = 1  # a mid-range draw of the preset: x10.7 down, blur sigma 9.5, noise 16.6, JPEG q55
DEMO_PRESET = "bfr"


def demo_image() -> np.ndarray:
    """The public-domain NASA portrait of astronaut Eileen Collins (``skimage.data.astronaut()``), uint8 [512,512,3]."""
    try:
        from skimage import data
    except ImportError:
        raise ClrfaceError("the demo needs scikit-image (pip install scikit-image) for its public-domain portrait") from None
    return np.ascontiguousarray(data.astronaut()[..., :3])


def run_demo(out_dir: str | Path, restorer: Restorer, options: RestoreOptions, *,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The paper's synthetic setting on a public-domain face: the astronaut's face is FFHQ-aligned at 512 px
    (the reference size of the bfr ranges), degraded with the bfr preset at a fixed seed, and restored as an
    aligned crop. Writes ``original.png``, ``degraded.png``, ``demo_cmp.png`` (degraded | restored | original)
    and the restore outputs (see restore_files) into ``out_dir``; returns the report."""
    from clrface.data.degradation import REFERENCE_SIZE, degrade, get_preset
    from clrface.data.io import save_image
    from clrface.faces.align import align_faces

    out = Path(out_dir)
    found = align_faces(demo_image(), REFERENCE_SIZE, max_faces=1)
    if not found:
        raise ClrfaceError("demo: no face found in the astronaut portrait (dlib detector models missing?)")
    original = found[0][0]
    degraded, params = degrade(original, get_preset(DEMO_PRESET, REFERENCE_SIZE), DEMO_SEED)
    save_image(out / "original.png", original)
    src = save_image(out / "degraded.png", degraded)
    report = restore_files([src], out, restorer, options, aligned=True, log=log, progress=False)
    if report["failures"]:
        raise ClrfaceError(report["failures"][0]["error"])
    restored = np.asarray(Image.open(report["images"][0]["final"][0]).convert("RGB"))
    h, w = restored.shape[:2]
    save_image(out / "demo_cmp.png", _side_by_side(_resize(degraded, w, h), restored, _resize(original, w, h)))
    report["degradation"] = {"preset": DEMO_PRESET, "seed": DEMO_SEED, "params": params.to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
