import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from clrface.checkpoint import save_checkpoint
from clrface.errors import CheckpointError
from clrface.identity.irn import (
    IRN,
    IRNConfig,
    SwinBlock,
    deepened,
    load_irn,
    relative_position_index,
    shift_attention_mask,
    widened,
    window_partition,
    window_reverse,
)

TINY_CONV = IRNConfig(body="conv", channels=(8, 16), blocks=(1, 1))
TINY_SWIN = IRNConfig(body="swin", embed_dim=12, depths=(2,), num_heads=(2,), window_size=4)
BODIES = pytest.mark.parametrize("cfg", [TINY_CONV, TINY_SWIN], ids=["conv", "swin"])


def _faces(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth images in [-1, 1] (a low-res pattern upsampled), a stand-in for faces."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(lo, size=(size, size), mode="bilinear", align_corners=False)


@BODIES
def test_untrained_irn_is_the_identity(cfg):
    torch.manual_seed(0)
    x = _faces(2, 16)
    out = IRN(cfg)(x)
    assert out.shape == x.shape
    assert torch.equal(out, x)  # zero-initialised tail: x + 0 exactly


@BODIES
def test_deterministic_construction_and_forward(cfg):
    torch.manual_seed(3)
    a = IRN(cfg)
    torch.manual_seed(3)
    b = IRN(cfg)
    for p in (a.tail.weight, b.tail.weight):  # make the residual non-trivial
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    x = _faces(2, 16)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb) and torch.equal(ya, a(x))
    assert (ya - x).abs().mean() > 1e-3


@BODIES
def test_a_few_steps_reduce_l1_on_a_tiny_batch(cfg):
    torch.manual_seed(0)
    net = IRN(cfg)
    gt = _faces(4, 16, seed=1)
    noise = torch.randn(gt.shape, generator=torch.Generator().manual_seed(2))
    x_d = F.avg_pool2d(gt, 3, 1, 1, count_include_pad=False) + 0.05 * noise
    opt = torch.optim.Adam(net.parameters(), lr=4e-3)
    start = (net(x_d) - gt).abs().mean().item()
    for _ in range(40):
        loss = (net(x_d) - gt).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = (net(x_d) - gt).abs().mean().item()
    assert start == pytest.approx((x_d - gt).abs().mean().item())
    assert end < 0.75 * start


def _trained_conv() -> IRN:
    """A tiny conv IRN with every weight non-zero, as a trained one has: a grown copy equal to it is not trivial."""
    torch.manual_seed(0)
    net = IRN(TINY_CONV)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    return net


def test_deepened_irn_computes_the_same_and_trains_its_new_blocks():
    small = _trained_conv()
    big = deepened(small, (2, 3))
    x = _faces()
    assert torch.equal(big(x), small(x))
    n_small, n_big = (sum(p.numel() for p in m.parameters()) for m in (small, big))
    conv = lambda c: 9 * c * c + c  # noqa: E731 - weights and bias of a 3x3 c -> c conv
    assert n_big - n_small == 2 * conv(8) + 2 * 2 * conv(16)  # one new block of 8 channels, two of 16
    big(x).square().mean().backward()
    new_conv2 = big.body.enc[1][2].conv2.weight
    assert torch.count_nonzero(new_conv2) == 0 and new_conv2.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least its blocks"):
        deepened(small, (1, 0))


def test_widened_irn_computes_the_same_and_trains_its_new_channels():
    small = _trained_conv()
    wide = widened(small, (12, 20))
    x = _faces()
    torch.testing.assert_close(wide(x), small(x), atol=1e-6, rtol=0)
    assert wide.cfg.channels == (12, 20) and wide.cfg.blocks == small.cfg.blocks
    head, mid = wide.body.head.weight, wide.body.enc[1][0].conv1.weight  # [12,3,3,3], [20,20,3,3]
    assert torch.equal(head[:8], small.body.head.weight) and head[8:].abs().sum() > 0
    assert torch.count_nonzero(mid[:16, 16:]) == 0
    wide(x).square().mean().backward()
    assert mid.grad[:16, 16:].abs().sum() > 0  # the zero weights from the new channels are what training grows
    assert torch.count_nonzero(wide.tail.weight[:, 8:]) == 0 and wide.tail.weight.grad[:, 8:].abs().sum() > 0
    with pytest.raises(ValueError, match="at least its channels"):
        widened(small, (8, 12))


