import copy

import pytest
import torch

from clrface.errors import ClrfaceError
from clrface.identity.arcface import (
    ARCFACE_TEMPLATE5,
    FFHQ_ARCFACE5,
    ArcFaceRecognizer,
    ffhq_arcface_affine,
    iresnet50,
    iresnet100,
    load_arcface,
)


@pytest.fixture(scope="module")
def r50() -> ArcFaceRecognizer:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = iresnet50()
    # Non-trivial BN statistics so that a round trip has to carry buffers, not only parameters.
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):  # insightface's N(0, 0.1) init overflows fp32 over 24 untrained blocks
            torch.nn.init.kaiming_normal_(m.weight, a=0.25)
            m.weight.data *= 0.5
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return ArcFaceRecognizer(net).eval().requires_grad_(False)


def _images(n: int = 2, size: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _closed_form_count(layers: tuple[int, ...]) -> int:
    """Parameters of insightface's IResNet, block by block (BN: weight+bias, PReLU: one per channel)."""
    n, cin = 3 * 64 * 9 + 2 * 64 + 64, 64
    for c, blocks in zip((64, 128, 256, 512), layers):
        for j in range(blocks):
            ci = cin if j == 0 else c
            n += 2 * ci + 9 * ci * c + 2 * c + c + 9 * c * c + 2 * c
            if j == 0:
                n += ci * c + 2 * c  # 1x1 stride-2 shortcut + BN
        cin = c
    return n + 2 * 512 + 512 * 49 * 512 + 512 + 2 * 512


def test_architectures_match_insightface_layout():
    net = iresnet50()
    # 43.6 M and 65.2 M parameters, the sizes of insightface's r50/r100 backbone.pth files (174/261 MB fp32).
    assert _count(net) == _closed_form_count((3, 4, 14, 3)) == 43_590_848
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 14, 3]
    keys = net.state_dict().keys()
    for k in ("conv1.weight", "prelu.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
              "layer4.2.bn3.bias", "bn2.weight", "fc.weight", "features.running_mean"):
        assert k in keys
    assert net.fc.weight.shape == (512, 512 * 7 * 7)
    big = iresnet100()
    assert [len(getattr(big, f"layer{i}")) for i in range(1, 5)] == [3, 13, 30, 3]
    assert _count(big) == _closed_form_count((3, 13, 30, 3)) == 65_156_160


def test_embed_shape_norm_determinism(r50: ArcFaceRecognizer):
    x = _images()
    with torch.no_grad():
        e = r50.embed(x)
        assert e.shape == (2, 512)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
        assert torch.equal(r50.embed(x), e)
        torch.testing.assert_close(r50.embed(x[:1]), e[:1])  # eval BN: no batch coupling
        assert r50.chip(x).shape == (2, 3, 112, 112)


def test_state_dict_round_trip(r50: ArcFaceRecognizer, tmp_path):
    path = tmp_path / "backbone.pth"
    # insightface saves the bare backbone state dict; DataParallel copies carry "module." prefixes.
    torch.save({f"module.{k}": v for k, v in r50.backbone.state_dict().items()}, path)
    loaded = load_arcface(path, "iresnet50")
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), r50.embed(x))
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ClrfaceError, match="iresnet100"):
        load_arcface(path, "iresnet100")
    with pytest.raises(ClrfaceError, match="missing.pth"):
        load_arcface(tmp_path / "missing.pth")


def test_gradient_reaches_image(r50: ArcFaceRecognizer):
    """The whole path (warp to the chip, network, normalisation) is differentiated: the gradient along a random
    direction equals the loss's central difference, in float64."""
    net = copy.deepcopy(r50).double().eval()
    g = torch.Generator().manual_seed(2)
    x = _images(1).double().requires_grad_()
    target = torch.nn.functional.normalize(torch.randn(1, 512, generator=g, dtype=torch.float64), dim=-1)

    def loss(img: torch.Tensor) -> torch.Tensor:
        return 1 - (net.embed(img) * target).sum()

    loss(x).backward()
    v, eps = torch.randn(x.shape, generator=g, dtype=torch.float64), 1e-7  # small: few PReLU kinks crossed
    with torch.no_grad():
        numeric = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    assert x.grad.abs().sum() > 0 and (x.grad * v).sum().item() == pytest.approx(numeric.item(), rel=1e-4)


def test_ffhq_warp_puts_landmarks_on_template(r50: ArcFaceRecognizer):
    # Bright dots at the FFHQ positions of the five points land near insightface's template in the chip.
    s = 256
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    chips = []
    for ux, uy in FFHQ_ARCFACE5:
        img = torch.exp(-((xx - ux * s) ** 2 + (yy - uy * s) ** 2) / (2 * 3.0**2)) * 2 - 1
        chips.append(r50.chip(img.expand(1, 3, s, s))[0, 0])
    aff = ffhq_arcface_affine()
    lm = torch.tensor(FFHQ_ARCFACE5, dtype=torch.float64)
    residual = (torch.tensor(ARCFACE_TEMPLATE5, dtype=torch.float64) @ aff[:, :2].T + aff[:, 2] - lm).norm(dim=-1)
    assert residual.max() < 0.03  # least-squares fit: the mean face is close to a similarity of the template
    for chip, (tx, ty) in zip(chips, ARCFACE_TEMPLATE5):
        idx = int(chip.argmax())
        py, px = divmod(idx, 112)
        assert abs(px - tx) < 3.5 and abs(py - ty) < 3.5
