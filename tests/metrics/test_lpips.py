import pytest
import torch
import torch.nn.functional as F

from clrface.identity.facerec import load_facerec, perceptual_distance
from clrface.metrics.lpips import FacerecPerceptualMeter, LPIPSMeter, MetricUnavailable, load_lpips

_ALEX_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}


@pytest.fixture()
def fake_alex_files(tmp_path):
    """Random weights in the exact layouts of torchvision's alexnet checkpoint and lpips' alex.pth."""
    g = torch.Generator().manual_seed(0)
    sb = {}
    for i, (co, ci, k) in _ALEX_CONVS.items():
        sb[f"features.{i}.weight"] = torch.randn(co, ci, k, k, generator=g) / (ci * k * k) ** 0.5
        sb[f"features.{i}.bias"] = torch.randn(co, generator=g) * 0.1
    sb["classifier.1.weight"] = torch.zeros(4, 4)  # present in the real file, ignored
    sl = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(sb, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(sl, tmp_path / "alex.pth")
    return tmp_path, sb, sl


def _reference_lpips(a, b, sb, sl):
    """LPIPS v0.1 written out with functional ops, independent of the module under test."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(x):
        x = (x - shift) / scale
        w = lambda i: (sb[f"features.{i}.weight"], sb[f"features.{i}.bias"])  # noqa: E731
        f1 = F.relu(F.conv2d(x, *w(0), stride=4, padding=2))
        f2 = F.relu(F.conv2d(F.max_pool2d(f1, 3, 2), *w(3), padding=2))
        f3 = F.relu(F.conv2d(F.max_pool2d(f2, 3, 2), *w(6), padding=1))
        f4 = F.relu(F.conv2d(f3, *w(8), padding=1))
        f5 = F.relu(F.conv2d(f4, *w(10), padding=1))
        return [f1, f2, f3, f4, f5]

    total = 0
    for k, (x, y) in enumerate(zip(feats(a), feats(b))):
        x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
        y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
        total = total + ((x - y) ** 2 * sl[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
    return total


def test_lpips_loads_real_layout_and_matches_formula(fake_alex_files):
    d, sb, sl = fake_alex_files
    model = load_lpips("alex", d)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        out = model(a, b)
    torch.testing.assert_close(out, _reference_lpips(a, b, sb, sl), rtol=1e-5, atol=1e-6)
    assert (out > 0).all()
    assert model(a, a).abs().max().item() == 0.0


_VGG_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
              17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}


def test_lpips_vgg_loads_real_layout_and_matches_formula(tmp_path):
    g = torch.Generator().manual_seed(3)
    sb = {}
    for i, (ci, co) in _VGG_CONVS.items():
        sb[f"features.{i}.weight"] = torch.randn(co, ci, 3, 3, generator=g) / (ci * 9) ** 0.5
        sb[f"features.{i}.bias"] = torch.randn(co, generator=g) * 0.1
    sl = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(sb, tmp_path / "vgg16-397923af.pth")
    torch.save(sl, tmp_path / "vgg.pth")
    model = load_lpips("vgg", tmp_path)
    a, b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1

    def feats(x):  # VGG16's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, written out
        x = (x - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).view(
            1, 3, 1, 1)
        out = []
        for stage in ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)):
            if out:
                x = F.max_pool2d(x, 2, 2)
            for i in stage:
                x = F.relu(F.conv2d(x, sb[f"features.{i}.weight"], sb[f"features.{i}.bias"], padding=1))
            out.append(x)
        return out

    want = 0
    for k, (x, y) in enumerate(zip(feats(a), feats(b))):
        x, y = x / (x.norm(dim=1, keepdim=True) + 1e-10), y / (y.norm(dim=1, keepdim=True) + 1e-10)
        want = want + ((x - y) ** 2 * sl[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
    with torch.no_grad():
        torch.testing.assert_close(model(a, b), want, rtol=1e-5, atol=1e-6)


def test_lpips_meter_accepts_uint8(fake_alex_files):
    model = load_lpips("alex", fake_alex_files[0])
    g = torch.Generator().manual_seed(2)
    u, v = (torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g) for _ in range(2))
    m = LPIPSMeter(model)
    with pytest.raises(ValueError, match="no images"):
        m.compute()
    got = m.update(u, v)
    with torch.no_grad():
        want = model(u.float() / 127.5 - 1, v.float() / 127.5 - 1).double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert m.compute() == pytest.approx(float(want.mean())) and m.n == 2


def test_missing_weights_name_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(MetricUnavailable) as e:
        load_lpips("alex", tmp_path / "w")
    msg = str(e.value)
    assert str(tmp_path / "w" / "alexnet-owt-7be5be79.pth") in msg and str(tmp_path / "w" / "alex.pth") in msg
    # the backbone alone in the torch hub cache is found there; only the linear file is then missing
    (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({}, tmp_path / "th" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    with pytest.raises(MetricUnavailable) as e:
        load_lpips("alex", tmp_path / "w")
    assert "alexnet-owt" not in str(e.value) and "alex.pth" in str(e.value)


def test_facerec_perceptual_meter_is_the_mean_distance(real_val_faces):
    fr = load_facerec()
    m = FacerecPerceptualMeter(fr)
    x = real_val_faces[:2]
    assert m.update(x, x).abs().max().item() == 0.0
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)  # the meter takes files' uint8 too
    flipped = m.update(u8.flip(-1), u8)
    with torch.no_grad():
        want = perceptual_distance(fr, u8.flip(-1).float() / 127.5 - 1, u8.float() / 127.5 - 1).double()
    torch.testing.assert_close(flipped, want)
    assert (flipped > 0).all() and m.compute() == pytest.approx(float(want.sum()) / 4)
