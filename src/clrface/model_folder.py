"""Model folders: the trained stages that one restore needs, found by path or by installed name.

A model folder holds ``vqgan/`` and ``prior/`` checkpoints (required), ``irn/`` and ``mask/`` (optional) and
``restore.json`` (optional: ``fidelity_map``, measured-best ``defaults``, ``input_detail_limit`` (see
:class:`ModelFolder`), and ``base``, an installed model that
supplies the stages the folder lacks and the settings it leaves out, so a fine-tuned model ships only what it
changed: an IRN packed onto ``default`` restores with the default's measured-best settings; a base may have a base
of its own). The nets are loaded here and nowhere else; the :class:`clrface.restorer.Restorer` and the
distillation stage both start from it.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clrface.checkpoint import checkpoint_kind, convert_checkpoint, read_meta, read_state
from clrface.data.io import write_text_atomic
from clrface.diffusion.prior import LatentPrior, load_prior
from clrface.errors import CheckpointError, ClrfaceError
from clrface.identity.guidance import LatentMask, load_mask
from clrface.identity.irn import load_irn
from clrface.options import PACK_STAGES, FidelityMap, RestoreOptions
from clrface.vqgan.model import VQGAN, encoder_fingerprint, load_vqgan


def package_weights(name: str) -> Path:
    """The folder of the model installed as ``clrface/weights/<name>`` (it may not exist)."""
    return Path(str(importlib.resources.files("clrface") / "weights" / name))


def resolve_model(path_or_name: str | Path | None) -> Path:
    """A model folder from a path or the name of a model shipped under ``clrface/weights/`` (None: "default")."""
    if path_or_name is None:
        path_or_name = "default"
    name = str(path_or_name)
    if not name.strip():
        raise CheckpointError("empty model name: give an installed model's name or a model folder's path")
    p = Path(path_or_name).expanduser()
    bare = "/" not in name and "\\" not in name
    pkg = package_weights(name) if bare and name not in (".", "..") else None
    # a folder here named like an installed model ("fast") is that model only if it holds one
    if p.is_dir() and not (pkg is not None and pkg.is_dir() and not is_model_folder(p)):
        return p
    if bare:
        if pkg is not None and pkg.is_dir():
            return pkg
        root = package_weights("")
        avail = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        raise CheckpointError(f"model {name!r}: no such folder and no installed model of that name "
                              f"(installed: {', '.join(avail) or 'none'}); a model folder is given by its path")
    raise CheckpointError(f"{p}: model folder not found")


def is_model_folder(p: Path) -> bool:
    """Whether ``p`` holds a model folder's files (restore.json or a stage checkpoint), not just any folder."""
    return (p / "restore.json").is_file() or any((p / sub / "config.json").is_file() for sub in ("vqgan", "prior"))


@dataclass
class ModelFolder:
    """The loaded stages of a model folder (fp32 weights, eval mode) and its restore.json settings."""

    folder: Path
    vqgan: VQGAN
    prior: LatentPrior
    irn: nn.Module | None = None
    mask: LatentMask | None = None
    fidelity_map: FidelityMap = FidelityMap()
    defaults: dict[str, Any] = field(default_factory=dict)
    # An IRN trained on faces enlarged from few pixels draws ghosted features on faces with more detail:
    # (size, rms) says that faces whose content above ``size`` px exceeds ``rms`` (faces.detail.fine_detail)
    # are outside what it was trained for. Set by the restore.json of the folder whose irn/ is used.
    input_detail_limit: tuple[int, float] | None = None


def read_spec(folder: Path) -> dict[str, Any]:
    """The folder's restore.json as a dict ({} when there is none)."""
    path = folder / "restore.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid ({e})") from None


