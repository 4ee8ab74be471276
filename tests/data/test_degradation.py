import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import convolve

from clrface.data.degradation import (
    NO_JPEG,
    PRESETS,
    DegradationConfig,
    DegradationParams,
    apply_degradation,
    apply_degradation_batch,
    degrade,
    degrade_batch,
    gaussian_kernel,
    get_preset,
    sample_params,
)


def smooth_image(size: int = 64, seed: int = 0) -> np.ndarray:
    """A face-like test image: smooth colour blobs plus a few edges, uint8 [size, size, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for _ in range(6):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
        img += rng.uniform(20, 90, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))[..., None]
    img += 40 * (xx > 0.5)[..., None] + 30
    return np.clip(img, 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / max(mse, 1e-12))


def params(**kw) -> DegradationParams:
    base = dict(kernel_size=11, kernel_type="iso", sigma_x=1.0, sigma_y=1.0, angle=0.0, scale=1.0,
                down_mode="bicubic", noise_sigma=0.0, jpeg_q=NO_JPEG, gray=False)
    return DegradationParams(**{**base, **kw})


def to_torch(imgs: list[np.ndarray], dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(0, 2, 3, 1).double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


# ------------------------------------------------------------------- parameters


def test_params_stay_in_and_cover_the_paper_ranges():
    cfg = get_preset("bfr")
    rng = np.random.default_rng(0)
    ps = [sample_params(cfg, rng) for _ in range(10_000)]

    def check(values, lo, hi, slack):
        v = np.asarray(values, dtype=np.float64)
        assert v.min() >= lo and v.max() <= hi
        assert v.min() < lo + slack and v.max() > hi - slack  # covers both ends

    check([p.scale for p in ps], 1.0, 32.0, 0.1)
    check([p.noise_sigma for p in ps], 0.0, 20.0, 0.1)
    check([s for p in ps for s in (p.sigma_x, p.sigma_y)], 0.1, 10.0, 0.05)
    aniso = [p for p in ps if p.kernel_type == "aniso"]
    check([p.angle for p in aniso], -math.pi, math.pi, 0.01)
    qs = [p.jpeg_q for p in ps]
    assert all(isinstance(q, int) for q in qs)
    assert set(qs) == set(range(30, 91))  # integers, every quality drawn, both ends included
    assert 0.47 < len(aniso) / len(ps) < 0.53
    assert all(p.sigma_x == p.sigma_y and p.angle == 0.0 for p in ps if p.kernel_type == "iso")
    modes = [p.down_mode for p in ps]
    assert 0.47 < modes.count("bilinear") / len(ps) < 0.53 and set(modes) == {"bilinear", "bicubic"}
    assert {p.kernel_size for p in ps} == {41}
    # uniform: the mean of U[1, 32] is 16.5 (std of the mean over 10k draws ~0.09)
    assert abs(np.mean([p.scale for p in ps]) - 16.5) < 0.4


def test_params_are_json_serialisable_and_round_trip():
    p = sample_params(get_preset("x32"), np.random.default_rng(1))
    d = json.loads(json.dumps(p.to_dict()))
    assert DegradationParams.from_dict(d) == p
    assert p.jpeg_q == NO_JPEG and p.scale == 32.0  # x32: fixed scale, no JPEG
    assert sample_params(get_preset("gray"), np.random.default_rng(1)).gray is True


def test_scale_to_128_scales_only_spatial_ranges():
    c = get_preset("bfr", 128)
    assert c.size == 128 and c.scale == (1.0, 8.0) and c.kernel_size == 11
    assert c.blur_sigma == pytest.approx((0.025, 2.5))
    assert c.noise == (0.0, 20.0) and c.jpeg == (30, 90)
    assert get_preset("x32", 128).scale == (8.0, 8.0)  # ×32 at 512 px is ×8 at 128 px
    assert get_preset("x64", 128).scale == (16.0, 16.0)  # the "×16" test set: 8-px faces
    ext = get_preset("extreme", 128)
    assert ext.scale == (8.0, 16.0) and ext.jpeg is None and ext.noise == get_preset("bfr", 128).noise
    assert get_preset("bfr", 256).kernel_size == 21
    assert get_preset("bfr", 16).kernel_size == 3  # odd and >= 3 however small
    assert get_preset("bfr", 512) is PRESETS["bfr"]
    # the smallest LQ face is 16 px at both sizes
    assert 128 / c.scale[1] == 512 / PRESETS["bfr"].scale[1] == 16
    rng = np.random.default_rng(0)
    scales = [sample_params(c, rng).scale for _ in range(2000)]
    assert 1.0 <= min(scales) < 1.05 and 7.95 < max(scales) <= 8.0


def test_config_validates_and_accepts_yaml_lists():
    c = DegradationConfig(scale=[1, 4], noise=[0, 5], blur_sigma=[0.5, 1], jpeg=[50, 60], down_modes=["bicubic"])
    assert c.scale == (1, 4) and c.down_modes == ("bicubic",)
    hash(c)
    for bad, msg in ((dict(kernel_size=8), "kernel_size"), (dict(scale=(0.5, 2)), "scale >= 1"),
                     (dict(jpeg=(30, 120)), "jpeg quality"), (dict(down_modes=("nearest",)), "down_modes"),
                     (dict(noise=(5, 1)), "low <= high")):
        with pytest.raises(ValueError, match=msg):
            DegradationConfig(**bad)
    with pytest.raises(ValueError, match="unknown degradation preset"):
        get_preset("nope")


# ------------------------------------------------------------------- kernel


def test_kernel_sums_to_one_and_matches_separable_gaussian():
    k = gaussian_kernel(21, 2.0, 2.0)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    g = np.exp(-0.5 * (np.arange(21) - 10) ** 2 / 4.0)
    np.testing.assert_allclose(k, np.outer(g, g) / np.outer(g, g).sum(), atol=1e-14)
    tiny = gaussian_kernel(41, 0.025, 0.025)  # must not underflow to 0/0
    assert tiny[20, 20] == pytest.approx(1.0) and tiny.sum() == pytest.approx(1.0)


def test_anisotropic_kernel_has_the_rotated_covariance():
    sx, sy, th = 3.0, 1.5, 0.5
    k = gaussian_kernel(61, sx, sy, th)  # wide enough that truncation is negligible
    r = np.arange(61) - 30.0
    xx, yy = np.meshgrid(r, r, indexing="xy")
    cov = np.array([[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]])
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    np.testing.assert_allclose(cov, rot @ np.diag([sx**2, sy**2]) @ rot.T, atol=2e-3)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)  # point-symmetric: conv == correlation
    np.testing.assert_allclose(gaussian_kernel(21, 3.0, 1.5, math.pi / 2), gaussian_kernel(21, 1.5, 3.0), atol=1e-12)


# ------------------------------------------------------------------- numpy path


def test_same_seed_same_bytes_other_seed_other_output():
    img = smooth_image(64)
    cfg = get_preset("bfr", 64)
    a, pa = degrade(img, cfg, 7)
    b, pb = degrade(img, cfg, np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert a.tobytes() == b.tobytes() and pa == pb
    c, pc = degrade(img, cfg, 8)
    assert pc != pa and not np.array_equal(a, c)


def test_mild_parameters_leave_the_image_nearly_unchanged():
    img = smooth_image(96)
    out = apply_degradation(img, params(sigma_x=0.1, sigma_y=0.1, jpeg_q=100), 0)
    assert psnr(out, img) > 40
    np.testing.assert_array_equal(apply_degradation(img, params(sigma_x=0.1, sigma_y=0.1), 0), img)


def test_jpeg_step_is_pils_codec():
    # a blur too narrow to change a pixel and no resize leave JPEG alone: the output is PIL's quality-50 round trip
    img = smooth_image(96)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=50)
    want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    out = apply_degradation(img, params(sigma_x=0.1, sigma_y=0.1, jpeg_q=50), 0)
    np.testing.assert_array_equal(out, want)
    assert psnr(out, img) < 45  # quality 50 does change the image, so the comparison can tell


def test_blur_only_equals_reference_convolution():
    img = smooth_image(64)
    p = params(kernel_type="aniso", sigma_x=2.5, sigma_y=0.8, angle=0.7)
    k = gaussian_kernel(11, 2.5, 0.8, 0.7)
    # scipy's "mirror" is numpy's "reflect" (edge sample not repeated)
    ref = np.stack([convolve(img[..., c].astype(np.float64), k, mode="mirror") for c in range(3)], -1)
    out = apply_degradation(img, p, 0).astype(np.float64)
    assert np.abs(out - ref).max() <= 0.5 + 1e-3  # only the final rounding


def test_constant_image_stays_constant_through_resizes_and_blur():
    img = np.full((80, 80, 3), (30, 140, 220), np.uint8)
    for mode in ("bilinear", "bicubic"):
        for s in (1.0, 3.7, 16.0, 80.0):
            out = apply_degradation(img, params(scale=s, down_mode=mode, sigma_x=2.0, sigma_y=0.5, angle=1.0), 0)
            np.testing.assert_array_equal(out, img)


def test_noise_has_the_drawn_std():
    img = np.full((128, 128, 3), 128, np.uint8)
    out = apply_degradation(img, params(sigma_x=0.05, sigma_y=0.05, noise_sigma=10.0), 3).astype(np.float64)
    # rounding adds 1/12 to the variance
    assert (out - 128).std() == pytest.approx(math.sqrt(100 + 1 / 12), rel=0.02)
    assert abs((out - 128).mean()) < 0.2


def test_gray_preset_outputs_gray_and_downscale_reaches_lowres_size():
    img = smooth_image(64)
    out, p = degrade(img, get_preset("gray", 64), 4)
    assert p.gray and np.abs(out[..., 0].astype(int) - out[..., 1]).max() <= 1
    assert np.abs(out[..., 1].astype(int) - out[..., 2]).max() <= 1
    # ×16 leaves a 4x4 image: the upsampled result has no more detail than 4x4 samples
    x16 = apply_degradation(img, params(scale=16.0, sigma_x=0.05, sigma_y=0.05), 0)
    assert psnr(x16, img) < psnr(apply_degradation(img, params(scale=2.0, sigma_x=0.05, sigma_y=0.05), 0), img)


def test_apply_rejects_bad_input():
    with pytest.raises(ValueError):
        apply_degradation(np.zeros((8, 8), np.uint8), params(), 0)


# ------------------------------------------------------------------- torch path


def test_torch_path_shape_dtype_determinism():
    imgs = [smooth_image(64, s) for s in range(4)]
    cfg = get_preset("bfr", 64)
    for dtype in (torch.float32, torch.float64):
        x = to_torch(imgs, dtype)
        a, pa = degrade_batch(x, cfg, 11)
        b, pb = degrade_batch(x, cfg, torch.Generator().manual_seed(11))
        assert a.shape == x.shape and a.dtype == dtype and a.device == x.device
        assert torch.equal(a, b) and pa == pb
        assert a.min() >= -1 and a.max() <= 1
        # values are uint8 levels, like the numpy path's output
        lv = (a.double() + 1) * 127.5
        assert torch.allclose(lv, lv.round(), atol=1e-4)
    c, pc = degrade_batch(x, cfg, 12)
    assert pc != pa and not torch.equal(a.to(c.dtype), c)
    assert len({json.dumps(p.to_dict()) for p in pa}) == 4  # one draw per sample


def test_torch_and_numpy_agree_on_identical_parameters():
    imgs = [smooth_image(64, s) for s in range(6)]
    rng = np.random.default_rng(5)
    for preset in ("bfr", "gray", "x32"):
        cfg = get_preset(preset, 64)
        ps = [dataclasses.replace(sample_params(cfg, rng), noise_sigma=0.0) for _ in imgs]
        t = to_uint8(apply_degradation_batch(to_torch(imgs), ps, 0))
        n = np.stack([apply_degradation(im, p, 0) for im, p in zip(imgs, ps)])
        diff = np.abs(t.astype(int) - n)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (preset, diff.max(), (diff > 0).mean())


def test_torch_and_numpy_psnr_distributions_match():
    imgs = [smooth_image(64, s) for s in range(16)]
    cfg = get_preset("bfr", 64)
    _, ps = degrade_batch(to_torch(imgs), cfg, 3)
    t = to_uint8(apply_degradation_batch(to_torch(imgs), ps, 3))
    pt = np.array([psnr(a, b) for a, b in zip(t, imgs)])
    pn = np.array([psnr(apply_degradation(im, p, 100 + i), im) for i, (im, p) in enumerate(zip(imgs, ps))])
    # same parameters, different noise draws: paired PSNRs differ by a fraction of a dB
    assert np.abs(pt - pn).mean() < 0.3 and abs(pt.mean() - pn.mean()) < 0.2
    # the sampler is shared: parameters from degrade_batch follow sample_params exactly
    ref_rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3))))
    assert ps == [sample_params(cfg, ref_rng) for _ in imgs]


def test_torch_noise_has_the_drawn_std():
    x = torch.zeros(1, 3, 128, 128) + 128 / 127.5 - 1
    out = apply_degradation_batch(x, [params(sigma_x=0.05, sigma_y=0.05, noise_sigma=10.0)], 0)
    v = (out.double() + 1) * 127.5 - 128
    assert v.std().item() == pytest.approx(math.sqrt(100 + 1 / 12), rel=0.02)
