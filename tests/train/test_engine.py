import json
import math
import signal
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from torch import nn

from clrface.checkpoint import load_weights, save_checkpoint
from clrface.errors import ClrfaceError
from clrface.train.engine import (
    ChunkedBatches,
    EngineConfig,
    Objective,
    lr_at,
    resolve_mixed_precision,
    step_indices,
    train,
    truncate_log,
)


@dataclass(frozen=True)
class ToyConfig:
    dim: int = 4


class ToyStage:
    """Linear regression: enough to check the loop's bookkeeping exactly."""

    ema_name = "net"

    def __init__(self, batch_size: int = 4):
        torch.manual_seed(0)
        self.modules = {"net": nn.Linear(4, 1)}
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(40, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        self.batch_size = batch_size
        self.seen: list[int] = []

    def objectives(self, m):
        net = m["net"]

        def loss(batch, step, cache):
            self.seen.append(step)
            loss = (net(batch["x"]) - batch["y"]).pow(2).mean()
            return loss, {"mse": loss.item()}

        return [Objective("net", list(net.parameters()), loss, lr=0.05, final_lr_ratio=1.0)]

    def batch(self, micro, rank, world):
        idx = step_indices(micro, len(self.x), self.batch_size, 0, rank, world)
        return {"x": self.x[idx], "y": self.y[idx]}

    def validate(self, ema, step, out_dir):
        return {"mse": (ema(self.x) - self.y).pow(2).mean().item()}

    def export(self, ema, folder):
        save_checkpoint(folder, ema, ToyConfig(), "toy")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_weights(folder, nn.Linear(4, 1)).state_dict()


def test_step_indices_cover_each_epoch_once_and_are_deterministic():
    idx = torch.cat([step_indices(s, 10, 5, seed=3) for s in range(4)])  # two epochs of 10
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))
    assert torch.equal(step_indices(7, 10, 5, seed=3), step_indices(7, 10, 5, seed=3))
    a, b = step_indices(0, 100, 4, 0, rank=0, world=2), step_indices(0, 100, 4, 0, rank=1, world=2)
    assert not set(a.tolist()) & set(b.tolist())  # processes share a global batch, never an index


