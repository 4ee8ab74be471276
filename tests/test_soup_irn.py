"""benchmarks/soup_irn.py: the weighted mean of state dicts, and an averaged IRN checkpoint that loads."""

import sys

import pytest
import torch
from safetensors.torch import save_file

from clrface.checkpoint import save_checkpoint
from clrface.identity.irn import IRN, IRNConfig, load_irn


@pytest.fixture(scope="module")
def soup(benchmark_script):
    return benchmark_script("soup_irn")


def test_average_states_weighted(soup):
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    equal = soup.average_states([a, b])
    assert equal["w"].tolist() == [2.0, 4.0] and equal["n"].item() == 3
    assert soup.average_states([a, b], [3, 1])["w"].tolist() == [1.5, 3.0]
    assert soup.average_states([a, b], [-1, 2])["w"].tolist() == [5.0, 10.0]  # twice as far from a as b went


def test_average_states_rejects_mismatch(soup):
    a = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="same architecture"):
        soup.average_states([a, {"w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="non-zero sum"):
        soup.average_states([a, a], [1.0, -1.0])


def test_cli_writes_the_mean_irn(soup, tmp_path, monkeypatch):
    cfg = IRNConfig(channels=(8, 16, 16), blocks=(1, 1, 1))
    torch.manual_seed(0)
    nets = [IRN(cfg), IRN(cfg)]
    for i, net in enumerate(nets):
        save_checkpoint(tmp_path / f"n{i}", net, cfg, "irn")
    argv = ["soup_irn", str(tmp_path / "n0"), str(tmp_path / "n1"), "-o", str(tmp_path / "s")]
    monkeypatch.setattr(sys, "argv", argv)
    soup.main()
    mean = load_irn(tmp_path / "s").state_dict()
    for k, v in mean.items():
        want = (nets[0].state_dict()[k] + nets[1].state_dict()[k]) / 2
        assert torch.allclose(v, want, atol=1e-6), k
    # a training state (raw weights, no config.json) beside an IRN folder
    raw = tmp_path / "train_state"
    raw.mkdir()
    save_file({k: v.contiguous() for k, v in nets[1].state_dict().items()}, str(raw / "model.safetensors"))
    argv = ["soup_irn", str(tmp_path / "n0"), str(raw), "--weights", "0", "1", "-o", str(tmp_path / "r")]
    monkeypatch.setattr(sys, "argv", argv)
    soup.main()
    for k, v in load_irn(tmp_path / "r").state_dict().items():
        assert torch.equal(v, nets[1].state_dict()[k]), k
