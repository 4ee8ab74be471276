"""The one training loop shared by every stage: Accelerate (CPU, one GPU or N processes), mixed precision,
gradient accumulation, EMA, periodic validation, checkpoints and exact resume.

A stage supplies modules, objectives (one optimiser each: VQGAN has one for G and one for D) and a
deterministic `batch(micro_step, rank, world)`; because batches depend only on the step, a resumed run
sees exactly the batches an uninterrupted run would have seen (no lost or repeated step).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from clrface.device import native_bf16
from clrface.errors import ClrfaceError

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class EngineConfig:
    out_dir: str = "runs/default"
    steps: int = 10_000
    batch_size: int = 16  # per process and micro-step
    grad_accum: int = 1
    # accelerate's values ("no" | "bf16" | "fp16") or "auto": bf16 where it runs natively, else "no" (fp32)
    mixed_precision: str = "auto"
    ema_decay: float = 0.999
    # The (1 + step) / (10 + step) ramp lets a fresh model's EMA follow its first steps; a run continued from
    # trained weights can turn it off so the average starts as those weights at full decay.
    ema_ramp: bool = True
    log_every: int = 25
    val_every: int = 1000
    ckpt_every: int = 250
    seed: int = 0
    threads: int = 0  # torch threads per process; 0 keeps torch's default
    max_minutes: float = 0.0  # checkpoint and stop after this much wall time (0: no limit)

    def __post_init__(self) -> None:
        for key, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("log_every", 1), ("ckpt_every", 1),
                         ("val_every", 0), ("threads", 0), ("max_minutes", 0)):
            if getattr(self, key) < low:
                raise ClrfaceError(f"train.{key} must be at least {low}, got {getattr(self, key)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ClrfaceError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ClrfaceError(f"train.mixed_precision {self.mixed_precision!r}: choose from "
                               f"{', '.join(MIXED_PRECISION)}")


@dataclass
class Objective:
    """Minimise `loss_fn(batch, step, cache) -> (loss, logs)` over `params` with AdamW.
    `cache` is shared by the objectives of one step (e.g. the G reconstruction that D reuses)."""

    name: str
    params: list[nn.Parameter]
    loss_fn: Callable[[dict[str, Tensor], int, dict[str, Any]], tuple[Tensor, dict[str, float]]]
    lr: float
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup: int = 0
    final_lr_ratio: float = 0.1  # cosine decay from lr to lr * ratio at the last step
    start_step: int = 0  # e.g. the discriminator starts late
    max_grad_norm: float = 1.0


class Stage(Protocol):
    modules: dict[str, nn.Module]  # trainable modules; the engine wraps them for Accelerate
    ema_name: str  # the module whose EMA weights are exported

    def objectives(self, modules: dict[str, nn.Module]) -> list[Objective]: ...
    def batch(self, micro_step: int, rank: int, world: int) -> dict[str, Tensor]: ...
    def validate(self, ema: nn.Module, step: int, out_dir: Path) -> dict[str, float]: ...
    def export(self, ema: nn.Module, folder: Path) -> None: ...


def train_device() -> torch.device:
    """Where training runs: the GPU when there is one (Accelerate's choice too), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    """``train.mixed_precision`` made concrete: "auto" is "bf16" where bf16 runs natively (see
    :func:`clrface.device.native_bf16`), else "no"; other values stay."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "no"


def step_indices(micro_step: int, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> Tensor:
    """Dataset indices of one process's share of a global batch, a pure function of the step:
    epochs are seeded permutations, consumed in order."""
    global_batch = batch * world
    start = micro_step * global_batch + rank * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + batch - len(out)].tolist())
    return torch.tensor(out)


class ChunkedBatches:
    """A stage's batches made ``steps`` consecutive micro-steps at a time by ``make(chunk, rank, world)`` (a dict
    of tensors stacked in step order, a pure function of its arguments, so resume stays exact) and served one
    micro-step's slice at a time. On a GPU, degrading is a few kernel launches whatever the batch, so one call for
    eight steps costs about what one step's did."""

    def __init__(self, make: Callable[[int, int, int], dict[str, Tensor]], steps: int, batch_size: int):
        self.make, self.steps, self.batch_size = make, steps, batch_size
        self._key: tuple[int, int, int] | None = None
        self._batch: dict[str, Tensor] = {}

    def __call__(self, micro_step: int, rank: int, world: int) -> dict[str, Tensor]:
        chunk, pos = divmod(micro_step, self.steps)
        if self._key != (chunk, rank, world):
            self._key, self._batch = (chunk, rank, world), self.make(chunk, rank, world)
        return {k: v[pos * self.batch_size : (pos + 1) * self.batch_size] for k, v in self._batch.items()}


