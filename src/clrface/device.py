"""Where and in which precision the nets run: ``--device`` and ``--dtype`` made concrete."""

from __future__ import annotations

import contextlib

import torch

from clrface.errors import ClrfaceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags() -> frozenset[str]:
    """The ISA flags of this CPU from /proc/cpuinfo (empty where it cannot be read, e.g. macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        return frozenset()


def auto_dtype(device: torch.device, flags: frozenset[str] | None = None) -> str:
    """The compute precision ``--dtype auto`` picks: bfloat16 on a CPU with native bf16 (AMX or AVX512-BF16),
    where it measured 1.25-3.4x faster at equal quality (docs/RESULTS.md, "Cheap speed-ups"); else float32
    (emulated bf16 is slower; on an H200 bf16 autocast was slower for one face and at most 1.25x faster per face
    in batches of 16: docs/RESULTS.md)."""
    if device.type == "cpu" and (cpu_flags() if flags is None else flags) & BF16_CPU_FLAGS:
        return "bfloat16"
    return "float32"


def resolve_dtype(name: str, device: torch.device) -> str:
    """A ``--dtype`` value made concrete: "auto" becomes :func:`auto_dtype`'s choice, other names stay."""
    return auto_dtype(device) if name == "auto" else name


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The compute-precision context: autocast to ``dtype`` below fp32, else nothing."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device that exists here; raises ClrfaceError (one line) for cuda/mps when unavailable."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClrfaceError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ClrfaceError("device 'mps' requested but MPS is not available; use --device cpu")
    return dev