def merged_spec(own: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A folder's settings over its base's: ``defaults`` and ``fidelity_map`` key by key, the folder winning."""
    return {key: {**base.get(key, {}), **own.get(key, {})} for key in ("defaults", "fidelity_map")}


def base_chain(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The folder and its restore.json, then its base's, and so on (a model packed onto ``fast`` reaches
    ``default`` through it); a base that leads back to a folder of the chain raises CheckpointError."""
    chain = [(folder, read_spec(folder))]
    while chain[-1][1].get("base"):
        try:
            base = resolve_model(chain[-1][1]["base"])
        except CheckpointError as e:
            raise CheckpointError(f"{chain[-1][0] / 'restore.json'}: base: {e}") from None
        if any(base.resolve() == f.resolve() for f, _ in chain):
            raise CheckpointError(f"{chain[-1][0] / 'restore.json'}: base {chain[-1][1]['base']!r} leads back to "
                                  f"{base}")
        chain.append((base, read_spec(base)))
    return chain


def pack_model(out: Path, stages: dict[str, str | Path], base: str | None, dtype: torch.dtype,
               log: Callable[[str], None] = print) -> None:
    """Writes the model folder ``out`` (``clrface pack``): each of ``stages`` (name -> checkpoint folder) stored in
    ``dtype``, and ``restore.json`` naming ``base`` (an installed model that supplies the stages not given and the
    restore settings; settings already in ``out/restore.json`` stay). Every check runs before the first write, so
    a refused pack leaves no half-made folder. ``log`` hears of each stage as it is written."""
    if not base and not ("vqgan" in stages and "prior" in stages):
        raise ClrfaceError("pack needs --vqgan and --prior, or --base NAME to take the missing stages from")
    if out.exists() and not out.is_dir():
        raise ClrfaceError(f"{out}: exists and is not a folder")
    if base:
        chain = base_chain(resolve_model(base))
        lacking = [s for s in ("vqgan", "prior") if s not in stages and not any((f / s).is_dir() for f, _ in chain)]
        if lacking:
            raise ClrfaceError(f"--base {base}: supplies no {' and '.join(s + '/' for s in lacking)}; "
                               f"give --{lacking[0]}")
    for stage, src in stages.items():
        if (kind := checkpoint_kind(src)) != stage:
            raise ClrfaceError(f"--{stage} {src}: is a '{kind}' checkpoint, expected '{stage}'")
    states = {stage: read_state(src) for stage, src in stages.items()}  # a damaged file fails before any write
    stale = [stage for stage in PACK_STAGES if stage not in stages and (out / stage).exists()]
    if stale:
        raise ClrfaceError(f"{out}: holds {', '.join(s + '/' for s in stale)} from an earlier pack, which this "
                           f"one would not replace; remove it or give --{stale[0]}")
    spec = {k: v for k, v in read_spec(out).items() if k != "base"}  # the settings a user wrote stay
    for stage, src in stages.items():
        dst = convert_checkpoint(src, out / stage, dtype, state=states[stage])
        log(f"{stage}: {src} -> {dst} ({(dst / 'model.safetensors').stat().st_size / 2**20:.1f} MiB)")
    if base or (out / "restore.json").is_file():  # last: a pack that failed midway names no base
        write_text_atomic(out / "restore.json", json.dumps({**spec, "base": base} if base else spec, indent=1) + "\n")


def load_model_folder(path_or_name: str | Path | None = None, device: str | torch.device = "cpu") -> ModelFolder:
    """Loads the stages of a model folder (see the module docstring) in fp32 on ``device``. A missing or
    incomplete folder or a checkpoint of the wrong kind/shape raises CheckpointError."""
    chain = base_chain(resolve_model(path_or_name))
    folder = chain[0][0]
    spec = chain[-1][1]
    for _, own in reversed(chain[:-1]):
        spec = merged_spec(own, spec)

    def stage(sub: str) -> Path:
        return next((f / sub for f, _ in chain if (f / sub).is_dir()), folder / sub)

    missing = [sub for sub in ("vqgan", "prior") if not (stage(sub) / "config.json").is_file()
               or not (stage(sub) / "model.safetensors").is_file()]
    if missing:
        raise CheckpointError(f"{folder}: incomplete model folder, missing {' and '.join(s + '/' for s in missing)}"
                              " (need vqgan/ and prior/ checkpoints; irn/ and mask/ are optional)")
    device = torch.device(device)
    vqgan = load_vqgan(stage("vqgan"), device)
    prior = load_prior(stage("prior"), device)
    irn = load_irn(stage("irn"), device) if stage("irn").is_dir() else None
    mask = load_mask(stage("mask"), device) if stage("mask").is_dir() else None
    try:
        fmap = FidelityMap(**spec.get("fidelity_map", {}))
        defaults = spec.get("defaults", {})
        RestoreOptions(**defaults)  # validate now, not at the first restore
        # the limit describes an IRN: it is read from the folder whose irn/ is used
        limit = dict(chain)[stage("irn").parent].get("input_detail_limit") if irn is not None else None
        if limit is not None:
            limit = (int(limit["size"]), float(limit["rms"]))
    except (ValueError, TypeError, KeyError, ClrfaceError) as e:
        raise CheckpointError(f"{folder / 'restore.json'}: invalid ({e})") from None
    check_compatible(vqgan, prior, mask, str(folder))
    trained_on = read_meta(stage("prior")).get("vqgan_encoder")  # priors trained before it was recorded: unchecked
    if trained_on is not None and trained_on != encoder_fingerprint(vqgan):
        raise CheckpointError(f"{folder}: its prior ({stage('prior')}) was trained on the latents of another VQGAN "
                              f"encoder than {stage('vqgan')}'s; pack it with the VQGAN it was trained with")
    return ModelFolder(folder, vqgan, prior, irn, mask, fmap, defaults, limit)


def check_compatible(vqgan: VQGAN, prior: LatentPrior, mask: LatentMask | None, where: str) -> None:
    """Raises CheckpointError when the prior's or the mask's latent shape does not fit the VQGAN's."""
    vc, uc = vqgan.config, prior.config.unet
    lat = vc.resolution // vc.downsample
    if uc.latent_channels != vc.latent_channels or uc.cond_channels != vc.latent_channels or uc.resolution != lat:
        raise CheckpointError(
            f"{where}: prior (latent {uc.latent_channels} ch, cond {uc.cond_channels} ch, {uc.resolution} px) does not "
            f"fit the VQGAN (latent {vc.latent_channels} ch, {lat} px)")
    if mask is not None and mask.config.latent_channels != vc.latent_channels:
        raise CheckpointError(f"{where}: mask expects {mask.config.latent_channels} latent channels, "
                              f"VQGAN has {vc.latent_channels}")


def encode_latent(vqgan: VQGAN, prior: LatentPrior, x: Tensor) -> Tensor:
    """x [B,3,S,S] in [-1,1] -> normalised latent (E(x) - mean) / std [B,d,S/f,S/f] fp32."""
    return prior.normalize(vqgan.encode(x.float()).float())


def decode_latent(vqgan: VQGAN, prior: LatentPrior, z: Tensor) -> Tensor:
    """Normalised latent -> G(Q(denormalize(z))) [B,3,S,S] (Q straight-through, so differentiable in z)."""
    return vqgan.decode(prior.denormalize(z.float())).float()


def apply_irn(irn: nn.Module | None, x_d: Tensor) -> Tensor:
    """f_IRN(x_d) clamped to [-1,1] [B,3,S,S]; without an IRN the input itself (the start latent then is z_d)."""
    if irn is None:
        return x_d.float()
    return irn(x_d.float()).float().clamp(-1, 1)
