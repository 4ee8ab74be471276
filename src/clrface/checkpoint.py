"""Checkpoints are folders: ``config.json`` (the model's config dataclass plus its kind) and
``model.safetensors`` (weights). Never pickles modules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clrface.errors import CheckpointError

C = TypeVar("C")


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    config: Any,
    kind: str,
    *,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes ``folder/config.json`` and ``folder/model.safetensors``; ``dtype`` casts float tensors (fp16 to ship)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "config": dataclasses.asdict(config), **(extra or {})}
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.contiguous()
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"kind": kind})
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's ``config.json`` as a dict; CheckpointError when it is missing or unreadable."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no config.json)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not text
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: unreadable config (not a JSON object)")
    return meta


def read_config(folder: str | Path, kind: str, config_cls: type[C]) -> tuple[C, dict[str, Any]]:
    """Reads ``config.json``; raises CheckpointError when it is missing or of another kind."""
    folder = Path(folder)
    path = folder / "config.json"
    meta = read_meta(folder)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{folder}: is a '{meta.get('kind')}' checkpoint, expected '{kind}'")
    try:
        cfg = config_cls(**meta["config"])
    except TypeError as e:
        raise CheckpointError(f"{path}: config does not match {config_cls.__name__} ({e})") from None
    return cfg, meta


def read_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/model.safetensors``; a missing or damaged file raises CheckpointError."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no model.safetensors")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path}: unreadable weights ({e})") from None


def load_weights(folder: str | Path, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Loads ``model.safetensors`` into ``model`` (cast to the model's dtype); shape mismatches raise
    CheckpointError."""
    path = Path(folder) / "model.safetensors"
    state = read_state(folder)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {bad[0]} "
                              f"({tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
    missing = [k for k in own if k not in state]
    if strict and missing:
        raise CheckpointError(f"{path}: missing tensors, e.g. {missing[0]} (wrong kind of checkpoint?)")
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    model.load_state_dict(state, strict=strict)
    return model


def checkpoint_kind(folder: str | Path) -> str:
    """The kind recorded in a checkpoint folder's config.json ("vqgan", "prior", "irn", ...); raises
    CheckpointError when the folder is not a checkpoint."""
    return str(_checkpoint_meta(Path(folder)).get("kind"))


def _checkpoint_meta(folder: Path) -> dict[str, Any]:
    if not (folder / "model.safetensors").is_file():
        inner = folder / "model"  # a training run's folder holds its checkpoint there
        hint = f"; the run's checkpoint is {inner}" if (inner / "model.safetensors").is_file() else ""
        raise CheckpointError(f"{folder}: not a checkpoint folder (no model.safetensors){hint}")
    return read_meta(folder)


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16, *,
                       state: dict[str, torch.Tensor] | None = None) -> Path:
    """Copies a checkpoint folder with its float tensors cast to ``dtype`` (fp16 to ship: half the size;
    loading casts back to the model's dtype). ``state``: its tensors, already read (:func:`read_state`)."""
    src, dst = Path(src), Path(dst)
    meta = _checkpoint_meta(src)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
             for k, v in (read_state(src) if state is None else state).items()}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"kind": str(meta.get("kind"))})
    (dst / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst
