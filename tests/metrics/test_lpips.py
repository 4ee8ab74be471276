import pytest
import torch
import torch.nn.functional as F

from clrface.identity.facerec import load_facerec
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


def test_lpips_meter_accepts_uint8(fake_alex_files):
    model = load_lpips("alex", fake_alex_files[0])
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    m = LPIPSMeter(model)
    m.update(x, x)
    assert m.compute() == 0.0 and m.n == 2


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


def test_facerec_perceptual_meter_identical_zero(real_val_faces):
    m = FacerecPerceptualMeter(load_facerec())
    x = real_val_faces[:2]
    assert m.update(x, x).abs().max().item() == 0.0
    assert (m.update(x.flip(-1), x) > 0).all()
