import torch

from clrface.checkpoint import save_checkpoint
from clrface.errors import CheckpointError
from clrface.vqgan.model import VQGAN, VQGANConfig
from clrface.vqgan.rest import RestEncoder, load_rest_encoder

CFG = VQGANConfig(resolution=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, codebook_size=16)


def test_starts_as_the_encoder_of_x_id_and_round_trips(tmp_path):
    torch.manual_seed(0)
    vq = VQGAN(CFG).eval()
    rest = RestEncoder.from_vqgan(vq).eval()
    g = torch.Generator().manual_seed(1)
    x_d, x_id = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(rest(x_d, x_id), vq.encode(x_id), atol=1e-6, rtol=0)
        assert rest(x_d, x_id).shape == (2, 3, 8, 8)
    save_checkpoint(tmp_path / "rest", rest, CFG, "rest_encoder")
    loaded = load_rest_encoder(tmp_path / "rest")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_d, x_id), rest(x_d, x_id))
    save_checkpoint(tmp_path / "vq", vq, CFG, "vqgan")
    try:
        load_rest_encoder(tmp_path / "vq")
    except CheckpointError as e:
        assert "vqgan" in str(e)
    else:
        raise AssertionError("a vqgan checkpoint loaded as a rest encoder")
