"""Caches a stage fills once per run folder (the prior's clean latents, the distilled prior's teacher
trajectories): reused only while what they were made from is unchanged, so a run into an old folder with other
data or another model remakes them instead of training on stale tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from clrface.data.io import write_via_temporary

T = TypeVar("T")


def folder_stamp(folder: str | Path) -> list[Any]:
    """What identifies a checkpoint folder's weights: its resolved path, and the size and mtime of every
    ``model.safetensors`` under it (a model folder holds one per stage)."""
    root = Path(folder).resolve()
    files = sorted(root.rglob("model.safetensors"))
    return [str(root)] + [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def folders_key(folders: str | list[str]) -> list[str]:
    """A data folder or list of folders (a stage's ``train_dir``) as resolved paths."""
    return [str(Path(d).resolve()) for d in (folders if isinstance(folders, list) else [folders])]


def cached(path: Path, key: dict[str, Any], make: Callable[[], T], *, map_location: Any = None,
           log: Callable[[str], None] = print) -> T:
    """``make()``'s result, stored at ``path`` with ``key`` (plain JSON-like values: what it is made from) and
    loaded from there while the stored key equals ``key``; otherwise made again and stored."""
    if path.exists():
        try:
            saved = torch.load(path, map_location=map_location, weights_only=True)
        except Exception:  # noqa: BLE001  a damaged or foreign file is remade, whatever torch raises for it
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved["data"]
        log(f"{path}: made from other data or another model than this run's; making it again")
    data = make()
    write_via_temporary(path, lambda tmp: torch.save({"key": key, "data": data}, tmp))
    return data
