"""ONNX export of a model folder, for the torch-free runtime in :mod:`clrface.onnx_runtime`.

``export_onnx(model, out_dir)`` writes one graph per step of :class:`clrface.restorer.Restorer` that has no
autograd in it, each with a dynamic batch axis, plus ``runtime.json``::

    encoder.onnx   x [B,3,S,S] in [-1,1]        -> z [B,d,S/f,S/f]  = (E(x) - mean) / std         (Restorer.encode)
    decoder.onnx   z [B,d,S/f,S/f] normalised   -> x [B,3,S,S]      = G(Q(z * std + mean))        (Restorer.decode)
    denoiser.onnx  x, sigma [B], cond           -> D(x; sigma, cond), EDM preconditioning inside (LatentPrior)
    irn.onnx       x [B,3,S,S]                  -> clamp(f_IRN(x), -1, 1)                          (Restorer.run_irn)

The latent standardisation lives inside the encoder/decoder graphs, so a runtime only ever sees the prior's
normalised latents; ``runtime.json`` still records mean/std, the sampling schedule, the fidelity map and the
model's default options. Identity guidance (mode "full" with guidance_scale > 0) differentiates through the
decoder and the face recogniser and is not exported: it stays torch-only.

The exporter is ``torch.onnx.export(dynamo=True)`` (the default since torch 2.9; needs ``onnxscript``, which
installs without torch). ``dynamo=False`` selects the legacy TorchScript exporter, still present but deprecated
in torch 2.13; both give the same numbers here (tests/test_export.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clrface.diffusion.prior import LatentPrior
from clrface.errors import ClrfaceError
from clrface.restorer import Restorer
from clrface.vqgan.model import VQGAN

OPSET = 18
FORMAT = 1
RUNTIME_JSON = "runtime.json"
DECODE_CHUNK = 4096
"""Latent positions per decoder call in a runtime: the nearest-code search builds a [positions, K] distance
matrix (4096 x 8192 fp32 = 128 MiB), the chunk torch's ``nearest_code`` uses too."""


class EncodeGraph(nn.Module):
    """x [B,3,S,S] in [-1,1] -> (E(x) - mean) / std [B,d,h,w]: ``Restorer.encode``."""

    def __init__(self, vqgan: VQGAN, prior: LatentPrior):
        super().__init__()
        self.vqgan, self.prior = vqgan, prior

    def forward(self, x: Tensor) -> Tensor:
        return self.prior.normalize(self.vqgan.encode(x))


class DecodeGraph(nn.Module):
    """Normalised latent z [B,d,h,w] -> G(Q(z * std + mean)) [B,3,S,S]: ``Restorer.decode``, forward values only.

    Q is written as one matmul + ArgMin + Gather (torch's ``nearest_code`` loops over chunks, which does not
    export); |c|^2 is precomputed once in torch so that the distances are the very numbers torch compares.
    """

    def __init__(self, vqgan: VQGAN, prior: LatentPrior):
        super().__init__()
        self.decoder, self.prior = vqgan.decoder, prior
        cb = vqgan.quantizer.codebook.detach().float()
        self.register_buffer("codebook", cb.clone())
        self.register_buffer("codebook_t", cb.t().contiguous())
        self.register_buffer("codebook_sq", cb.pow(2).sum(1)[None])

    def forward(self, z: Tensor) -> Tensor:
        z = self.prior.denormalize(z)
        _, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        dist = self.codebook_sq - (2.0 * flat) @ self.codebook_t  # |z|^2 is constant per row (as nearest_code)
        zq = self.codebook[dist.argmin(1)].reshape(-1, h, w, d).permute(0, 3, 1, 2)
        return self.decoder(z + (zq - z))  # the straight-through sum, so the values match to the last bit


class DenoiseGraph(nn.Module):
    """(x [B,d,h,w], sigma [B], cond [B,d,h,w]) -> D(x; sigma, cond) (Karras et al. 2022, Eq. 7): ``LatentPrior``."""

    def __init__(self, prior: LatentPrior):
        super().__init__()
        self.prior = prior

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        return self.prior(x, sigma, cond=cond)


class IRNGraph(nn.Module):
    """x_d [B,3,S,S] -> clamp(f_IRN(x_d), -1, 1): ``Restorer.run_irn``."""

    def __init__(self, irn: nn.Module):
        super().__init__()
        self.irn = irn

    def forward(self, x: Tensor) -> Tensor:
        return self.irn(x).clamp(-1, 1)


# name -> (input names, output name); the order of the inputs is the graphs' forward order
GRAPH_IO: dict[str, tuple[tuple[str, ...], str]] = {
    "encoder": (("x",), "z"),
    "decoder": (("z",), "x"),
    "denoiser": (("x", "sigma", "cond"), "denoised"),
    "irn": (("x",), "x_id"),
}


