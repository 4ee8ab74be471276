import numpy as np
import pytest
import torch

from clrface.background import (
    RealESRGANUpscaler,
    RRDBNet,
    RRDBNetConfig,
    infer_rrdbnet_config,
    lanczos_upscale,
    load_rrdbnet,
    tile_spans,
    tiled_apply,
)
from clrface.errors import CheckpointError, ClrfaceError

TINY = dict(num_feat=8, num_block=2, num_grow_ch=4)


def test_tile_spans_cover_exactly_with_overlap():
    assert tile_spans(100, 128, 16) == [(0, 100)]
    spans = tile_spans(300, 128, 16)
    assert spans[0] == (0, 128) and spans[-1] == (172, 300)
    assert all(b - a == 128 for a, b in spans)
    assert all(s1[0] < s0[1] for s0, s1 in zip(spans, spans[1:]))  # consecutive windows overlap
    with pytest.raises(ValueError, match="tile 16 px must exceed the overlap 16 px"):
        tile_spans(300, 16, 16)  # windows that would not advance


def test_upscaler_refuses_tiles_that_would_be_mostly_overlap():
    net = RRDBNet(RRDBNetConfig(scale=2, **TINY)).eval()
    with pytest.raises(ClrfaceError, match="background tile 63 px must be at least 64 px"):
        RealESRGANUpscaler(net, tile=63)
    assert RealESRGANUpscaler(net, tile=64).tile == 64


def test_tiled_apply_equals_whole_for_a_pointwise_net():
    x = torch.rand(1, 3, 70, 90)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest") * 0.5  # noqa: E731
    torch.testing.assert_close(tiled_apply(up, x, 2, tile=32, overlap=8), up(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_rrdbnet_shapes_and_config_roundtrip(tmp_path, scale):
    torch.manual_seed(0)
    net = RRDBNet(RRDBNetConfig(scale=scale, **TINY)).eval()
    y = net(torch.rand(1, 3, 16, 20))
    assert y.shape == (1, 3, 16 * scale, 20 * scale)
    assert infer_rrdbnet_config(net.state_dict()) == net.config
    # released checkpoints wrap the weights in "params_ema"
    torch.save({"params_ema": net.state_dict()}, tmp_path / "w.pth")
    loaded = load_rrdbnet(tmp_path / "w.pth")
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), net(x))


def test_realesrgan_upscaler_tiles_match_one_pass_and_resample_to_factor():
    torch.manual_seed(0)
    net = RRDBNet(RRDBNetConfig(scale=2, **TINY)).eval()
    photo = (np.random.default_rng(0).random((37, 50, 3)) * 255).astype(np.uint8)
    whole = RealESRGANUpscaler(net, tile=1024)(photo, 2)
    tiled = RealESRGANUpscaler(net, tile=16, overlap=4)(photo, 2)
    assert whole.shape == tiled.shape == (74, 100, 3)
    # a conv net's receptive field crosses tile borders, so tiles differ near seams only, and only slightly
    assert np.abs(whole.astype(int) - tiled.astype(int)).mean() < 3
    assert RealESRGANUpscaler(net)(photo, 3).shape == (111, 150, 3)
    assert np.array_equal(RealESRGANUpscaler(net)(photo, 1), photo)


def test_lanczos_and_bad_weights(tmp_path):
    photo = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    same = lanczos_upscale(photo, 1)
    assert np.array_equal(same, photo) and same is not photo  # a copy: the result is not the caller's array
    assert (lanczos_upscale(np.full((10, 12, 3), 77, np.uint8), 3) == 77).all()
    ramp = np.repeat(np.repeat((np.arange(12) * 20)[None, :, None], 10, 0), 3, 2).astype(np.uint8)  # 0..220
    up = lanczos_upscale(ramp, 3).astype(float)
    assert up.shape == (30, 36, 3)
    x = (np.arange(36) + 0.5) / 3 - 0.5  # output pixel centres in input pixels: the ramp continued
    np.testing.assert_allclose(up[15, 6:30, 0], 20 * x[6:30], atol=1.5)  # away from the edges' clamping
    with pytest.raises(CheckpointError, match="no such file"):
        load_rrdbnet(tmp_path / "missing.pth")
    torch.save({"params": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Real-ESRGAN"):
        load_rrdbnet(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"can be read safely \(not a PyTorch .pth or .safetensors file; "):
        load_rrdbnet(tmp_path / "junk.pth")
    torch.save({"params": {"w": torch.zeros(1)}, "f": np.float64}, tmp_path / "pickled.pth")  # not plain tensors
    with pytest.raises(CheckpointError) as e:
        load_rrdbnet(tmp_path / "pickled.pth")
    assert str(e.value).endswith("(not a plain PyTorch file of tensors)") and "weights_only=False" not in str(e.value)
