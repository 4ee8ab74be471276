"""benchmarks/irn_new_channels.py: a just-widened IRN carries nothing in its new channels; grown weights do."""

import torch

from clrface.identity.irn import IRN, IRNConfig, widened

BASE = IRNConfig(channels=(8, 16), blocks=(1, 1))


def test_new_channel_share_is_zero_when_widened_and_grows_with_the_cross_weights(benchmark_script):
    mod = benchmark_script("irn_new_channels")
    torch.manual_seed(0)
    small = IRN(BASE)
    for p in small.parameters():
        p.data.normal_(0, 0.05)
    wide = widened(small, (12, 20))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert mod.new_channel_share(wide, BASE, x) == 0.0
    silent = mod.silenced(wide, BASE)
    torch.testing.assert_close(silent(x), small(x), atol=1e-6, rtol=0)
    with torch.no_grad():
        wide.tail.weight[:, 8:] = 0.05  # the new channels now reach the output
    share = mod.new_channel_share(wide, BASE, x)
    y, y0 = wide(x), silent(x)
    expected = ((y - y0).square().mean() / (y - x).square().mean()).sqrt().item()
    assert share > 0.01 and abs(share - expected) < 1e-6