def lr_at(step: int, total: int, obj: Objective) -> float:
    """Linear warm-up then cosine decay to `final_lr_ratio`; stateless so resume needs no scheduler state."""
    if step < obj.start_step:
        return 0.0
    s = step - obj.start_step
    if s < obj.warmup:
        return obj.lr * (s + 1) / obj.warmup
    t = min(1.0, (s - obj.warmup) / max(1, total - obj.start_step - obj.warmup))
    return obj.lr * (obj.final_lr_ratio + (1 - obj.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Parameters are averaged; buffers (e.g. the EMA codebook, norm statistics) are copied."""
    ep = [p for p in ema.parameters()]
    mp = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ep, mp, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


#: The config sections that shape a stage's network: a resumed run must keep them (its checkpoint has that shape).
NETWORK_SECTIONS = ("model", "unet", "precond")


def _saved_step(out: Path) -> int | None:
    """The step of the checkpoint in ``out/train_state`` (None: none there)."""
    try:
        return int(json.loads((out / "train_state" / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_run_folder(out: Path, resume: bool, config_dump: dict | None = None) -> None:
    """Refuses, before any work, what would overwrite or corrupt a run: an ``out`` that is a file; a fresh run into
    a folder holding an earlier run's checkpoint (its weights and log would be replaced and mixed); a resumed run
    whose config changes the network's shape (the checkpoint cannot load into it)."""
    if out.exists() and not out.is_dir():
        raise ClrfaceError(f"{out}: is a file; train.out_dir (--out) names the run's folder")
    step = _saved_step(out)
    if not resume and (step is not None or (out / "model" / "model.safetensors").is_file()):
        at = f" (checkpoint at step {step})" if step is not None else ""
        raise ClrfaceError(f"{out}: holds an earlier training run{at}; --resume continues it, another "
                           "train.out_dir (--out) starts a new one, or remove the folder to start over here")
    saved_cfg = out / "run_config.json"
    if resume and step is not None and config_dump is not None and saved_cfg.is_file():
        saved = json.loads(saved_cfg.read_text())
        now = json.loads(json.dumps(config_dump, default=str))
        for section in NETWORK_SECTIONS:
            if saved.get(section) != now.get(section):
                raise ClrfaceError(f"--resume: the run in {out} was trained with {section} {saved.get(section)}, "
                                   f"this config gives {now.get(section)}; a resumed run keeps its network (start "
                                   "a new train.out_dir for another one)")


def truncate_log(path: Path, step: int) -> None:
    """Drops the rows of ``log.csv`` after ``step``: a run killed after its last checkpoint logged steps that the
    resumed run logs again."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) < len(rows):
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)


class _Logger:
    def __init__(self, path: Path):
        self.path = path
        new = not path.exists()
        self.f = path.open("a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(["step", "elapsed_s", "name", "value"])

    def log(self, step: int, elapsed: float, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.w.writerow([step, f"{elapsed:.1f}", k, f"{v:.6g}"])
        self.f.flush()


def train(stage: Stage, cfg: EngineConfig, *, resume: bool = False, config_dump: dict | None = None) -> int:
    """Runs `stage` to `cfg.steps` (or `max_minutes`); returns the last completed step. Stopped by SIGINT
    (Ctrl-C) or SIGTERM, it saves a checkpoint and raises KeyboardInterrupt, so the command's status says the
    run did not finish. ``config_dump`` is written to ``run_config.json`` for a new run; a resumed run keeps that
    file and writes its own config beside it (``run_config.resumed-<step>.json``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    check_run_folder(out, resume, config_dump)
    acc = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision, train_device()),
                      cpu=train_device().type == "cpu")
    set_seed(cfg.seed + acc.process_index)
    state_dir = out / "train_state"
    resume_step = _saved_step(out) if resume else None
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if config_dump is not None:
            name = "run_config.json" if resume_step is None else f"run_config.resumed-{resume_step}.json"
            (out / name).write_text(json.dumps(config_dump, indent=2, default=str))
        if resume_step is not None:
            truncate_log(out / "log.csv", resume_step)
    names = list(stage.modules)
    prepared = acc.prepare(*[stage.modules[n] for n in names])
    prepared = prepared if isinstance(prepared, (tuple, list)) else [prepared]
    mods = dict(zip(names, prepared))
    ema = copy.deepcopy(acc.unwrap_model(mods[stage.ema_name])).eval().requires_grad_(False)
    objectives = stage.objectives(mods)
    opts = [torch.optim.AdamW(o.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay) for o in objectives]
    opts = [acc.prepare(o) for o in opts]
    acc.register_for_checkpointing(ema)

    step = 0
    if resume_step is not None:
        acc.load_state(str(state_dir))
        step = resume_step
        acc.print(f"resumed from {state_dir} at step {step}")
    elif resume:
        acc.print(f"no training state in {state_dir}; starting at step 0")
    if step >= cfg.steps:
        acc.print(f"the run is at step {step} of train.steps {cfg.steps}: nothing to do (raise train.steps to "
                  "train on)")

    stop = {"flag": False, "signal": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["flag"] = stop["signal"] = True

    old_handlers = ({s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
                    if acc.is_main_process else {})

    def save() -> None:
        tmp = out / "train_state.tmp"
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every rank writes its own RNG file into tmp before rank 0 renames it
        if acc.is_main_process:
            (tmp / "progress.json").write_text(json.dumps({"step": step}))
            old = out / "train_state.old"
            if state_dir.exists():
                state_dir.rename(old)
            tmp.rename(state_dir)
            shutil.rmtree(old, ignore_errors=True)
            stage.export(ema, out / "model")
        acc.wait_for_everyone()

    logger = _Logger(out / "log.csv") if acc.is_main_process else None
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not acc.is_main_process, dynamic_ncols=True, desc=out.name)
    last_logs: dict[str, float] = {}
    try:
        while step < cfg.steps:
            cache: dict[str, Any] = {}
            logs: dict[str, float] = {}
            for obj, opt in zip(objectives, opts):
                if step < obj.start_step:
                    continue
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg.steps, obj)
                opt.zero_grad(set_to_none=True)
                for k in range(cfg.grad_accum):
                    micro = step * cfg.grad_accum + k
                    batch = stage.batch(micro, acc.process_index, acc.num_processes)
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    sub_cache = cache.setdefault(k, {})
                    with acc.autocast():
                        loss, part = obj.loss_fn(batch, step, sub_cache)
                    acc.backward(loss / cfg.grad_accum)
                    for key, v in part.items():
                        logs[key] = logs.get(key, 0.0) + v / cfg.grad_accum
                if obj.max_grad_norm:
                    acc.clip_grad_norm_(obj.params, obj.max_grad_norm)
                opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_ramp else cfg.ema_decay
            ema_update(ema, acc.unwrap_model(mods[stage.ema_name]), decay)
            step += 1
            bar.update(1)
            last_logs = logs
            if acc.is_main_process and (step % cfg.log_every == 0 or step == cfg.steps):
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(logs.items())[:4]})
                logger.log(step, time.time() - t0, logs)
            if acc.is_main_process and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
                vals = stage.validate(ema, step, out)
                logger.log(step, time.time() - t0, {f"val/{k}": v for k, v in vals.items()})
                bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in vals.items()))
            timed_out = cfg.max_minutes and (time.time() - t0) > cfg.max_minutes * 60
            stop_now = torch.tensor(float(stop["flag"] or bool(timed_out)))
            stop_now = acc.reduce(stop_now, "max") if acc.num_processes > 1 else stop_now
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_now.item():
                save()
            if stop_now.item():
                acc.print(f"stopping at step {step} (checkpoint saved; continue with --resume)")
                break
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    del last_logs
    if stop["signal"]:
        raise KeyboardInterrupt
    return step
