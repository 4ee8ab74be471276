"""The Restorer: aligned degraded faces -> restored faces (paper Sec. 3, Fig. 2).

Data flow (one call per arrow; faces travel as one batch)::

    x_d  -> vqgan.encode -> normalize ----------------> z_d   condition of the prior, never noised
    x_d  -> irn -> x_id -> vqgan.encode -> normalize -> z_id  start latent (x_init)
    x_id -> facerec.embed ----------------------------> e_id  identity-guidance target
    z    = sampler(identity_guided(prior(., cond=z_d)), z_id + sigma_start * eps, sigmas from sigma_start)
    z    -> denormalize -> vqgan.decode (G(Q(z))) -> face

``sigma_start`` and the guidance scale come from the ``fidelity`` knob (see :mod:`clrface.options`). Whole
photos (detect, align, paste) are :mod:`clrface.photo`'s job; ``Restorer.restore`` is the entry point for them.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn

from clrface.background import Upscaler, lanczos_upscale
from clrface.data.io import array_to_rgb_uint8, load_image, to_model_range, to_rgb_uint8
from clrface.device import DTYPES, autocast, native_bf16, resolve_device, resolve_dtype
from clrface.diffusion.prior import LatentPrior
from clrface.diffusion.sampler import SAMPLERS, Denoise, nfe, sample
from clrface.diffusion.schedule import sigmas_from
from clrface.errors import ClrfaceError
from clrface.faces.detail import lower_band_from, upper_band_from
from clrface.identity.facerec import load_facerec
from clrface.identity.guidance import LatentMask, identity_guided
from clrface.model_folder import apply_irn, check_compatible, decode_latent, encode_latent, load_model_folder
from clrface.options import (
    DIFFUSION_MODES,
    FidelityMap,
    RestoreOptions,
    face_seed,
    mode_for_reference,
    unused_options,
)
from clrface.photo import RestoreResult, restore_photo
from clrface.reference import Reference, ReferencePolicy, load_reference
from clrface.vqgan.model import VQGAN


def face_noise(shape: tuple[int, ...], seed: int, sample_k: int, first_index: int = 0) -> Tensor:
    """Start noise [B,...] for faces first_index.. first_index+B-1, sample k: fp32 on CPU, one generator per face."""
    rows = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(face_seed(seed, sample_k, first_index + i)))
            for i in range(shape[0])]
    return torch.stack(rows)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity over the last dim, in fp32 and clamped to [-1, 1]: the embeddings may come out of a
    bf16 autocast, whose rounding lets a plain dot product of 'unit' vectors exceed 1."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)


@dataclass(frozen=True)
class Sampling:
    """What the sampler actually used: start noise level, guidance scale, denoiser calls per face and sample."""

    sigma_start: float
    guidance_scale: float
    nfe: int
    reference_guidance: float | None = None  # the scale of faces guided by a reference; None: no reference
    irn_detail: float = 0.0  # the share of the finest octaves taken from the IRN output (RestoreOptions.irn_detail)
    irn_detail_octaves: int = 1
    irn_tone: int = 0  # the size in px below which the tone comes from the IRN output (RestoreOptions.irn_tone)

    def as_dict(self) -> dict[str, float]:
        """The JSON form of reports: floats rounded to 6 digits."""
        d = {"sigma_start": round(float(self.sigma_start), 6),
             "guidance_scale": round(float(self.guidance_scale), 6), "nfe": int(self.nfe)}
        if self.reference_guidance is not None:
            d["reference_guidance"] = round(float(self.reference_guidance), 6)
        if self.irn_detail:
            d["irn_detail"] = round(float(self.irn_detail), 6)
            d["irn_detail_octaves"] = int(self.irn_detail_octaves)
        if self.irn_tone:
            d["irn_tone"] = int(self.irn_tone)
        return d


@dataclass
class RestoredFaces:
    """The result of :meth:`Restorer.restore_faces` for B faces and N = options.samples samples each.

    restored: [B,N,3,S,S] fp32 in [-1,1]; x_id: [B,3,S,S] the IRN output (x_d when there is none or the mode
    is not full/irn); id_vs_irn, id_vs_input: [B,N] cosines of the restored faces' identity embeddings with
    those of x_id and x_d; id_vs_reference: [B,N] cosine with the reference identity that guided the face (NaN
    for faces without one; None when no reference was given); latent: [B,N,d,h,w] the sampled latent (None in
    modes irn/direct)."""

    restored: Tensor
    x_id: Tensor
    id_vs_irn: Tensor
    id_vs_input: Tensor
    sampling: Sampling
    latent: Tensor | None = None
    id_vs_reference: Tensor | None = None

    @property
    def id_vs_target(self) -> Tensor:
        """[B,N] cosine with each face's guidance target: its reference where it had one, else the IRN output."""
        if self.id_vs_reference is None:
            return self.id_vs_irn
        return torch.where(self.id_vs_reference.isnan(), self.id_vs_irn, self.id_vs_reference)

    @classmethod
    def concat(cls, parts: Sequence[RestoredFaces]) -> RestoredFaces:
        """The chunks of one batch joined on the CPU (the sampling settings are the same for every chunk)."""

        def cat(key: str) -> Tensor | None:
            ts = [getattr(p, key) for p in parts]
            return None if any(t is None for t in ts) else torch.cat([t.cpu() for t in ts])

        return cls(*(cat(k) for k in ("restored", "x_id", "id_vs_irn", "id_vs_input")), sampling=parts[0].sampling,
                   latent=cat("latent"), id_vs_reference=cat("id_vs_reference"))


