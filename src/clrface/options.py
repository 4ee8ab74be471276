"""How to restore: the option types and the names of their choices, importable without torch.

One knob, ``fidelity`` in [0, 1], trades the prior's realism against faithfulness to the input/IRN output:

    sigma_start(f)    = sigma_lo_fid^(1 - f) * sigma_hi_fid^f          (geometric; default 4.0 -> 0.05)
    guidance_scale(f) = guid_lo_fid + f * (guid_hi_fid - guid_lo_fid)  (linear;    default 0.0 -> 10.0)

High fidelity starts the reverse ODE close to the IRN latent (little noise: the prior only polishes) and
pulls harder toward the IRN identity; low fidelity drowns more of the IRN latent in noise so that the prior
(conditioned on z_d) regenerates more of the face, with little identity guidance. The end points live in
:class:`FidelityMap`; a model folder may override them with ``restore.json`` (``{"fidelity_map": {...}}``)
once they are calibrated for its weights. ``RestoreOptions.sigma_start`` / ``guidance_scale`` override the
knob explicitly.

The CLI, the web server and the ONNX runtime take their choices from here, so this module must not import
torch (the ONNX runtime runs without it).
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Callable, get_type_hints

import numpy as np

from clrface.errors import ClrfaceError

#: The stages a model folder holds, each a checkpoint folder of its own (vqgan/ and prior/ required; clrface pack).
PACK_STAGES = ("vqgan", "prior", "irn", "mask")
MODES = ("full", "prior", "irn", "direct")
"""full: IRN + prior + (masked) identity guidance; prior: the prior alone, started from z_d (from pure noise
when sigma_start >= the schedule's sigma_max), no IRN, no guidance; irn: the IRN output x_id alone;
direct: G(Q(E(x_d))), the VQGAN's reconstruction of the input."""
DIFFUSION_MODES = ("full", "prior")
"""The modes that run the sampler (and so use fidelity, steps, sampler and seed)."""

SAMPLER_NAMES = ("heun", "euler", "dpmpp_2m")
"""The ODE solvers of ``clrface.diffusion.sampler.SAMPLERS`` (a test keeps the two in step)."""
COLOR_MODES = ("auto", "keep", "full")
#: Formats of the whole photos in final/: PNG (lossless, transparency kept) or JPEG (quality 95, 4:4:4 chroma).
FINAL_EXTS = ("png", "jpg")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Compute precisions; ``--dtype`` also takes "auto" (see ``clrface.device.auto_dtype``)."""
MAX_UPSCALE = 8
#: Smallest --min-face: a narrower face holds too little to restore, and searching for it costs 4x the default's.
MIN_FACE_PX = 16


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
    """How to restore; the defaults here are the fallbacks of a model folder without restore.json, whose
    ``defaults`` come first (``RestoreOptions.for_model``).

    - mode: "full" (IRN + prior + masked identity guidance), "prior" (the prior alone from the degraded latent),
      "irn" (the IRN output alone, one pass), "direct" (the VQGAN reconstruction G(Q(E(x)))).
    - fidelity: 0..1, realism vs faithfulness; sets sigma_start and guidance_scale through the model's
      ``FidelityMap`` unless those are given. Modes full and prior only, like steps, sampler and seed.
    - steps: sampler steps from sigma_start down to 0 (a fresh Karras schedule, rho of the prior's schedule).
    - sampler: "heun", "euler" or "dpmpp_2m".
    - sigma_start, guidance_scale: the noise level the sampler starts from and the identity-guidance scale.
    - seed: face i, sample k draws its start noise from its own generator seeded by (seed, k, i), so results do
      not depend on batch_size or the device.
    - samples: independent results per face (ranked best first by identity).
    - batch_size: faces per forward pass (times ``samples``).
    - upscale: integer factor of the output photo/crop over the input.
    - max_faces: restore only the largest N faces of a photo (None: all).
    - min_face: smallest face searched for, as its box width in px (None: 32 in photos, 64 in video frames); the
      search costs ~(32 / min_face)^2 of the photo default, most of a large photo's time.
    - color: what the pasted face takes from the restored crop. "full": its colours (on a monochrome photo, on
      the face's skin only); "keep": its luminance only, with the chroma of the photo under it, so grayscale and
      sepia photos keep their tone; "auto": "keep" for monochrome photos (``clrface.photo.is_monochrome``), else
      "full". A colorization model sets "full" in its restore.json.
    - reference_guidance: guidance scale of faces whose target is a reference photo's identity (mode full): a
      clean photo is a target worth pulling harder toward than the IRN's own estimate (docs/reference.md).
    - irn_detail: mode full, the share of the restored face's upper octave (detail finer than a half-resolution
      image holds) taken from the IRN output instead of the VQGAN decoder, which keeps ~40 % of a face's
      Laplacian variance (``clrface.faces.detail.upper_band_from``). 0 is the paper's pipeline. A face guided by a
      reference photo keeps its decoded detail.
    - irn_detail_octaves: how many octaves irn_detail takes: 1 is the band above N/2 px, 2 also the one above
      N/4 px (which a 3x3 Laplacian still sees), 3 also above N/8 px.
    - irn_tone: mode full, the tone (what an irn_tone-px image of the face holds: colour and shading over large
      regions) taken from the IRN output (``clrface.faces.detail.lower_band_from``): the quantized latent drifts
      in colour, the IRN, trained with an L1 term, keeps the photo's. 0 is the paper's pipeline.
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
    min_face: int | None = None
    color: str = "auto"
    reference_guidance: float = 30.0
    irn_detail: float = 0.0
    irn_detail_octaves: int = 1
    irn_tone: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        if self.color not in COLOR_MODES:
            raise ClrfaceError(f"unknown color {self.color!r}; choose from {', '.join(COLOR_MODES)}")
        if not 0.0 <= self.fidelity <= 1.0:
            raise ClrfaceError(f"fidelity must be in [0, 1], got {self.fidelity}")
        if self.steps < 1:
            raise ClrfaceError(f"steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLER_NAMES:
            raise ClrfaceError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLER_NAMES)}")
        if self.mode not in MODES:
            raise ClrfaceError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        for name in ("fidelity", "sigma_start", "guidance_scale", "reference_guidance"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ClrfaceError(f"{name} must be a finite number, got {value}")
        if self.sigma_start is not None and self.sigma_start < 0:
            raise ClrfaceError(f"sigma_start must be >= 0, got {self.sigma_start}")
        for name in ("guidance_scale", "reference_guidance"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ClrfaceError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ClrfaceError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples > 1 and self.mode not in DIFFUSION_MODES:
            # irn and direct are deterministic: N samples would be N copies of one result
            raise ClrfaceError(f"samples {self.samples}: mode {self.mode} gives one result per face; several "
                               "samples need mode full or prior")
        if not 1 <= self.upscale <= MAX_UPSCALE:
            raise ClrfaceError(f"upscale (--bg-upscale) must be an integer in [1, {MAX_UPSCALE}], got {self.upscale}")
        if not 0.0 <= self.irn_detail <= 1.0:
            raise ClrfaceError(f"irn_detail must be in [0, 1], got {self.irn_detail}")
        if not 1 <= self.irn_detail_octaves <= 3:
            raise ClrfaceError(f"irn_detail_octaves must be 1, 2 or 3, got {self.irn_detail_octaves}")
        if self.irn_tone < 0:
            raise ClrfaceError(f"irn_tone must be an integer number of pixels >= 0, got {self.irn_tone}")
        if self.max_faces is not None and self.max_faces < 1:
            raise ClrfaceError(f"max_faces must be >= 1, got {self.max_faces}")
        if self.min_face is not None and self.min_face < MIN_FACE_PX:
            raise ClrfaceError(f"min_face must be an integer number of pixels >= {MIN_FACE_PX}, got {self.min_face}")

    def _check_types(self) -> None:
        """Integers and numbers as such (NumPy scalars converted; bool, strings and 2.5 steps refused), so that a
        wrong type is one ClrfaceError here rather than a TypeError deep in a restore."""
        for name, hint in get_type_hints(type(self)).items():
            value = getattr(self, name)
            if value is None and hint in (int | None, float | None):
                continue
            if hint in (int, int | None):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise ClrfaceError(f"{name} must be an integer, got {value!r}")
                setattr(self, name, int(value))
            elif hint in (float, float | None):
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise ClrfaceError(f"{name} must be a number, got {value!r}")
                setattr(self, name, float(value))
            elif hint is str and not isinstance(value, str):
                raise ClrfaceError(f"{name} must be a string, got {value!r}")

    @classmethod
    def for_model(cls, defaults: dict[str, Any], resolution: int, **overrides: Any) -> RestoreOptions:
        """A model's defaults (its restore.json), then ``overrides`` that are not None, checked against the model
        (:meth:`check_for`), so that a bad value fails before the first photo rather than once per photo."""
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ClrfaceError(f"unknown option(s) {', '.join(map(repr, unknown))}; known: "
                               f"{', '.join(f.name for f in fields(cls))}")
        return cls(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}}).check_for(resolution)

    def check_for(self, resolution: int) -> RestoreOptions:
        """Raises ClrfaceError where a model of ``resolution`` px cannot run these options; returns self."""
        if self.irn_tone >= resolution:
            raise ClrfaceError(f"irn_tone {self.irn_tone} px must be below the model's resolution {resolution} px")
        return self

    def resolve(self, fmap: FidelityMap) -> tuple[float, float]:
        """(sigma_start, guidance_scale): the explicit values, else the fidelity map's."""
        s = fmap.sigma_start(self.fidelity) if self.sigma_start is None else float(self.sigma_start)
        g = fmap.guidance_scale(self.fidelity) if self.guidance_scale is None else float(self.guidance_scale)
        return s, g


def mode_for_reference(mode: str | None) -> str:
    """The mode of a restore guided by reference photos: full, the one mode with identity guidance (``None``: not
    chosen); another mode is refused."""
    if mode not in (None, "full"):
        raise ClrfaceError(f"a reference guides the identity of mode full; mode {mode!r} has no guidance")
    return "full"


#: Options only the diffusion modes read, and those only mode full reads (guidance and the IRN's bands).
SAMPLING_OPTIONS = ("fidelity", "steps", "sampler", "sigma_start", "seed")
GUIDANCE_OPTIONS = ("guidance_scale", "reference_guidance", "irn_detail", "irn_detail_octaves", "irn_tone")


def unused_options(mode: str, given: Iterable[str]) -> str | None:
    """A warning naming those of the options ``given`` that mode ``mode`` does not read (irn and direct are one
    deterministic pass, mode prior samples without guidance or the IRN) and the modes that read them; None when it
    reads them all."""
    if mode == "full":
        return None
    given = list(given)
    groups = [(GUIDANCE_OPTIONS, "mode full")]
    if mode != "prior":
        groups.insert(0, (SAMPLING_OPTIONS, "modes full and prior"))
    parts = []
    for options, where in groups:
        names = [n for n in given if n in options]
        if names:
            parts.append(f"{', '.join(names)} (read in {where})")
    return f"mode {mode} does not use {'; '.join(parts)}: without effect here" if parts else None


def finite_float(text: str) -> float:
    """argparse ``type=`` for float flags: a finite number (``inf`` and ``nan`` would reach the sampler as a
    black face with NaN scores)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int, at_most: int | None = None) -> Callable[[str], int]:
    """argparse ``type=`` for counts, sizes and ports: an integer >= ``low`` (and <= ``at_most``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be <= {at_most}, got {value}")
        return value

    return parse


def unit_float(text: str) -> float:
    """argparse ``type=`` for shares such as ``--fidelity``: a number in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


positive_int = int_at_least(1)
"""argparse ``type=`` for counts such as ``--batch-size``: an integer >= 1."""


def face_seed(seed: int, sample_k: int, index: int) -> int:
    """The seed of the start noise of face ``index``, sample ``sample_k`` (torch and ONNX runtimes alike)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, sample_k, index]).generate_state(1)[0])
