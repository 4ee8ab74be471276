import pytest
import torch
import torch.nn.functional as F

from clrface.identity.facerec import load_facerec
from clrface.metrics.ids import IDS, cosine, ids


def _fake_embed(x: torch.Tensor) -> torch.Tensor:
    # a deterministic "network": mean colour per channel plus a constant, so embeddings are never zero
    return torch.cat([x.mean((2, 3)), torch.ones(len(x), 1)], 1)


def test_ids_identical_is_one():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert ids(x, x, _fake_embed).tolist() == pytest.approx([1.0] * 3, abs=1e-12)


def test_cosine_closed_form():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [6.0, 8.0], [-1.0, -1.0]])
    assert cosine(a, b).tolist() == pytest.approx([0.0, 1.0, -1.0])


def test_ids_matches_definition_and_meter_means():
    g = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    v = ids(pred, gt, _fake_embed)
    ref = F.cosine_similarity(_fake_embed(pred), _fake_embed(gt), dim=-1).double()
    torch.testing.assert_close(v, ref)
    m = IDS(_fake_embed)
    m.update(pred[:3], gt[:3])
    m.update(pred[3:], gt[3:])
    assert m.n == 4 and m.compute() == pytest.approx(float(ref.mean()))


def test_ids_real_network_identical_and_degraded(real_val_faces):
    fr = load_facerec()
    x = real_val_faces[:4]
    same = ids(x, x, fr.embed)
    assert same.tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    blurred = F.interpolate(F.interpolate(x, scale_factor=1 / 8, mode="area"), size=x.shape[-2:], mode="bilinear")
    worse = ids(blurred, x, fr.embed)
    assert (worse < 0.99).all() and (worse > 0.5).all()
