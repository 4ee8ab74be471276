"""`clrface train STAGE --config FILE`: YAML -> config dataclasses -> a stage -> the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from clrface.errors import ClrfaceError
from clrface.train.engine import EngineConfig, train, train_device


def load_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Reads a YAML config and applies `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ClrfaceError(f"{path}: config file not found")
    cfg = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ClrfaceError(f"--set {item}: expected KEY=VALUE")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def build(cls: type, section: dict[str, Any] | None, name: str) -> Any:
    """A config dataclass from a YAML section; unknown keys raise (typos must not pass silently)."""
    section = section or {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ClrfaceError(f"config section '{name}': unknown keys {unknown} for {cls.__name__}")
    return cls(**section)


def run_stage(stage: str, config: str | Path, overrides: list[str] = (), out: str | None = None,
              resume: bool = False) -> int:
    raw = load_config(config, overrides)
    if out:
        raw.setdefault("train", {})["out_dir"] = out
    engine_cfg = build(EngineConfig, raw.get("train"), "train")
    torch.manual_seed(engine_cfg.seed)  # stages build their networks here, before the engine seeds its loop
    if stage == "vqgan":
        from clrface.train.vqgan import VQGANStage, VQGANTrainConfig
        from clrface.vqgan.model import VQGANConfig

        model_cfg = build(VQGANConfig, raw.get("model"), "model")
        stage_cfg = build(VQGANTrainConfig, raw.get("stage"), "stage")
        perceptual = None
        if stage_cfg.perceptual == "facerec" and stage_cfg.perceptual_weight > 0:
            from clrface.identity.facerec import load_facerec, perceptual_distance

            fr = load_facerec(train_device())
            perceptual = lambda a, b: perceptual_distance(fr, a, b)  # noqa: E731
        st = VQGANStage(model_cfg, stage_cfg, engine_cfg.seed, engine_cfg.batch_size, perceptual)
    elif stage == "prior":
        from clrface.diffusion.schedule import ScheduleConfig
        from clrface.diffusion.unet import UNetConfig
        from clrface.train.diffusion import PriorStage, PriorTrainConfig

        st = PriorStage(build(UNetConfig, raw.get("unet"), "unet"), float((raw.get("precond") or {}).get("sigma_data", 1.0)),
                        build(ScheduleConfig, raw.get("schedule"), "schedule"), build(PriorTrainConfig, raw.get("stage"), "stage"),
                        engine_cfg.seed, engine_cfg.batch_size, Path(engine_cfg.out_dir))
    elif stage == "irn":
        from clrface.identity.facerec import load_facerec
        from clrface.identity.irn import IRNConfig
        from clrface.train.irn import IRNStage, IRNTrainConfig

        st = IRNStage(build(IRNConfig, raw.get("model"), "model"), build(IRNTrainConfig, raw.get("stage"), "stage"),
                      engine_cfg.seed, engine_cfg.batch_size, load_facerec())
    elif stage == "mask":
        from clrface.identity.guidance import MaskConfig
        from clrface.train.mask import MaskStage, MaskTrainConfig

        st = MaskStage(build(MaskConfig, raw.get("model"), "model"), build(MaskTrainConfig, raw.get("stage"), "stage"),
                       engine_cfg.seed, engine_cfg.batch_size)
    elif stage == "distill":
        from clrface.train.distill import DistillStage, DistillTrainConfig

        st = DistillStage(build(DistillTrainConfig, raw.get("stage"), "stage"), engine_cfg.seed, engine_cfg.batch_size,
                          Path(engine_cfg.out_dir))
    elif stage == "vqvae-rest":
        from clrface.train.vqvae_rest import RestStage, RestTrainConfig

        st = RestStage(build(RestTrainConfig, raw.get("stage"), "stage"), engine_cfg.seed, engine_cfg.batch_size)
    else:
        raise ClrfaceError(f"stage '{stage}' is not implemented yet")
    return train(st, engine_cfg, resume=resume, config_dump=raw)
