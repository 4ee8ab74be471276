"""Every configs/*.yaml maps onto the dataclasses of its stage (what ``clrface train`` builds), so a renamed
field or a typo in a config fails here rather than at the start of a training run."""

import os
import re
import shlex
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from clrface.errors import ClrfaceError
from clrface.train.engine import EngineConfig
from clrface.train.run import STAGE_SECTIONS, load_config, stage_configs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def stage_of(path: Path) -> str:
    """The stage a config trains, from its file name (<stage>-<size>[-variant].yaml); longest name first, so
    vqvae-rest-128 is not read as a vqgan config."""
    return next(s for s in sorted(STAGE_SECTIONS, key=len, reverse=True) if path.name.startswith(f"{s}-"))


def test_there_are_configs_for_every_stage():
    assert {stage_of(p) for p in CONFIGS} == set(STAGE_SECTIONS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_onto_its_dataclasses(path):
    raw = load_config(path)
    cfg = stage_configs(stage_of(path), raw)
    for name, section in raw.items():
        if name == "precond":
            assert cfg["sigma_data"] == section["sigma_data"]
            continue
        values = asdict(cfg[name])
        assert all(values[k] == v or list(values[k]) == v for k, v in section.items() if not isinstance(v, dict))


def test_typos_and_unknown_sections_raise(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {stpes: 10}\n")
    with pytest.raises(ClrfaceError, match="stpes"):
        stage_configs("irn", load_config(path))
    path.write_text("train: {steps: 10}\nunet: {resolution: 8}\n")
    with pytest.raises(ClrfaceError, match="unknown sections"):
        stage_configs("irn", load_config(path))
    with pytest.raises(ClrfaceError, match="not implemented"):
        stage_configs("gan", {})


def test_overrides_read_exponents_without_a_dot_as_numbers(tmp_path):
    path = tmp_path / "irn.yaml"
    path.write_text("stage:\n  lr: 2e-4\n  warmup: 5\ntrain:\n  out_dir: runs/x\n")
    raw = load_config(path, ["stage.disc_lr=1e-5", "stage.alpha=1.5", "train.seed=3", "train.out_dir=1e5x"])
    assert raw["stage"] == {"lr": 2e-4, "warmup": 5, "disc_lr": 1e-5, "alpha": 1.5}
    assert raw["train"] == {"out_dir": "1e5x", "seed": 3}
    assert isinstance(raw["stage"]["warmup"], int) and isinstance(raw["train"]["seed"], int)


def test_bad_values_and_overrides_are_one_line_errors(tmp_path):
    path = tmp_path / "irn.yaml"
    path.write_text("train:\n  steps: 10\n  mixed_precision: 'no'\n")
    cases = {  # override -> what the error says
        "train.mixed_precision=no": "YAML reads no/yes/on/off as booleans",  # unquoted: a boolean
        "train.steps=abc": "train.steps: expected int, got 'abc'",
        "train.steps=1.5": "expected int",
        "train.steps=-1": "train.steps must be at least 1",
        "train.batch_size=0": "train.batch_size must be at least 1",
        "train.ema_decay=5": "train.ema_decay must be in [0, 1), got 5",
        "train.mixed_precision=fp8": "choose from auto, no, bf16, fp16",
        "train.steps=[1": "not valid YAML",
        "train.steps.x=1": "train.steps is a value, not a section",
    }
    for override, message in cases.items():
        with pytest.raises(ClrfaceError, match=re.escape(message)):
            stage_configs("irn", load_config(path, [override]))
    cfg = stage_configs("irn", load_config(path, ["stage.lr=1", "train.mixed_precision='no'"]))
    assert cfg["stage"].lr == 1 and cfg["train"].mixed_precision == "no"  # an int fills a float field
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ClrfaceError, match="not a config"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1\n")
    with pytest.raises(ClrfaceError, match="broken.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ClrfaceError, match="grad_accum must be at least 1"):
        EngineConfig(grad_accum=0)
    with pytest.raises(ClrfaceError, match="ckpt_every must be at least 1"):
        EngineConfig(ckpt_every=0)  # a division by it, late in the run
    assert stage_configs("irn", load_config(path, ["train.steps=1e5"]))["train"].steps == 100_000
    (tmp_path / "empty.yaml").write_text("train:\nstage:\n")  # empty sections take overrides like absent ones
    assert stage_configs("irn", load_config(tmp_path / "empty.yaml", ["train.steps=5"]))["train"].steps == 5


def test_every_run_of_the_gpu_script_builds_its_configs():
    """benchmarks/gpu_session.sh's runs with their --set overrides map onto the dataclasses: a renamed key or a
    value of the wrong type fails here, not on a GPU machine."""
    text = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    block = re.search(r"^data=.*?^\)$", text, re.S | re.M).group(0)
    listing = block + '\nfor r in "${!ARGS[@]}"; do printf "%s\\t%s %s\\0" "$r" "${ARGS[$r]}" "$data"; done'
    out = subprocess.run(["bash", "-c", listing], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"], "TEACHER": "runs/pack-teacher"}).stdout
    runs = dict(item.split("\t", 1) for item in out.split("\0") if item)
    assert {"irn", "irn-l", "irn-deep", "extreme", "prior-st", "decoder-tex-hi", "distill"} <= set(runs)
    for args in map(shlex.split, runs.values()):
        overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        stage_configs(args[0], load_config(ROOT / args[args.index("--config") + 1], overrides))


@pytest.mark.parametrize("stage, raw, message", [
    ("prior", {"stage": {"realistic": {}, "cache_latents": True}},
     "config section 'stage': stage.realistic needs stage.cache_latents: false"),
    ("prior", {"stage": {"start_prob": 0.5}}, "config section 'stage': stage.start_prob > 0 needs stage.irn"),
    ("prior", {"stage": {"preset": "nope"}}, "config stage.preset: unknown degradation preset 'nope'; choose from"),
    ("irn", {"stage": {"degradation": "nope"}}, "config stage.degradation: unknown degradation preset 'nope'"),
    ("irn", {"model": {"body": "swinx"}}, "config section 'model': body must be one of"),
    ("irn", {"stage": {"val_count": 0}}, "config stage.val_count must be at least 1, got 0"),
])
def test_a_dataclass_check_is_a_one_line_error_before_any_data_is_read(stage, raw, message):
    with pytest.raises(ClrfaceError, match=re.escape(message)):
        stage_configs(stage, raw)
