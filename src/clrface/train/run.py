"""`clrface train STAGE --config FILE`: YAML -> config dataclasses -> a stage -> the engine."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import torch
import yaml

from clrface.data.degradation import PRESETS
from clrface.diffusion.schedule import ScheduleConfig
from clrface.diffusion.unet import UNetConfig
from clrface.errors import ClrfaceError
from clrface.identity.facerec import load_facerec, perceptual_distance
from clrface.identity.guidance import MaskConfig
from clrface.identity.irn import IRNConfig
from clrface.train.diffusion import PriorStage, PriorTrainConfig
from clrface.train.distill import DistillStage, DistillTrainConfig
from clrface.train.engine import EngineConfig, check_run_folder, train, train_device
from clrface.train.irn import IRNStage, IRNTrainConfig
from clrface.train.mask import MaskStage, MaskTrainConfig
from clrface.train.vqgan import VQGANStage, VQGANTrainConfig
from clrface.train.vqvae_rest import RestStage, RestTrainConfig
from clrface.vqgan.model import VQGANConfig


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-5 (an exponent without a dot) as a string; configs mean the number."""


_EXPONENT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+0123456789"))


def load_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Reads a YAML config and applies `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ClrfaceError(f"{path}: config file not found")
    cfg = _yaml(path.read_text(), str(path)) or {}
    if not isinstance(cfg, dict):
        raise ClrfaceError(f"{path}: not a config (expected sections of KEY: VALUE, got a {type(cfg).__name__})")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ClrfaceError(f"--set {item}: expected KEY=VALUE")
        node = cfg
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:  # absent, or an empty section in the file
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ClrfaceError(f"--set {item}: {'.'.join(parents[:i + 1])} is a value, not a section")
        node[leaf] = _yaml(value, f"--set {item}")
    return cfg


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, _Loader)
    except yaml.YAMLError as e:
        raise ClrfaceError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None


def build(cls: type, section: dict[str, Any] | None, name: str) -> Any:
    """A config dataclass from a YAML section; unknown keys raise (typos must not pass silently)."""
    section = section or {}
    if not isinstance(section, dict):
        raise ClrfaceError(f"config section '{name}': expected KEY: VALUE pairs, got {section!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ClrfaceError(f"config section '{name}': unknown keys {unknown} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    for key, value in section.items():
        if hints[key] is int and isinstance(value, float) and value.is_integer():
            section = {**section, key: int(value)}  # steps: 1e5
        check_value(f"{name}.{key}", section[key], hints[key])
    try:
        obj = cls(**section)
    except (ValueError, TypeError) as e:  # the dataclass's own checks: one line, as every config error
        raise ClrfaceError(f"config section '{name}': {e}") from None
    if getattr(obj, "val_count", 1) < 1:  # 0 reached the data loader as "no limit": all 500 faces every validation
        raise ClrfaceError(f"config {name}.val_count must be at least 1, got {obj.val_count}")
    for key in ("preset", "degradation"):  # preset names, checked before any data is read
        if isinstance(getattr(obj, key, None), str) and getattr(obj, key) not in PRESETS:
            raise ClrfaceError(f"config {name}.{key}: unknown degradation preset {getattr(obj, key)!r}; choose "
                               f"from {', '.join(sorted(PRESETS))}")
    return obj


def check_value(key: str, value: Any, hint: Any) -> None:
    """Raises ClrfaceError when a config value cannot be of a plain field type (str, int, float, bool); other
    types (lists, unions) are left to the dataclass."""
    if hint not in (str, int, float, bool):
        return
    if hint is bool or hint is str:
        ok = isinstance(value, hint)
    else:  # an int fills a float field too; a bool is no number here
        ok = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if not ok:
        why = " (YAML reads no/yes/on/off as booleans: quote it, KEY='no')" if isinstance(value, bool) else ""
        raise ClrfaceError(f"config {key}: expected {hint.__name__}, got {value!r}{why}")


# The config dataclass of every YAML section a stage reads ("train" -> EngineConfig for all stages). The prior's
# "precond" section holds sigma_data only (Precond(net, sigma_data)), so it has no dataclass of its own.
STAGE_SECTIONS: dict[str, dict[str, type]] = {
    "vqgan": {"model": VQGANConfig, "stage": VQGANTrainConfig},
    "prior": {"unet": UNetConfig, "schedule": ScheduleConfig, "stage": PriorTrainConfig},
    "irn": {"model": IRNConfig, "stage": IRNTrainConfig},
    "mask": {"model": MaskConfig, "stage": MaskTrainConfig},
    "distill": {"stage": DistillTrainConfig},
    "vqvae-rest": {"stage": RestTrainConfig},
}
PRECOND_KEYS = frozenset({"sigma_data"})


def stage_configs(stage: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Every section of a loaded config as its dataclass, plus "sigma_data" for the prior: what ``run_stage``
    builds its stage from. Unknown stages, sections or keys raise ClrfaceError."""
    if stage not in STAGE_SECTIONS:
        raise ClrfaceError(f"stage '{stage}' is not implemented; choose from {', '.join(STAGE_SECTIONS)}")
    sections = {"train": EngineConfig, **STAGE_SECTIONS[stage]}
    extra = sorted(set(raw) - set(sections) - ({"precond"} if stage == "prior" else set()))
    if extra:
        raise ClrfaceError(f"config: unknown sections {extra} for stage {stage}")
    out = {name: build(cls, raw.get(name), name) for name, cls in sections.items()}
    if stage == "prior":
        precond = raw.get("precond") or {}
        unknown = sorted(set(precond) - PRECOND_KEYS)
        if unknown:
            raise ClrfaceError(f"config section 'precond': unknown keys {unknown}")
        out["sigma_data"] = float(precond.get("sigma_data", 1.0))
    return out


def run_stage(stage: str, config: str | Path, overrides: list[str] = (), out: str | None = None,
              resume: bool = False) -> int:
    raw = load_config(config, overrides)
    if out:
        raw.setdefault("train", {})["out_dir"] = out
    cfg = stage_configs(stage, raw)
    engine_cfg: EngineConfig = cfg["train"]
    check_run_folder(Path(engine_cfg.out_dir), resume, raw)  # before the stage reads data or fills caches
    torch.manual_seed(engine_cfg.seed)  # stages build their networks here, before the engine seeds its loop
    seed, batch, out_dir = engine_cfg.seed, engine_cfg.batch_size, Path(engine_cfg.out_dir)
    if stage == "vqgan":
        perceptual = None
        if cfg["stage"].perceptual == "facerec" and cfg["stage"].perceptual_weight > 0:
            fr = load_facerec(train_device())
            perceptual = lambda a, b: perceptual_distance(fr, a, b)  # noqa: E731
        st = VQGANStage(cfg["model"], cfg["stage"], seed, batch, perceptual)
    elif stage == "prior":
        st = PriorStage(cfg["unet"], cfg["sigma_data"], cfg["schedule"], cfg["stage"], seed, batch, out_dir)
    elif stage == "irn":
        st = IRNStage(cfg["model"], cfg["stage"], seed, batch, load_facerec())
    elif stage == "mask":
        st = MaskStage(cfg["model"], cfg["stage"], seed, batch)
    elif stage == "distill":
        st = DistillStage(cfg["stage"], seed, batch, out_dir)
    else:  # vqvae-rest
        st = RestStage(cfg["stage"], seed, batch)
    return train(st, engine_cfg, resume=resume, config_dump=raw)
