"""Torch-free face restoration with the graphs written by ``clrface export onnx`` (numpy + onnxruntime only).

:class:`OnnxRestorer` restores 128 px (the model's S) aligned faces like ``Restorer.restore_faces`` for the
modes ``irn``, ``prior``, ``direct`` and ``full`` *without* identity guidance: the guidance differentiates the
face recogniser's embedding through the decoder, which needs autograd, so it is torch-only (``clrface
restore``); a resolved guidance_scale > 0 in mode ``full`` raises. The samplers (Heun, Euler, DPM-Solver++(2M)),
the Karras schedule, the fidelity map and the IRN's tone and detail (``irn_tone``, ``irn_detail``: the bicubic
band split as matrices) are ports of ``clrface.diffusion`` / ``clrface.options`` / ``clrface.faces.detail`` to
numpy, step for step in fp32, so that with the same start noise the result matches torch to ~1e-5
(tests/test_export.py). The start noise itself cannot match: numpy's generator is not torch's. Per face and
sample it is drawn from its own numpy generator seeded as in the pipeline (seed, sample, face index), so
results do not depend on the batch size; pass ``noise=`` to supply torch's.

Not here: face detection/alignment/pasting and the identity scores (they need dlib and its face recogniser).

This module must not import torch (checked by tests/test_export.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clrface.errors import CheckpointError, ClrfaceError
from clrface.options import FidelityMap, RestoreOptions, face_seed

Denoise = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(x [B,...] fp32, sigma [B] fp32) -> x0_hat [B,...]."""


# ------------------------------------------------------------------------------------ schedule + samplers


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5: fp32 ``[n + 1]``, sigma_max down to sigma_min, then 0 (as
    ``clrface.diffusion.schedule.karras_sigmas``: fp64 math, exact end points, cast once)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        s = np.array([sigma_max], dtype=np.float64)
    else:
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        s = (hi + ramp * (lo - hi)) ** rho
        s[0], s[-1] = sigma_max, sigma_min
    return np.concatenate([s, [0.0]]).astype(np.float32)


def sigmas_from(schedule: dict[str, float], sigma_start: float, steps: int) -> np.ndarray:
    """A fresh Karras schedule of ``steps`` steps from sigma_start to sigma_min, then 0 (``sigmas_from`` for a
    ScheduleConfig): ``[0]`` for sigma_start 0, ``[sigma_start, 0]`` at or below sigma_min."""
    if sigma_start < 0:
        raise ValueError(f"sigma_start must be >= 0, got {sigma_start}")
    if sigma_start == 0:
        return np.zeros(1, np.float32)
    if sigma_start <= schedule["sigma_min"]:
        return np.array([sigma_start, 0.0], np.float32)
    return karras_sigmas(steps, schedule["sigma_min"], sigma_start, schedule["rho"])


def _batch(s: np.float32, x: np.ndarray) -> np.ndarray:
    return np.full(x.shape[0], s, np.float32)


