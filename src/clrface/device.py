"""Where, in which precision and on how many CPU threads the nets run: ``--device``, ``--dtype`` and
``--threads`` made concrete."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

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


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 autocast runs natively on ``device``: a GPU, or a CPU with AMX or AVX512-BF16. Elsewhere a CPU
    emulates bf16 arithmetic: a 1.55 M-parameter IRN measured 11 s per face under bf16 autocast on an AVX2-only
    CPU against 0.14 s in fp32 (docs/RESULTS.md, "Conventions")."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool((cpu_flags() if flags is None else flags) & BF16_CPU_FLAGS)


def auto_dtype(device: torch.device, flags: frozenset[str] | None = None) -> str:
    """The compute precision ``--dtype auto`` picks: bfloat16 on a CPU with native bf16 (AMX or AVX512-BF16),
    where it measured 1.25-3.4x faster at equal quality (docs/RESULTS.md, "CPU, speed-ups one at a time"); else float32
    (emulated bf16 is slower; on an H200 bf16 autocast was slower for one face and at most 1.25x faster per face
    in batches of 16: docs/RESULTS.md)."""
    if device.type == "cpu" and native_bf16(device, flags):
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
    """A torch device that exists here; raises ClrfaceError (one line) for another kind than cpu, cuda and mps, and
    for cuda/mps when unavailable."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ClrfaceError(f"device {str(name)!r}: choose cpu, cuda (cuda:N) or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClrfaceError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ClrfaceError("device 'mps' requested but MPS is not available; use --device cpu")
    return dev


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, cpusets), further capped by a cgroup v2 CPU
    quota (``docker --cpus``), which limits time rather than cores and so is invisible to the mask."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def auto_threads(cpus: int | None = None, load: float | None = None, machine_cpus: int | None = None) -> int:
    """The torch thread count when ``--threads`` is not given: the CPUs available to this process less the share
    of them that other work keeps busy (1-minute load average over the machine's CPUs), at least 1.

    OpenMP threads spin and wait for each other at every op, so a thread on a core that another process holds
    stalls all of them: on 2 cores busy with two trainings, 2 threads took 9-38x longer per face than 1
    (docs/threads.md). The load average is the machine's (in a container: the host's), hence scaled by
    ``machine_cpus``; where it cannot be read (Windows) all available CPUs are used."""
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
    machine = max(cpus, (os.cpu_count() or cpus) if machine_cpus is None else machine_cpus)
    free = cpus * (1.0 - min(1.0, load / machine))
    return max(1, min(cpus, math.floor(free + 0.5)))


def set_threads(threads: int | None = None) -> int:
    """Sets torch's intra-op thread count to ``threads`` (``--threads N``), else :func:`auto_threads`; -> the
    count set. Raises ClrfaceError for N < 1."""
    if threads is not None and threads < 1:
        raise ClrfaceError(f"--threads must be >= 1, got {threads}")
    n = auto_threads() if threads is None else threads
    torch.set_num_threads(n)
    return n
