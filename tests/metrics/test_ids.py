import pytest
import torch
import torch.nn.functional as F

from clrface.identity.facerec import load_facerec
from clrface.metrics.evaluate import evaluate_tensors
from clrface.metrics.ids import IDS, IDS_BLUR_SIGMA, cosine, ids, low_pass


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


def test_low_pass_keeps_constants_and_removes_the_finest_grid():
    flat = torch.full((1, 3, 128, 128), 0.3)
    torch.testing.assert_close(low_pass(flat, IDS_BLUR_SIGMA), flat)
    assert low_pass(flat, 0.0) is flat
    # a 4-px checkerboard (2 px on, 2 off), the pattern of nearest 2x2 upsampling: a Gaussian of std 1 px keeps
    # exp(-2 pi^2 sigma^2 f^2) per axis at f = 1/4, 0.29, of its amplitude, 0.08 in 2-D
    t = (torch.arange(128) // 2) % 2 * 2.0 - 1
    grid = (t[:, None] * t[None, :]).expand(1, 3, 128, 128)
    kept = low_pass(grid, 1.0)[..., 8:-8, 8:-8].abs().max().item()
    assert 0.03 < kept < 0.15
    # the std scales with the crop: the same grid at 256 px (8-px period) is damped as much, up to the sampling of
    # the kernel (0.12 against 0.08), not left at the 0.76 a fixed 1-px std keeps of it
    up = grid.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert 0.03 < low_pass(up, 1.0)[..., 16:-16, 16:-16].abs().max().item() < 0.15


def test_ids_blur_is_a_metric_of_evaluate_and_scores_the_blurred_faces(real_val_faces):
    fr = load_facerec()
    x = real_val_faces[:4]
    t = (torch.arange(x.shape[-1]) // 2) % 2 * 2.0 - 1
    gridded = (x + 0.15 * t[:, None] * t[None, :]).clamp(-1, 1)  # the clean face under a 4-px grid
    res = evaluate_tensors(gridded, x, metrics=("ids", "ids_blur"), facerec=fr)
    direct = ids(low_pass(gridded, IDS_BLUR_SIGMA), low_pass(x, IDS_BLUR_SIGMA), fr.embed).mean().item()
    assert res["ids_blur"] == pytest.approx(direct, abs=1e-4)
    # the grid costs identity in full view; through the blur the faces are nearly the same again
    assert res["ids"] < 0.99 and res["ids_blur"] > res["ids"]