def heun(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Karras et al. 2022, Alg. 2 without churn (``clrface.diffusion.sampler.heun``). NFE: 2N - 1."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, _batch(s, x))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:  # trapezoid correction; the last step to 0 stays Euler
            d_next = (x_next - denoise(x_next, _batch(s_next, x))) / s_next
            x_next = x + (s_next - s) * (d + d_next) / np.float32(2)
        x = x_next
    return x


def euler(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """First-order Euler steps (``clrface.diffusion.sampler.euler``). NFE: N."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x = x + (s_next - s) * ((x - denoise(x, _batch(s, x))) / s)
    return x


def dpmpp_2m(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; ``clrface.diffusion.sampler.dpmpp_2m``). NFE: N."""
    old: np.ndarray | None = None
    h_last: np.float32 | None = None
    one, two = np.float32(1), np.float32(2)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, _batch(s, x))
        h = None
        if s_next == 0:
            x = denoised
        else:
            h = np.log(s / s_next)
            d_eff = denoised
            if old is not None and h_last is not None:
                r = h_last / h
                d_eff = (one + one / (two * r)) * denoised - (one / (two * r)) * old
            ratio = s_next / s
            x = ratio * x + (one - ratio) * d_eff
        old, h_last = denoised, h
    return x


SAMPLER_FNS: dict[str, Callable[[Denoise, np.ndarray, np.ndarray], np.ndarray]] = {
    "heun": heun, "euler": euler, "dpmpp_2m": dpmpp_2m}


def nfe(sampler: str, steps: int) -> int:
    """Denoiser calls for ``steps`` steps ending in 0 (``clrface.diffusion.sampler.nfe``)."""
    return 2 * steps - 1 if sampler == "heun" else steps


# ------------------------------------------------------------------------------------------- options


def face_noise(shape: tuple[int, ...], seed: int, sample_k: int, first_index: int = 0) -> np.ndarray:
    """Start noise fp32 [B,...] for faces first_index.. and sample k, one numpy generator per face (the same
    seeds as the torch pipeline, but numpy's normal draws, so other numbers)."""
    return np.stack([np.random.default_rng(face_seed(seed, sample_k, first_index + i))
                     .standard_normal(shape[1:], dtype=np.float32) for i in range(shape[0])])


# ------------------------------------------------- band split (irn_tone, irn_detail; clrface.faces.detail)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` (torch: -0.75 upsampling, -0.5 antialiased)."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """fp64 [n_out, n_in]: one axis of torch's ``F.interpolate(mode="bicubic", align_corners=False)``, antialiased
    when shrinking (the resize of ``clrface.faces.detail``): the shrinking filter is the cubic stretched by the
    scale and normalised per output pixel; enlarging samples at (i + 0.5) * scale - 0.5 with edge pixels repeated."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    if n_out == n_in:
        return np.eye(n_in)
    if n_out < n_in:
        support = 2.0 * scale
        for i in range(n_out):
            c = scale * (i + 0.5)
            lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)
            w = _cubic((np.arange(lo, hi) - c + 0.5) / scale, -0.5)
            m[i, lo:hi] = w / w.sum()
        return m
    for i in range(n_out):
        src = scale * (i + 0.5) - 0.5
        j = int(np.floor(src))
        w = _cubic(src - j - np.arange(-1, 3), -0.75)
        np.add.at(m[i], np.clip(np.arange(j - 1, j + 3), 0, n_in - 1), w)
    return m


@functools.lru_cache(maxsize=8)
def _lowpass_matrix(n: int, size: int) -> np.ndarray:
    """fp32 [n, n], read-only: one axis of bicubic down to ``size`` px and up again (P of ``band_split``)."""
    p = (resize_matrix(size, n) @ resize_matrix(n, size)).astype(np.float32)
    p.flags.writeable = False
    return p


def _lowpass(x: np.ndarray, size: int) -> np.ndarray:
    """x [B,C,N,N] -> bicubic down to ``size`` px and up again, [B,C,N,N]."""
    p = _lowpass_matrix(x.shape[-1], size)
    return np.einsum("ij,bcjk,lk->bcil", p, x, p)


def high_band(x: np.ndarray, size: int) -> np.ndarray:
    """The high band of ``clrface.faces.detail.band_split``: (I - P)^2 x."""
    h = x - _lowpass(x, size)
    return h - _lowpass(h, size)


def lower_band_from(x: np.ndarray, source: np.ndarray, size: int) -> np.ndarray:
    """``clrface.faces.detail.lower_band_from``: x with what a ``size``-px image holds taken from ``source``."""
    return source - high_band(source, size) + high_band(x, size)


def upper_band_from(x: np.ndarray, source: np.ndarray, weight: float = 1.0, octaves: int = 1) -> np.ndarray:
    """``clrface.faces.detail.upper_band_from``: x with ``weight`` of its finest ``octaves`` from ``source``."""
    size = x.shape[-1] >> octaves
    return x + np.float32(weight) * (high_band(source, size) - high_band(x, size))


# ------------------------------------------------------------------------------------------ restorer


