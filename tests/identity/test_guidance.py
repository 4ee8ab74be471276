import torch
import torch.nn.functional as F

from clrface.checkpoint import save_checkpoint
from clrface.identity.guidance import LatentMask, MaskConfig, identity_guided, load_mask


def _toy(seed: int = 0):
    """A linear 'decoder' and a linear 'recogniser': 1 - cos is smooth and its gradient easy to check."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(3 * 4 * 4, 3 * 8 * 8, generator=g, dtype=torch.float64) * 0.3
    w_fr = torch.randn(3 * 8 * 8, 16, generator=g, dtype=torch.float64) * 0.3
    decode = lambda z: (z.flatten(1) @ w_dec).view(-1, 3, 8, 8)  # noqa: E731
    embed = lambda x: x.flatten(1) @ w_fr  # noqa: E731
    denoise = lambda x, s: 0.5 * x  # noqa: E731
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    e_id = F.normalize(torch.randn(2, 16, generator=g, dtype=torch.float64), dim=-1)
    return decode, embed, denoise, x, e_id


def _id_loss(decode, embed, z, e_id):
    return 1 - (F.normalize(embed(decode(z)), dim=-1) * e_id).sum(-1)


def test_scale_zero_is_denoise_exactly():
    decode, embed, denoise, x, e_id = _toy()
    sigma = torch.full((2,), 0.7, dtype=torch.float64)
    out = identity_guided(denoise, None, decode, embed, e_id, 0.0)(x, sigma)
    assert torch.equal(out, denoise(x, sigma))


def test_guided_update_is_the_scaled_gradient_and_lowers_the_loss():
    decode, embed, denoise, x, e_id = _toy()
    sigma = torch.full((2,), 0.7, dtype=torch.float64)
    x0 = denoise(x, sigma)
    scale = 1e-2
    with torch.no_grad():  # the sampler's context: guidance must open its own autograd island
        out = identity_guided(denoise, None, decode, embed, e_id, scale)(x, sigma)
    z = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_id_loss(decode, embed, z, e_id).sum(), z)
    torch.testing.assert_close(out, x0 - scale * grad)
    before, after = _id_loss(decode, embed, x0, e_id), _id_loss(decode, embed, out, e_id)
    # first order: the decrease equals scale * |grad|^2 per face (a small step, so within 10 %)
    torch.testing.assert_close(before - after, scale * grad.flatten(1).pow(2).sum(1), rtol=0.1, atol=0)
    assert (after < before).all()


def test_a_scale_per_face_acts_on_each_face_alone():
    decode, embed, denoise, x, e_id = _toy()
    sigma = torch.full((2,), 0.7, dtype=torch.float64)
    per_face = identity_guided(denoise, None, decode, embed, e_id, torch.tensor([0.0, 3e-2]))(x, sigma)
    one = identity_guided(denoise, None, decode, embed, e_id, 3e-2)(x, sigma)
    assert torch.equal(per_face[0], denoise(x, sigma)[0])
    torch.testing.assert_close(per_face[1], one[1])
    zero = identity_guided(denoise, None, decode, embed, e_id, torch.zeros(2))(x, sigma)
    assert torch.equal(zero, denoise(x, sigma))


def test_mask_gates_the_update():
    decode, embed, denoise, x, e_id = _toy()
    sigma = torch.full((2,), 0.7, dtype=torch.float64)
    x0 = denoise(x, sigma)
    m = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    m[..., :2, :] = 1.0  # top half may change, bottom half must not
    out = identity_guided(denoise, lambda z, s: m, decode, embed, e_id, 0.05)(x, sigma)
    full = identity_guided(denoise, None, decode, embed, e_id, 0.05)(x, sigma)
    assert torch.equal(out[..., 2:, :], x0[..., 2:, :])
    torch.testing.assert_close(out[..., :2, :], full[..., :2, :])
    assert (out[..., :2, :] - x0[..., :2, :]).abs().max() > 1e-6


def test_latent_mask_range_sigma_dependence_and_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = MaskConfig(latent_channels=3, hidden_channels=8, num_layers=2)
    net = LatentMask(cfg)
    x = torch.randn(2, 3, 8, 8)
    m1, m2 = net(x, torch.tensor([0.1, 0.1])), net(x, torch.tensor([5.0, 5.0]))
    assert m1.shape == (2, 1, 8, 8) and m1.min() > 0 and m1.max() < 1
    assert (m1 - m2).abs().max() > 1e-4  # the c_noise channel reaches the output
    # a closed form: one conv with zero weights and bias b gives sigmoid(b) everywhere
    one = LatentMask(MaskConfig(num_layers=1, use_sigma=False))
    torch.nn.init.zeros_(one.net[0].weight)
    torch.nn.init.constant_(one.net[0].bias, 2.0)
    torch.testing.assert_close(one(x), torch.full((2, 1, 8, 8), 1 / (1 + torch.exp(torch.tensor(-2.0)))))
    save_checkpoint(tmp_path / "mask", net, cfg, "mask")
    back = load_mask(tmp_path / "mask")
    assert back.config == cfg and not any(p.requires_grad for p in back.parameters())
    torch.testing.assert_close(back(x, torch.tensor(0.1)), m1)