def graph_modules(vqgan: VQGAN, prior: LatentPrior, irn: nn.Module | None
                  ) -> dict[str, tuple[nn.Module, tuple[Tensor, ...]]]:
    """The modules to export with example inputs (batch 2, so that no size-1 axis gets specialised)."""
    s = int(vqgan.config.resolution)
    c, h = int(vqgan.config.latent_channels), s // vqgan.config.downsample
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, s, s, generator=g) * 2 - 1
    z = torch.randn(2, c, h, h, generator=g)
    mods: dict[str, tuple[nn.Module, tuple[Tensor, ...]]] = {
        "encoder": (EncodeGraph(vqgan, prior), (x,)),
        "decoder": (DecodeGraph(vqgan, prior), (z,)),
        "denoiser": (DenoiseGraph(prior), (z, torch.tensor([0.5, 3.0]), z.flip(0))),
    }
    if irn is not None:
        mods["irn"] = (IRNGraph(irn), (x,))
    return {k: (m.eval().requires_grad_(False), a) for k, (m, a) in mods.items()}


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs a warning per missing torchvision op and progress lines; neither concerns us."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def export_graph(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: tuple[str, ...], output: str, *,
                 opset: int = OPSET, dynamo: bool = True) -> Path:
    """One module -> one self-contained .onnx file (weights inside) with a dynamic batch axis on every input
    and the output."""
    if dynamo:
        try:
            import onnxscript  # noqa: F401, PLC0415  optional dependency; the dynamo exporter translates through it
        except ImportError:
            raise ClrfaceError("the ONNX exporter needs onnxscript and onnx (pip install 'clrface[onnx]'), or use "
                               "the legacy TorchScript exporter (--torchscript)") from None
        batch = torch.export.Dim("batch", min=1, max=4096)
        kw: dict[str, Any] = {"dynamo": True, "dynamic_shapes": {n: {0: batch} for n in inputs},
                              "external_data": False, "verbose": False}
    else:
        kw = {"dynamo": False, "dynamic_axes": {n: {0: "batch"} for n in (*inputs, output)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=list(inputs), output_names=[output],
                          opset_version=opset, **kw)
    written = graph_opset(path)
    if written not in (None, opset):  # the exporter logs a failed conversion and writes its own opset
        raise ClrfaceError(f"{path.name}: the exporter could not convert the graph to opset {opset} (it wrote "
                           f"opset {written}); choose another --opset")
    return path


def _onnx() -> Any:
    """The onnx package, or None: it is an optional dependency (the legacy exporter runs without it)."""
    try:
        import onnx  # noqa: PLC0415
    except ImportError:
        return None
    return onnx


def graph_opset(path: Path) -> int | None:
    """The default-domain opset of a written .onnx file (None without the onnx package to read it)."""
    if (onnx := _onnx()) is None:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def runtime_spec(vqgan: VQGAN, prior: LatentPrior, *, has_irn: bool, fidelity_map: dict[str, float],
                 defaults: dict[str, Any], source: str | None, opset: int) -> dict[str, Any]:
    """What a runtime needs besides the graphs (``runtime.json``)."""
    pc = prior.config
    sched = dataclasses.asdict(pc.schedule)
    return {
        "format": FORMAT,
        "source": source,
        "torch_version": torch.__version__,
        "opset": opset,
        "resolution": int(vqgan.config.resolution),
        "latent_channels": int(vqgan.config.latent_channels),
        "latent_size": int(vqgan.config.resolution // vqgan.config.downsample),
        "latent_mean": list(pc.latent_mean),
        "latent_std": list(pc.latent_std),
        "latent_normalisation": "inside the graphs: encoder.onnx outputs and decoder.onnx takes (z - mean) / std",
        "sigma_data": pc.sigma_data,
        "schedule": {k: sched[k] for k in ("sigma_min", "sigma_max", "rho", "steps")},
        "fidelity_map": dict(fidelity_map),
        "defaults": dict(defaults),
        "decode_chunk": DECODE_CHUNK,
        "graphs": {name: f"{name}.onnx" for name in GRAPH_IO if name != "irn" or has_irn},
        "identity_guidance": "torch only (autograd through decoder and face recogniser); not exported",
    }


class _NoFacerec(nn.Module):
    """Stands in for the face recogniser: export never embeds faces, so the dlib nets need not load."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("export has no face recogniser")


def max_opset() -> int | None:
    """The newest ONNX opset the installed onnx package defines (None without the package: the exporter says)."""
    onnx = _onnx()
    return None if onnx is None else int(onnx.defs.onnx_opset_version())


def export_restorer(restorer: Restorer, out_dir: str | Path, *, opset: int = OPSET, dynamo: bool = True) -> Path:
    """Writes the graphs of a loaded :class:`clrface.restorer.Restorer` (fp32 weights on the CPU) and
    ``runtime.json`` into ``out_dir``; returns the path of ``runtime.json``."""
    newest = max_opset()
    if opset < 17 or (newest is not None and opset > newest):
        raise ClrfaceError(f"opset must be between 17 and {newest} (the newest this onnx knows), got {opset}"
                           if newest is not None else f"opset must be >= 17, got {opset}")
    if restorer.device.type != "cpu" or next(restorer.vqgan.parameters()).dtype != torch.float32:
        raise ClrfaceError(f"export needs a Restorer with fp32 weights on the CPU, got {restorer.device}")
    out = Path(out_dir)
    vqgan, prior, irn = restorer.vqgan, restorer.prior, restorer.irn
    for name, (module, args) in graph_modules(vqgan, prior, irn).items():
        inputs, output = GRAPH_IO[name]
        export_graph(module, args, out / f"{name}.onnx", inputs, output, opset=opset, dynamo=dynamo)
    spec = runtime_spec(vqgan, prior, has_irn=irn is not None, fidelity_map=dataclasses.asdict(restorer.fidelity_map),
                        defaults=restorer.defaults, source=restorer.source, opset=opset)
    path = out / RUNTIME_JSON
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def export_onnx(model: str | Path | None, out_dir: str | Path, *, opset: int = OPSET, dynamo: bool = True) -> Path:
    """Exports a model folder (or the name of an installed model; None: "default") to ``out_dir`` (see the
    module docstring); returns the path of ``runtime.json``. Only vqgan/, prior/, irn/ and restore.json are
    read; a mask/ (used by identity guidance only) is ignored."""
    restorer = Restorer.from_pretrained(model, "cpu", facerec=_NoFacerec())
    return export_restorer(restorer, out_dir, opset=opset, dynamo=dynamo)
