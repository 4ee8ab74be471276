import json

import pytest
import torch

from clrface.checkpoint import checkpoint_kind, load_weights, read_config, save_checkpoint
from clrface.errors import CheckpointError
from clrface.vqgan.model import VQGAN, VQGANConfig

TINY = VQGANConfig(resolution=32, base_channels=16, codebook_size=32)


def test_fp16_export_halves_and_loads(tmp_path):
    m = VQGAN(TINY)
    save_checkpoint(tmp_path / "a", m, TINY, "vqgan")
    save_checkpoint(tmp_path / "b", m, TINY, "vqgan", dtype=torch.float16)
    a, b = (tmp_path / "a/model.safetensors").stat().st_size, (tmp_path / "b/model.safetensors").stat().st_size
    assert b < 0.6 * a
    m2 = load_weights(tmp_path / "b", VQGAN(TINY))
    w = m.decoder.last_layer
    torch.testing.assert_close(m2.decoder.last_layer, w.half().float())


def test_wrong_kind_wrong_shape_and_missing_raise(tmp_path):
    save_checkpoint(tmp_path / "a", VQGAN(TINY), TINY, "vqgan")
    with pytest.raises(CheckpointError, match="expected 'prior'"):
        read_config(tmp_path / "a", "prior", VQGANConfig)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(tmp_path / "a", VQGAN(VQGANConfig(resolution=32, base_channels=8, codebook_size=32)))
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(tmp_path / "nothing", "vqgan", VQGANConfig)
    (tmp_path / "a/model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_weights(tmp_path / "a", VQGAN(TINY))
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    cfg["config"]["bogus"] = 1
    (tmp_path / "a/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        read_config(tmp_path / "a", "vqgan", VQGANConfig)


def test_checkpoint_kind_reads_the_kind_or_says_why_not(tmp_path):
    save_checkpoint(tmp_path / "a", VQGAN(TINY), TINY, "vqgan")
    assert checkpoint_kind(tmp_path / "a") == "vqgan"
    with pytest.raises(CheckpointError, match=r"not a checkpoint folder \(no model.safetensors\)$"):
        checkpoint_kind(tmp_path)
    save_checkpoint(tmp_path / "run" / "model", VQGAN(TINY), TINY, "vqgan")  # a training run's folder
    with pytest.raises(CheckpointError, match="the run's checkpoint is .*run/model$"):
        checkpoint_kind(tmp_path / "run")
    (tmp_path / "a/config.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointError, match="unreadable config"):
        checkpoint_kind(tmp_path / "a")
