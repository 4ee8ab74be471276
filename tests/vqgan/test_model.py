import torch

from clrface.checkpoint import load_weights, read_config, save_checkpoint
from clrface.vqgan.model import VQGAN, PatchDiscriminator, VQGANConfig
from clrface.vqgan.quantizer import VectorQuantizer, code_usage, nearest_code, straight_through

TINY = VQGANConfig(resolution=32, base_channels=16, channel_mult=(1, 2, 3), num_res_blocks=1, codebook_size=64)


def test_shapes_f4_and_latent_dim():
    m = VQGAN(TINY).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = m.encode(x)
    assert z.shape == (2, 3, 8, 8) and TINY.downsample == 4
    rec, commit, idx = m(x)
    assert rec.shape == x.shape and idx.shape == (2, 8, 8) and commit.ndim == 0


def test_paper_512_config_latent_is_3x128x128():
    cfg = VQGANConfig(resolution=512, base_channels=128, channel_mult=(1, 2, 3), num_res_blocks=2)
    assert cfg.resolution // cfg.downsample == 128 and cfg.codebook_size == 8192 and cfg.latent_channels == 3


def test_nearest_code_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(1000, 3, generator=g), torch.randn(300, 3, generator=g)
    brute = torch.cdist(z, cb).argmin(1)
    assert torch.equal(nearest_code(z, cb, chunk=128), brute)


def test_straight_through_value_and_gradient():
    z = torch.randn(4, 3, requires_grad=True)
    zq = torch.randn(4, 3)
    out = straight_through(z, zq)
    torch.testing.assert_close(out, zq)
    (out * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(3.0).expand(4, 3))


def test_quantizer_picks_nearest_code_and_commitment_value():
    q = VectorQuantizer(16, 3, beta=0.25).eval()
    q.codebook.copy_(torch.arange(48.0).view(16, 3))
    z = q.codebook[torch.tensor([3, 7])].clone() + 0.1  # 0.1 off codes 3 and 7
    zq, commit, idx = q(z.view(2, 3, 1, 1))
    assert idx.flatten().tolist() == [3, 7]
    torch.testing.assert_close(commit, torch.tensor(0.25 * 0.01))


def test_ema_codebook_moves_toward_assigned_vectors_and_restarts_dead_codes():
    q = VectorQuantizer(2, 2, decay=0.5, dead_after=2, eps=0.0).train()
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    q.embed_sum.copy_(q.codebook)
    q.initialized.fill_(True)
    z = torch.ones(4, 2, 1, 1)  # four vectors (1, 1), all nearest to code 0
    q(z)
    # cluster size 0.5*1 + 0.5*4 = 2.5, embed sum 0.5*0 + 0.5*4 = 2 -> code 0 at 2/2.5 = 0.8; code 1 unused
    assert torch.allclose(q.cluster_size, torch.tensor([2.5, 0.5]))
    assert torch.allclose(q.codebook, torch.tensor([[0.8, 0.8], [10.0, 10.0]]))
    q(z)
    # code 0: sum 0.5*2 + 0.5*4 = 3 over size 0.5*2.5 + 0.5*4 = 3.25; code 1 unused twice -> restarted at (1, 1)
    assert torch.allclose(q.codebook[0], torch.full((2,), 3.0 / 3.25))
    assert torch.equal(q.codebook[1], torch.ones(2)) and float(q.cluster_size[1]) == 1.0
    used, ppl = code_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert used == 2 and abs(ppl - 2.0) < 1e-6


def test_decode_is_nearest_code_then_decoder_with_straight_through_gradient():
    m = VQGAN(TINY).eval()
    z = torch.randn(1, 3, 8, 8, requires_grad=True)
    out = m.decode(z)
    idx = nearest_code(z.detach().permute(0, 2, 3, 1).reshape(-1, 3), m.quantizer.codebook).view(1, 8, 8)
    zq = m.quantizer.lookup(idx).detach().requires_grad_()
    ref = m.decoder(zq)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)  # z + (zq - z) rounds differently from zq
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(z.grad, zq.grad, atol=1e-4, rtol=1e-3)  # the gradient at the code, passed to z
    assert z.grad.abs().sum() > 0


def test_checkpoint_round_trip_bit_exact(tmp_path):
    m = VQGAN(TINY)
    m.quantizer.codebook.normal_()
    save_checkpoint(tmp_path / "ck", m, TINY, "vqgan")
    cfg, meta = read_config(tmp_path / "ck", "vqgan", VQGANConfig)
    assert cfg == TINY and meta["kind"] == "vqgan"
    m2 = load_weights(tmp_path / "ck", VQGAN(cfg))
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_discriminator_is_patchwise():
    d = PatchDiscriminator(8, 2)
    # 128 -> 64 (stride 2) -> 32 (stride 2) -> 31 -> 30 (4x4 kernels, stride 1, padding 1): one logit per patch
    assert d(torch.randn(1, 3, 128, 128)).shape == (1, 1, 30, 30)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 14, 14)
