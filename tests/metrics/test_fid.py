import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import linalg

from clrface.metrics.fid import (
    FID,
    feature_stats,
    fid,
    fid_weights_path,
    folder_stats,
    frechet_distance,
    frechet_distance_of_set,
    inception_features,
    load_inception,
    resize_tf_bilinear,
)
from clrface.metrics.lpips import MetricUnavailable


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    ref = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(30, 8)), rng.normal(size=(25, 8)) * 1.3 + 0.2
    (m1, s1), (m2, s2) = feature_stats(f1), feature_stats(f2)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)


def test_frechet_distance_of_a_small_set_equals_the_full_computation():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64)) * 0.3
    m2, s2 = feature_stats(ref)
    for n in (12, 50, 90):  # fewer and more rows than dimensions
        f = rng.normal(size=(n, 64)) + 0.1
        assert frechet_distance_of_set(f, m2, s2) == pytest.approx(frechet_distance(*feature_stats(f), m2, s2),
                                                                   rel=1e-7)


def test_feature_stats_unbiased():
    f = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, s = feature_stats(f)
    assert mu.tolist() == [2.0, 2.0]
    assert s[0, 0] == pytest.approx(4.0) and s[1, 1] == pytest.approx(3.0) and s[0, 1] == pytest.approx(3.0)


def test_resize_tf1_bilinear_closed_form():
    # TF1 resize_bilinear (no half-pixel centres): out j samples in j * in/out, clamped at the edge
    x = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous()
    y = resize_tf_bilinear(x, 4)
    assert y[0, 0, 0].tolist() == pytest.approx([0.0, 5.0, 10.0, 10.0], abs=1e-5)
    assert y[0, 0, :, 1].tolist() == pytest.approx([5.0] * 4, abs=1e-5)


def test_resize_tf1_bilinear_128_to_299_matches_a_numpy_reference():
    # the size the FID protocol uses: TF1's separable interpolation written out in float64
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (1, 2, 128, 128)))

    def weights(n_in: int, n_out: int) -> np.ndarray:
        src = np.arange(n_out) * (n_in / n_out)
        lo = np.floor(src).astype(int)
        hi, frac = np.minimum(lo + 1, n_in - 1), src - lo
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - frac
        m[np.arange(n_out), hi] += frac
        return m

    m = weights(128, 299)
    want = np.einsum("oh,bchw,pw->bcop", m, x.numpy(), m)
    np.testing.assert_allclose(resize_tf_bilinear(x, 299).numpy(), want, atol=1e-9)


class _MeanColour(torch.nn.Module):
    """Stands in for Inception: 4 features per image, counts its calls."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        assert x.shape[-2:] == (299, 299) and x.min() >= -1 and x.max() <= 1 - 1 / 128 + 1e-6
        return torch.cat([x.mean((2, 3)), x.std((2, 3)).mean(1, keepdim=True)], 1)


def _write_folder(d, n, seed):
    d.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")


def test_folder_stats_cached_and_fid_of_same_set_zero(tmp_path):
    _write_folder(tmp_path / "a", 6, 0)
    net = _MeanColour()
    s1 = folder_stats(tmp_path / "a", net, weights=__file__, cache_dir=tmp_path / "cache")
    calls = net.calls
    s2 = folder_stats(tmp_path / "a", net, weights=__file__, cache_dir=tmp_path / "cache")
    assert net.calls == calls and "cache" in s2 and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    np.testing.assert_allclose(s1["mu"], s2["mu"])
    assert fid(tmp_path / "a", s1, model=net) == pytest.approx(0.0, abs=1e-9)
    # a copy elsewhere, with new modification times, is the same data: the cache holds; changed pixels miss it
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    calls = net.calls
    folder_stats(tmp_path / "copy", net, weights=__file__, cache_dir=tmp_path / "cache")
    assert net.calls == calls
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "copy" / "000.png")
    folder_stats(tmp_path / "copy", net, weights=__file__, cache_dir=tmp_path / "cache")
    assert net.calls > calls and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    # a stats .npz is accepted as the reference too
    assert fid(tmp_path / "a", s2["cache"], model=net, weights=__file__) == pytest.approx(0.0, abs=1e-9)
    # tensors and the accumulator agree with the folder path
    imgs = torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in sorted((tmp_path / "a").glob("*.png"))]))
    imgs = imgs.permute(0, 3, 1, 2)
    m = FID(net)
    m.update(imgs[:3])
    m.update(imgs[3:])
    assert m.n == 6 and m.compute(s1) == pytest.approx(0.0, abs=1e-9)
    # float [-1,1] input is rounded to 8 bit first, so it gives the same features
    f8 = inception_features(net, imgs)
    ff = inception_features(net, imgs.float() / 127.5 - 1)
    np.testing.assert_allclose(f8, ff, atol=1e-6)


def test_missing_weights_raise(tmp_path):
    with pytest.raises(MetricUnavailable, match="nope.pt"):
        fid_weights_path(tmp_path / "nope.pt")


def test_real_inception_features_are_pinned_and_self_fid_is_zero(real_val_faces):
    try:
        net = load_inception()
    except MetricUnavailable as e:
        pytest.skip(str(e))
    f = inception_features(net, real_val_faces[:4])
    assert f.shape == (4, 2048) and (f >= 0).all()  # pool3 after ReLU
    mu, s = feature_stats(f)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-3)
    # pinned: a change of weights, resize, input scaling or layer moves these
    assert f[0, :4] == pytest.approx([0.482489, 0.159983, 0.059074, 0.509972], rel=1e-3)
    assert f.mean() == pytest.approx(0.268313, rel=1e-4)
    assert frechet_distance(*feature_stats(f[:2]), *feature_stats(f[2:])) == pytest.approx(331.85, rel=1e-3)


def test_real_inception_fid_grows_with_blur(val_dir):
    """The real network ranks sets as FID is meant to: other faces of the same data set are closer to a
    reference than the same faces blurred, and more blur is farther still."""
    try:
        net = load_inception()
    except MetricUnavailable as e:
        pytest.skip(str(e))
    files = sorted(val_dir.glob("*.jpg"))[:48]
    ims = [Image.open(f).convert("RGB") for f in files]

    def stats(images):
        a = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()
        return feature_stats(inception_features(net, a))

    mu, s = stats(ims[:24])
    d = [frechet_distance(*stats([im.filter(ImageFilter.GaussianBlur(r)) if r else im for im in ims[24:]]), mu, s)
         for r in (0, 1.5, 4)]
    assert d[0] < d[1] < d[2]
    assert d[2] - d[0] > 50  # 24 faces carry a small-set bias of ~150 (measured 151, 259 at radius 4)