def test_auto_mixed_precision_is_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("clrface.device.cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert resolve_mixed_precision("auto", cpu) == "no"
    assert resolve_mixed_precision("bf16", cpu) == "bf16"  # an explicit choice stays
    assert resolve_mixed_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr("clrface.device.cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert resolve_mixed_precision("auto", cpu) == "bf16"
    assert EngineConfig().mixed_precision == "auto"


def test_lr_schedule_warmup_and_cosine_end():
    o = Objective("x", [], lambda *a: None, lr=1.0, warmup=10, final_lr_ratio=0.1, start_step=5)
    assert lr_at(4, 100, o) == 0.0
    assert abs(lr_at(5, 100, o) - 0.1) < 1e-9 and abs(lr_at(14, 100, o) - 1.0) < 1e-9
    assert abs(lr_at(100, 100, o) - 0.1) < 1e-9
    # a fifth of the way through the decay (17 of 85 steps): 0.1 + 0.9 * (1 + cos(pi/5)) / 2; linear would be 0.82
    assert lr_at(32, 100, o) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 5)), abs=1e-12)
    lrs = [lr_at(s, 100, o) for s in range(14, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_loss_decreases_and_checkpoint_written(tmp_path):
    cfg = EngineConfig(out_dir=str(tmp_path / "run"), steps=60, batch_size=8, mixed_precision="no",
                       ema_decay=0.9, log_every=10, val_every=60, ckpt_every=30)
    stage = ToyStage(8)
    assert train(stage, cfg) == 60
    start_mse = stage.y.pow(2).mean().item()  # a zero predictor
    final = stage.validate(load_weights(tmp_path / "run" / "model", nn.Linear(4, 1)), 60, tmp_path)["mse"]
    assert start_mse > 8 and final < 1.0  # EMA weights of the exported model fit the data
    assert (tmp_path / "run" / "train_state" / "progress.json").exists()
    assert "val/mse" in (tmp_path / "run" / "log.csv").read_text()


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    base = EngineConfig(steps=10, batch_size=4, mixed_precision="no", ema_decay=0.9, val_every=0, ckpt_every=100)
    full = ToyStage()
    train(full, replace(base, out_dir=str(tmp_path / "full")))
    part = ToyStage()
    train(part, replace(base, out_dir=str(tmp_path / "part"), steps=4))  # "killed" after 4 steps
    rest = ToyStage()
    assert train(rest, replace(base, out_dir=str(tmp_path / "part")), resume=True) == 10
    assert part.seen + rest.seen == list(range(10))  # no lost or repeated step
    for k, v in _weights(tmp_path / "full" / "model").items():
        torch.testing.assert_close(_weights(tmp_path / "part" / "model")[k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ramp, kept", [(True, 0.1), (False, 0.9)])
def test_ema_starts_at_full_decay_without_the_ramp(tmp_path, ramp, kept):
    cfg = EngineConfig(out_dir=str(tmp_path / "run"), steps=1, batch_size=4, mixed_precision="no", ema_decay=0.9,
                       ema_ramp=ramp, val_every=0, ckpt_every=100)
    stage = ToyStage()
    w0 = {k: v.clone() for k, v in stage.modules["net"].state_dict().items()}
    train(stage, cfg)
    w1 = stage.modules["net"].state_dict()
    assert not torch.allclose(w0["weight"], w1["weight"])  # the step moved the model
    for k, v in _weights(tmp_path / "run" / "model").items():  # the ramp's first decay is 1/10
        torch.testing.assert_close(v, kept * w0[k] + (1 - kept) * w1[k], rtol=0, atol=1e-6)


def _two_process_run(out: str) -> None:
    cfg = EngineConfig(out_dir=out, steps=3, batch_size=4, mixed_precision="no", val_every=0, ckpt_every=3)
    train(ToyStage(), cfg)


@pytest.mark.slow
def test_two_process_accelerate_step(tmp_path):
    debug_launcher(_two_process_run, args=(str(tmp_path / "ddp"),), num_processes=2)
    assert json.loads((tmp_path / "ddp" / "train_state" / "progress.json").read_text())["step"] == 3
    assert torch.isfinite(_weights(tmp_path / "ddp" / "model")["weight"]).all()


def test_chunked_batches_make_each_chunk_once_and_serve_step_slices():
    calls = []

    def make(chunk: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        calls.append((chunk, rank, world))
        return {"x": torch.arange(12) + 100 * chunk}  # 4 steps x batch 3

    batches = ChunkedBatches(make, steps=4, batch_size=3)
    assert batches(5, 0, 1)["x"].tolist() == [103, 104, 105]  # chunk 1, second step
    assert batches(6, 0, 1)["x"].tolist() == [106, 107, 108]
    assert batches(7, 0, 1)["x"].tolist() == [109, 110, 111]
    assert calls == [(1, 0, 1)]
    assert batches(8, 0, 1)["x"].tolist() == [200, 201, 202]
    assert batches(8, 1, 2)["x"].tolist() == [200, 201, 202] and calls[-1] == (2, 1, 2)  # another process's chunk
    assert len(calls) == 3


def test_a_run_folder_is_never_overwritten_or_resumed_into_another_network(tmp_path):
    base = EngineConfig(out_dir=str(tmp_path / "run"), steps=4, batch_size=4, mixed_precision="no", val_every=0,
                        ckpt_every=100)
    dump = {"model": {"dim": 4}, "train": {"steps": 4}}
    train(ToyStage(), base, config_dump=dump)
    with pytest.raises(ClrfaceError, match=r"holds an earlier training run \(checkpoint at step 4\); --resume"):
        train(ToyStage(), base, config_dump=dump)
    with pytest.raises(ClrfaceError, match=r"trained with model \{'dim': 4\}, this config gives \{'dim': 8\}"):
        train(ToyStage(), replace(base, steps=6), resume=True, config_dump={**dump, "model": {"dim": 8}})
    assert json.loads((tmp_path / "run" / "run_config.json").read_text()) == dump  # untouched by the refusals
    assert train(ToyStage(), replace(base, steps=6), resume=True, config_dump={**dump, "train": {"steps": 6}}) == 6
    assert json.loads((tmp_path / "run" / "run_config.json").read_text()) == dump  # the run's own config stays
    assert json.loads((tmp_path / "run" / "run_config.resumed-4.json").read_text())["train"] == {"steps": 6}
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ClrfaceError, match="afile: is a file; train.out_dir"):
        train(ToyStage(), replace(base, out_dir=str(tmp_path / "afile")))


def test_resume_after_a_kill_drops_the_log_rows_past_the_checkpoint(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,elapsed_s,name,value\n5,1.0,mse,2\n10,2.0,mse,1\n10,2.0,val/mse,1\n15,3.0,mse,0.5\n")
    truncate_log(log, 10)
    assert log.read_text().splitlines() == ["step,elapsed_s,name,value", "5,1.0,mse,2", "10,2.0,mse,1",
                                            "10,2.0,val/mse,1"]


def test_a_signal_saves_a_checkpoint_and_then_interrupts(tmp_path):
    class Stopped(ToyStage):
        def validate(self, ema, step, out_dir):  # the signal arrives during step 3
            signal.raise_signal(signal.SIGINT)
            return {}

    cfg = EngineConfig(out_dir=str(tmp_path / "run"), steps=10, batch_size=4, mixed_precision="no", val_every=3,
                       ckpt_every=100)
    with pytest.raises(KeyboardInterrupt):
        train(Stopped(), cfg)
    assert json.loads((tmp_path / "run" / "train_state" / "progress.json").read_text()) == {"step": 3}