def interruptible(denoise: Denoise, interrupt: Callable[[], None]) -> Denoise:
    """``denoise`` that calls ``interrupt`` first, so a long sampling run can be stopped between evaluations."""

    def wrapped(x: Tensor, sigma: Tensor) -> Tensor:
        interrupt()
        return denoise(x, sigma)

    return wrapped


class Restorer:
    """Blind face restorer: VQGAN (E, Q, G), conditional latent prior, optional IRN, optional latent mask, face
    recogniser, all with fp32 weights on one device. ``dtype`` is the compute precision: below fp32 the nets run
    under ``torch.autocast`` (as in training), while latents, sampler updates and sigma math stay fp32."""

    def __init__(self, vqgan: VQGAN, prior: LatentPrior, irn: nn.Module | None = None, mask: LatentMask | None = None,
                 facerec: nn.Module | None = None, *, fidelity_map: FidelityMap = FidelityMap(),
                 source: str | None = None, dtype: torch.dtype | None = None, defaults: dict[str, Any] | None = None,
                 background: Upscaler = lanczos_upscale, input_detail_limit: tuple[int, float] | None = None):
        self.vqgan, self.prior, self.irn, self.mask = vqgan, prior, irn, mask
        self.input_detail_limit = input_detail_limit  # see ModelFolder
        self.background = background  # enlarges the whole photo by options.upscale before faces are pasted
        self.fidelity_map = fidelity_map
        # The model's measured-best RestoreOptions (restore.json "defaults"); explicit options override them.
        self.defaults: dict[str, Any] = dict(defaults or {})
        self.source = source
        p = next(vqgan.parameters())
        self.device, self.dtype = p.device, dtype or p.dtype
        self.facerec = load_facerec(self.device) if facerec is None else facerec
        check_compatible(vqgan, prior, mask, source or "model")

    @property
    def resolution(self) -> int:
        """S: the face size the models work at."""
        return int(self.vqgan.config.resolution)

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, *, facerec: nn.Module | None = None,
                        background: Upscaler = lanczos_upscale) -> Restorer:
        """Loads a model folder, or the installed model ``clrface/weights/<name>`` for a name (None or "default":
        the shipped default); see :mod:`clrface.model_folder`. Weights load in fp32 on ``device``; ``dtype`` is the
        compute precision (autocast): a torch dtype or the CLI's ``--dtype`` names ("auto": bfloat16 on a CPU
        with native bf16, else float32). A missing or incomplete folder or a checkpoint of the wrong kind/shape
        raises CheckpointError."""
        device = resolve_device(device)
        if isinstance(dtype, str) and (dtype == "auto" or dtype in DTYPES):
            dtype = DTYPES[resolve_dtype(dtype, device)]
        if dtype not in DTYPES.values():
            raise ClrfaceError(f"dtype must be 'auto', one of {', '.join(DTYPES)} or the torch dtype of one, "
                               f"got {dtype!r}")
        if dtype == torch.float16 and device.type == "cpu":
            # docs/RESULTS.md, "CPU without native bf16": one aligned face 1.21 s against 0.155 s in float32
            warnings.warn("float16 on a CPU is emulated: about 8x slower than float32 (dtype auto picks the "
                          "fastest)", UserWarning, stacklevel=2)
        if dtype == torch.bfloat16 and device.type == "cpu" and not native_bf16(device):
            warnings.warn("this CPU has no native bfloat16 (AMX / AVX512-BF16): emulated, about 8-10x slower than "
                          "float32 for one face and far slower in batches (dtype auto picks the fastest)",
                          UserWarning, stacklevel=2)
        m = load_model_folder(path_or_name, device)
        return cls(m.vqgan, m.prior, m.irn, m.mask, facerec, fidelity_map=m.fidelity_map, source=str(m.folder),
                   dtype=dtype, defaults=m.defaults, background=background, input_detail_limit=m.input_detail_limit)

    def options(self, **overrides: Any) -> RestoreOptions:
        """RestoreOptions: the model's defaults (restore.json), then ``overrides`` that are not None, checked
        against this model (RestoreOptions.for_model)."""
        return RestoreOptions.for_model(self.defaults, self.resolution, **overrides)

    # ------------------------------------------------------------------------------------------ steps

    def encode(self, x: Tensor) -> Tensor:
        """x [B,3,S,S] in [-1,1] -> normalised latent (E(x) - mean) / std [B,d,S/f,S/f] fp32."""
        return encode_latent(self.vqgan, self.prior, x.to(self.device))

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent -> G(Q(denormalize(z))) [B,3,S,S] (Q straight-through, so differentiable in z)."""
        return decode_latent(self.vqgan, self.prior, z)

    def run_irn(self, x_d: Tensor) -> Tensor:
        """f_IRN(x_d) clamped to [-1,1] [B,3,S,S] (an image: it is encoded, embedded and may be the output);
        without an IRN the input itself (the start then is z_d)."""
        return apply_irn(self.irn, x_d if self.irn is None else x_d.to(self.device))

    def embed(self, x: Tensor) -> Tensor:
        """Normalised identity embedding [B,D] of aligned faces [B,3,S,S] (differentiable)."""
        return self.facerec.embed(x.float()).float()

    def denoiser(self, z_d: Tensor, e_id: Tensor | None, scale: float | Tensor) -> Denoise:
        """D(.; sigma, z_d), wrapped by masked identity guidance toward e_id when scale > 0 (Sec. 3.3); scale is
        one number or one per face [B]."""
        denoise: Denoise = functools.partial(self.prior, cond=z_d)
        if bool(torch.as_tensor(scale).any()) and e_id is not None:
            mask = None if self.mask is None else (lambda x, s: self.mask(x, s).float())
            denoise = identity_guided(denoise, mask, self.decode, self.embed, e_id, scale)
        return denoise

    def refine(self, z_init: Tensor, denoise: Denoise, sigma_start: float, options: RestoreOptions,
               noise: Tensor) -> Tensor:
        """Reverse ODE (paper Eq. 10) from z_init + sigma_start * noise to sigma 0 -> latent [B,d,h,w] fp32."""
        sigmas = sigmas_from(self.prior.config.schedule, sigma_start, options.steps)
        z = sample(SAMPLERS[options.sampler], denoise, z_init.float(), sigmas,
                   noise=noise.to(self.device, torch.float32))
        return z.float()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The compute-precision context: autocast to ``dtype`` below fp32, else nothing."""
        return autocast(self.device, self.dtype)

    # ---------------------------------------------------------------------------------------- restoring

    @torch.no_grad()  # guided sampling needs autograd islands, so no inference_mode
    def restore_faces(self, x_d: Tensor, options: RestoreOptions | None = None, *, first_index: int = 0,
                      face_ids: Sequence[int] | None = None, start: Callable[[Tensor], Tensor] | None = None,
                      interrupt: Callable[[], None] | None = None, reference: Tensor | None = None
                      ) -> RestoredFaces:
        """Restores aligned faces x_d [B,3,S,S] in [-1,1] (see :class:`RestoredFaces`).

        ``first_index`` numbers the faces for the per-face noise seeds (see RestoreOptions); ``face_ids`` [B]
        numbers them explicitly instead (video: a face track keeps its noise). ``start`` maps the start latent
        z_init [B,d,h,w] to the one the sampler starts from (video: blends in the previous frame's latent);
        diffusion modes only. ``interrupt`` is called before every denoiser evaluation; an exception it raises
        stops the work (the server: a client that has gone). ``reference`` [B,D]: per face a unit identity
        embedding that replaces the IRN output's as the guidance target (mode full; :mod:`clrface.reference`),
        or a zero row for a face that keeps its own.
        """
        o = options or self.options()
        s = self.resolution
        if not isinstance(x_d, Tensor) or not x_d.is_floating_point():
            raise ClrfaceError(f"restore_faces needs a float tensor of faces [B,3,{s},{s}] in [-1, 1], got "
                               f"{getattr(x_d, 'dtype', type(x_d).__name__)} (uint8 crops: restore_crops)")
        if x_d.ndim != 4 or x_d.shape[0] < 1 or x_d.shape[1] != 3 or tuple(x_d.shape[2:]) != (s, s):
            raise ClrfaceError(f"restore_faces needs faces [B,3,{s},{s}], B >= 1, got {tuple(x_d.shape)}")
        x_d = x_d.to(self.device, torch.float32)
        b, n = x_d.shape[0], o.samples
        if reference is not None:
            mode_for_reference(o.mode)
            if reference.ndim != 2 or reference.shape[0] != b:
                raise ClrfaceError(f"reference needs one embedding row per face [{b}, D], got {tuple(reference.shape)}")
            reference = reference.to(self.device, torch.float32)
        with self.autocast():
            z = e_irn = None
            if o.mode in DIFFUSION_MODES:
                ids = range(first_index, first_index + b) if face_ids is None else face_ids
                restored, x_id, e_irn, z, sampling = self._sample(x_d, o, ids, start, interrupt, reference)
            elif o.mode == "direct":
                restored, x_id = self.vqgan.decode(self.vqgan.encode(x_d)).float(), x_d
                sampling = Sampling(0.0, 0.0, 0)
            else:  # irn
                if self.irn is None:
                    raise ClrfaceError(f"mode 'irn' needs an irn/ checkpoint in the model folder ({self.source})")
                restored = x_id = self.run_irn(x_d)
                sampling = Sampling(0.0, 0.0, 0)
            if restored.ndim == 4:
                restored = restored[:, None].expand(b, n, 3, s, s)
            restored = restored.float().clamp(-1, 1)
            e_in = self.embed(x_d)
            if o.mode == "irn":  # the output is x_id: embed it once
                e_irn = self.embed(x_id)
                e_out = e_irn[:, None].expand(b, n, -1)
            else:
                e_out = self.embed(restored.reshape(b * n, 3, s, s)).view(b, n, -1)
                e_irn = e_in if e_irn is None else e_irn  # full mode embedded x_id already (the guidance target)
        id_ref = None
        if reference is not None:
            has = reference.norm(dim=1) > 0
            id_ref = torch.where(has[:, None], cosine(e_out, reference[:, None]), torch.nan)
        return RestoredFaces(restored, x_id.float(), cosine(e_out, e_irn[:, None]), cosine(e_out, e_in[:, None]),
                             sampling, None if z is None else z.view(b, n, *z.shape[1:]), id_ref)

    def _sample(self, x_d: Tensor, o: RestoreOptions, ids: Sequence[int], start: Callable[[Tensor], Tensor] | None,
                interrupt: Callable[[], None] | None = None, reference: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Sampling]:
        """Modes full and prior: (restored [B,N,3,S,S], x_id, e_id or None, sampled latent [B*N,...], Sampling)."""
        s, b, n = self.resolution, x_d.shape[0], o.samples
        o.check_for(s)
        sigma_start, scale = o.resolve(self.fidelity_map)
        z_d = self.encode(x_d)
        x_id = x_d
        if o.mode == "full":
            x_id = self.run_irn(x_d)
            z_init = self.encode(x_id) if self.irn is not None else z_d
            e_id = self.embed(x_id)
        else:  # prior alone: no IRN, no guidance; at the top of the schedule it is plain sampling from noise
            scale, e_id = 0.0, None
            z_init = torch.zeros_like(z_d) if sigma_start >= self.prior.config.schedule.sigma_max else z_d
        noise = torch.stack([torch.cat([face_noise((1, *z_d.shape[1:]), o.seed, k, i) for i in ids])
                             for k in range(n)], 1)
        if start is not None:
            z_init = start(z_init)

        def rep(t: Tensor) -> Tensor:  # [B,...] -> [B*N,...], the samples of a face adjacent
            return t.repeat_interleave(n, 0)

        target, face_scale, ref_scale = e_id, scale, None
        if reference is not None:  # the reference's identity (and scale) where a face has one, its IRN's elsewhere
            has = reference.norm(dim=1) > 0
            target = torch.where(has[:, None], reference, e_id)
            ref_scale = o.reference_guidance
            face_scale = rep(torch.where(has, ref_scale, scale).float())
        denoise = self.denoiser(rep(z_d), None if target is None else rep(target), face_scale)
        if interrupt is not None:
            denoise = interruptible(denoise, interrupt)
        z = self.refine(rep(z_init), denoise, sigma_start, o, noise.flatten(0, 1))
        restored = self.decode(z).float()
        with_irn = o.mode == "full" and self.irn is not None
        detail, tone = (o.irn_detail, o.irn_tone) if with_irn else (0.0, 0)
        if tone or detail > 0:
            irn_out = rep(x_id.float())
            if tone:
                restored = lower_band_from(restored, irn_out, tone)
            if detail > 0:
                # A face guided by a reference keeps its decoded detail: the IRN's finest octave carries the
                # identity read from the degraded photo and dilutes the reference's (docs/reference.md).
                weight = detail if reference is None else rep(torch.where(has, 0.0, detail)).view(-1, 1, 1, 1)
                restored = upper_band_from(restored, irn_out, weight, o.irn_detail_octaves)
        restored = restored.clamp(-1, 1).view(b, n, 3, s, s)
        sampling = Sampling(sigma_start, scale, nfe(o.sampler, o.steps) if sigma_start > 0 else 0, ref_scale, detail,
                            o.irn_detail_octaves, tone)
        return restored, x_id, e_id, z, sampling

    def restore_crops(self, crops: np.ndarray, options: RestoreOptions | None = None,
                      reference: Tensor | None = None, *, interrupt: Callable[[], None] | None = None
                      ) -> RestoredFaces:
        """uint8 [F,S,S,3] aligned faces -> restore_faces' result, in chunks of ``options.batch_size`` faces
        (``options`` None: the model's defaults); ``reference``: [F,D] rows as in restore_faces; ``interrupt`` is
        called before each chunk and each denoiser evaluation (see restore_faces)."""
        s = self.resolution
        crops = np.asarray(crops)
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (s, s, 3) or not len(crops):
            raise ClrfaceError(f"restore_crops needs uint8 crops [F,{s},{s},3], F >= 1, got {crops.dtype} "
                               f"{crops.shape}" + (" (one crop: crops[None])" if crops.shape == (s, s, 3) else ""))
        options = options or self.options()
        bs, parts = options.batch_size, []
        for i in range(0, len(crops), bs):
            if interrupt is not None:
                interrupt()
            parts.append(self.restore_faces(to_model_range(crops[i:i + bs]), options, first_index=i,
                                            interrupt=interrupt,
                                            reference=None if reference is None else reference[i:i + bs]))
        return RestoredFaces.concat(parts)

    def restore(self, image: str | Path | np.ndarray | Image.Image, *, aligned: bool = False,
                reference: Reference | Sequence[str | Path | np.ndarray] | None = None, reference_all: bool = False,
                force_reference: bool = False, keep_detail: bool = True, **options: Any) -> RestoreResult:
        """The Python API: restores a photo given as a path, a PIL image or an array (uint8 or uint16; grey, RGB or
        RGBA, as :func:`clrface.data.io.array_to_rgb_uint8` reads it).

        ``options`` are RestoreOptions fields (fidelity, steps, sampler, seed, samples, mode, upscale, ...); those
        not given take the model's measured-best defaults. The result holds the whole restored photo
        (``.image``), and per face its input crop, restored crops, box and identity cosines (``.faces``).
        ``reference``: clean photos of the person (paths, folders, arrays; aligned crops when ``aligned``) or a
        :class:`clrface.reference.Reference`; the face that matches it is guided toward its identity (every face
        with ``reference_all``; also a face that disagrees with it with ``force_reference``). A reference runs
        mode full (another ``mode`` raises ClrfaceError before anything is read). ``keep_detail``: as ``clrface
        restore --keep-detail`` (default on). The switches take True or False only.
        """
        flags = {"aligned": aligned, "reference_all": reference_all, "force_reference": force_reference,
                 "keep_detail": keep_detail}
        for name, value in flags.items():  # "no" or "false" would read as true
            if not isinstance(value, (bool, np.bool_)):
                raise ClrfaceError(f"{name} must be True or False, got {value!r}")
        if reference is not None:
            options["mode"] = mode_for_reference(options.get("mode"))
        o = self.options(**options)  # a bad option fails before the photo and the references are read
        unused = unused_options(o.mode, [k for k, v in options.items() if v is not None])
        if unused:  # the default model's mode irn: fidelity, steps and seed would change nothing, silently
            warnings.warn(unused, UserWarning, stacklevel=2)
        if isinstance(image, (str, Path)):
            photo = load_image(image)
        elif isinstance(image, Image.Image):
            photo = to_rgb_uint8(ImageOps.exif_transpose(image))
        else:
            photo = array_to_rgb_uint8(np.asarray(image))
        if reference is not None and not isinstance(reference, Reference):
            reference = load_reference(self, [reference] if isinstance(reference, (str, Path, np.ndarray))
                                       else reference, aligned=aligned)
        return restore_photo(self, photo, o, aligned=bool(aligned), keep_detail=bool(keep_detail),
                             reference=reference,
                             reference_policy=ReferencePolicy(all_faces=bool(reference_all),
                                                              force=bool(force_reference)))

    def restore_image(self, photo: np.ndarray, options: RestoreOptions | None = None, *, aligned: bool = False
                      ) -> RestoreResult:
        """Every face of ``photo`` uint8 [H,W,3] restored and pasted back: :func:`clrface.photo.restore_photo`."""
        return restore_photo(self, photo, options or self.options(), aligned=aligned)