def test_default_conv_irn_size_and_receptive_field():
    net = IRN(IRNConfig())
    n = sum(p.numel() for p in net.parameters())
    assert n == 1_551_747  # sized for CPU training
    assert sum(p.numel() for p in IRN(IRNConfig(blocks=(1, 2, 8))).parameters()) == 2_806_275  # the deeper one
    torch.nn.init.normal_(net.tail.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    x = torch.zeros(1, 3, 128, 128, requires_grad=True)
    net(x)[0, :, 64, 64].sum().backward()
    reach = x.grad.abs().sum((0, 1)).nonzero()
    # a 16-px LQ face (s = 8) upsampled to 128 spreads a detail over ~16 px; the net sees > 3x that
    assert (reach[:, 0].max() - reach[:, 0].min()).item() >= 48
    assert (reach[:, 1].max() - reach[:, 1].min()).item() >= 48


def test_conv_irn_rejects_sizes_it_cannot_pool():
    with pytest.raises(ValueError, match="divisible by 4"):
        IRN(IRNConfig())(torch.zeros(1, 3, 30, 30))


def test_swin_pads_to_whole_windows():
    torch.manual_seed(0)
    net = IRN(TINY_SWIN)
    torch.nn.init.normal_(net.tail.weight, std=0.05)
    x = _faces(1, 18)
    assert net(x).shape == (1, 3, 18, 18)
    # the body sees the 20x20 reflect-padded input and its 18x18 corner is kept
    with torch.no_grad():
        torch.testing.assert_close(net.body(x), net.body(F.pad(x, (0, 2, 0, 2), mode="reflect"))[..., :18, :18])


def test_window_partition_round_trip_and_layout():
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.float32).view(2, 8, 8, 3)
    win = window_partition(x, 4)
    assert win.shape == (8, 16, 3)
    torch.testing.assert_close(win[1].view(4, 4, 3), x[0, :4, 4:])  # second window: top-right block
    torch.testing.assert_close(window_reverse(win, 4, 8, 8), x)


def test_relative_position_index_closed_form():
    w = 3
    idx = relative_position_index(w)
    assert idx.shape == (9, 9)
    centre = (w - 1) * (2 * w - 1) + (w - 1)  # zero offset
    assert torch.all(idx.diagonal() == centre)
    assert torch.all(idx + idx.T == 2 * centre)  # offset (dy, dx) and (-dy, -dx) mirror around the centre
    assert idx[0, 8].item() == 0 and idx[8, 0].item() == (2 * w - 1) ** 2 - 1  # most negative / positive offsets
    assert idx.unique().numel() == (2 * w - 1) ** 2


def test_shift_mask_blocks_wrapped_neighbours():
    m = shift_attention_mask(8, 8, 4, 2)
    assert m.shape == (4, 16, 16)
    assert torch.all(m[0] == 0)  # the top-left window holds one region only
    # bottom-right window mixes four regions of 2x2 pixels each: 4 * 4 allowed pairs per query... of 16
    assert (m[3] == 0).sum().item() == 4 * 4 * 4
    assert set(m.unique().tolist()) == {0.0, -100.0}


def test_shifted_block_does_not_attend_across_the_wrap():
    torch.manual_seed(0)
    blk = SwinBlock(dim=8, heads=2, window=4, shift=2, mlp_ratio=2.0).eval()
    x = torch.randn(1, 8, 8, 8)
    base = blk(x)
    kick = torch.randn(8)  # not a constant: LayerNorm would remove that
    far = x.clone()
    far[0, 0, 0] += 3 * kick  # shares a shifted window with (7, 7) only through the cyclic wrap
    near = x.clone()
    near[0, 6, 6] += 3 * kick  # same window and same region as (7, 7)
    torch.testing.assert_close(blk(far)[0, 7, 7], base[0, 7, 7], rtol=0, atol=1e-6)
    assert (blk(near)[0, 7, 7] - base[0, 7, 7]).abs().max() > 1e-3


def test_config_from_json_lists_and_validation():
    cfg = IRNConfig(**json.loads(json.dumps(dataclasses.asdict(TINY_SWIN))))
    assert cfg == TINY_SWIN and isinstance(cfg.depths, tuple)
    with pytest.raises(ValueError, match="body"):
        IRNConfig(body="unet")
    with pytest.raises(ValueError, match="divisible"):
        IRNConfig(embed_dim=10, num_heads=(3,), depths=(2,))


def test_upsample_mode_keeps_the_weights_and_changes_only_the_way_up():
    torch.manual_seed(0)
    near = IRN(TINY_CONV)
    torch.nn.init.normal_(near.tail.weight, std=0.05)
    lin = IRN(dataclasses.replace(TINY_CONV, upsample="bilinear"))
    lin.load_state_dict(near.state_dict())  # same tensors: a trained IRN is fine-tuned with the other mode
    x = _faces(2, 16)
    a, b = near(x), lin(x)
    assert 1e-4 < (a - b).abs().mean() < (a - x).abs().mean()
    with pytest.raises(ValueError, match="upsample"):
        IRNConfig(upsample="bicubic")


@BODIES
def test_load_irn_round_trip_and_wrong_kind(cfg, tmp_path):
    torch.manual_seed(0)
    net = IRN(cfg)
    torch.nn.init.normal_(net.tail.weight, std=0.05)
    save_checkpoint(tmp_path / "irn", net, cfg, "irn")
    back = load_irn(tmp_path / "irn")
    x = _faces(1, 16)
    torch.testing.assert_close(back(x), net(x))
    assert not any(p.requires_grad for p in back.parameters()) and not back.training
    assert load_irn(tmp_path / "irn", dtype=torch.bfloat16).tail.weight.dtype == torch.bfloat16
    save_checkpoint(tmp_path / "other", net, cfg, "vqgan")
    with pytest.raises(CheckpointError, match="expected 'irn'"):
        load_irn(tmp_path / "other")