class OnnxRestorer:
    """The exported graphs of one model folder in onnxruntime sessions.

    ``threads``: intra-op threads per session (None: onnxruntime's default, all cores). ``providers``:
    onnxruntime execution providers, CPU by default.
    """

    def __init__(self, folder: str | Path, *, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        try:
            import onnxruntime as ort  # noqa: PLC0415  optional dependency, named in the error below
        except ImportError:
            raise ClrfaceError("the ONNX runtime needs onnxruntime (pip install onnxruntime)") from None
        self.folder = Path(folder)
        path = self.folder / "runtime.json"
        if not path.is_file():
            raise CheckpointError(f"{self.folder}: no runtime.json; "
                                  f"write one with `clrface export onnx -o {self.folder}`")
        self.spec: dict[str, Any] = json.loads(path.read_text())
        if self.spec.get("format") != 1:
            raise CheckpointError(f"{path}: unsupported format {self.spec.get('format')!r} (this runtime reads 1)")
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        self.sessions: dict[str, Any] = {}
        for name, file in self.spec["graphs"].items():
            if not (self.folder / file).is_file():
                raise CheckpointError(f"{self.folder / file}: missing graph (listed in runtime.json)")
            self.sessions[name] = ort.InferenceSession(str(self.folder / file), so, providers=list(providers))
        self.defaults: dict[str, Any] = dict(self.spec.get("defaults", {}))
        self.resolution = int(self.spec["resolution"])

    @property
    def has_irn(self) -> bool:
        return "irn" in self.sessions

    def options(self, **overrides: Any) -> RestoreOptions:
        """The model's default options (restore.json at export), then ``overrides`` that are not None. The runtime
        honours fidelity, steps, sampler, sigma_start, guidance_scale, irn_tone, irn_detail(_octaves), seed, samples,
        mode and batch_size; the photo-level fields (upscale, max_faces, min_face, color) belong to the torch path."""
        return RestoreOptions.for_model(self.defaults, self.resolution, **overrides)

    def _run(self, name: str, **inputs: np.ndarray) -> np.ndarray:
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        return self.sessions[name].run(None, feed)[0]

    # ------------------------------------------------------------------------------ steps (Restorer's)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Faces [B,3,S,S] in [-1,1] -> normalised latents [B,d,S/f,S/f]."""
        return self._run("encoder", x=x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Normalised latents -> G(Q(z * std + mean)) [B,3,S,S], in chunks that bound the code-distance matrix."""
        per = max(1, int(self.spec.get("decode_chunk", 4096)) // (z.shape[2] * z.shape[3]))
        return np.concatenate([self._run("decoder", z=z[i:i + per]) for i in range(0, len(z), per)])

    def denoise(self, x: np.ndarray, sigma: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """D(x; sigma, cond) of the prior: x, cond [B,d,h,w] normalised, sigma [B]."""
        return self._run("denoiser", x=x, sigma=sigma, cond=cond)

    def run_irn(self, x: np.ndarray) -> np.ndarray:
        """clamp(f_IRN(x), -1, 1), or x itself without an IRN."""
        return self._run("irn", x=x) if self.has_irn else np.asarray(x, np.float32)

    # ------------------------------------------------------------------------------ restore

    def restore_faces(self, x_d: np.ndarray, options: RestoreOptions | None = None, *, noise: np.ndarray | None = None,
                      first_index: int = 0) -> dict[str, Any]:
        """Aligned faces x_d fp32 [B,3,S,S] in [-1,1] -> dict ``restored`` [B,N,3,S,S] in [-1,1], ``x_id``
        [B,3,S,S], ``sigma_start``, ``guidance_scale`` (always 0) and ``nfe`` (as ``Restorer.restore_faces``
        without the identity scores). ``noise`` [B,N,d,h,w]: the start noise, else drawn per face (module doc).
        """
        o = (options or self.options()).check_for(self.resolution)
        x_d = np.asarray(x_d, np.float32)
        s, b, n = self.resolution, x_d.shape[0], o.samples
        if x_d.ndim != 4 or x_d.shape[1:] != (3, s, s):
            raise ClrfaceError(f"restore_faces needs faces [B,3,{s},{s}], got {tuple(x_d.shape)}")
        sigma_start, scale = o.resolve(FidelityMap(**self.spec["fidelity_map"]))
        x_id, calls = x_d, 0
        if o.mode == "direct":
            restored = np.repeat(self.decode(self.encode(x_d))[:, None], n, 1)
            sigma_start = 0.0
        elif o.mode == "irn":
            if not self.has_irn:
                raise ClrfaceError(f"mode 'irn' needs an irn graph ({self.folder})")
            x_id = self.run_irn(x_d)
            restored = np.repeat(x_id[:, None], n, 1)
            sigma_start = 0.0
        else:
            if o.mode == "full" and scale > 0:
                raise ClrfaceError(f"identity guidance (mode 'full', guidance_scale {scale:g} > 0) needs autograd and "
                                   "runs in torch only (clrface restore); pass guidance_scale=0 or use mode 'prior'")
            z_d = self.encode(x_d)
            if o.mode == "full":
                x_id = self.run_irn(x_d)
                z_init = self.encode(x_id) if self.has_irn else z_d
            else:
                sigma_max = float(self.spec["schedule"]["sigma_max"])
                z_init = np.zeros_like(z_d) if sigma_start >= sigma_max else z_d
            if noise is None:
                noise = np.stack([face_noise(z_d.shape, o.seed, k, first_index) for k in range(n)], 1)
            noise = np.asarray(noise, np.float32)
            if noise.shape != (b, n, *z_d.shape[1:]):
                raise ClrfaceError(f"noise must be [B,N,...] = {(b, n, *z_d.shape[1:])}, got {noise.shape}")
            rep = lambda a: np.repeat(a, n, 0)  # noqa: E731  [B,...] -> [B*N,...], samples of a face adjacent
            z = self.refine(rep(z_init), rep(z_d), sigma_start, o, noise.reshape(b * n, *z_d.shape[1:]))
            restored = self.decode(z)
            if o.mode == "full" and self.has_irn and (o.irn_tone or o.irn_detail > 0):
                irn_out = np.repeat(x_id, n, 0)
                if o.irn_tone:
                    restored = lower_band_from(restored, irn_out, o.irn_tone)
                if o.irn_detail > 0:
                    restored = upper_band_from(restored, irn_out, o.irn_detail, o.irn_detail_octaves)
            restored = restored.reshape(b, n, 3, s, s)
            calls = nfe(o.sampler, o.steps) if sigma_start > 0 else 0
        return {"restored": np.clip(restored, -1, 1).astype(np.float32), "x_id": x_id.astype(np.float32),
                "sigma_start": sigma_start, "guidance_scale": 0.0, "nfe": calls}

    def refine(self, z_init: np.ndarray, z_d: np.ndarray, sigma_start: float, options: RestoreOptions,
               noise: np.ndarray) -> np.ndarray:
        """Reverse ODE (paper Eq. 10) from z_init + sigma_start * noise to sigma 0 (``Restorer.refine``)."""
        sigmas = sigmas_from(self.spec["schedule"], sigma_start, options.steps)
        if sigma_start == 0:
            return z_init.copy()
        x = z_init + np.float32(sigma_start) * noise
        return SAMPLER_FNS[options.sampler](lambda v, sig: self.denoise(v, sig, z_d), x, sigmas)

    def restore_crops(self, crops: np.ndarray, options: RestoreOptions | None = None) -> np.ndarray:
        """uint8 [F,S,S,3] aligned faces, S the model's ``resolution`` (resize other crops first) -> uint8
        [F,N,S,S,3] restored, in chunks of ``batch_size`` faces (face i keeps its own noise, so the chunking does not
        change the result)."""
        o = options or self.options()
        crops = np.asarray(crops)
        s = self.resolution
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (s, s, 3):
            raise ClrfaceError(f"restore_crops needs uint8 [F,{s},{s},3] (this model's resolution; resize other "
                               f"crops first), got {crops.dtype} {crops.shape}")
        out = [np.zeros((0, o.samples, *crops.shape[1:]), np.uint8)]  # no crops: no results, not an error
        for i in range(0, len(crops), o.batch_size):
            x = to_model_range(crops[i:i + o.batch_size])
            out.append(to_uint8(self.restore_faces(x, o, first_index=i)["restored"]))
        return np.concatenate(out)


# The numpy twins of clrface.data.io.to_model_range / to_uint8, same values (this module runs without torch).


def to_model_range(x: np.ndarray) -> np.ndarray:
    """uint8 [...,H,W,3] -> float32 [...,3,H,W] in [-1, 1]."""
    return np.moveaxis(x, -1, -3).astype(np.float32) / np.float32(127.5) - np.float32(1)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[...,3,H,W] in [-1,1] -> uint8 [...,H,W,3] (round half to even, as torch.round)."""
    u = np.rint((np.clip(x, -1, 1) + np.float32(1)) * np.float32(127.5)).astype(np.uint8)
    return np.moveaxis(u, -3, -1)
