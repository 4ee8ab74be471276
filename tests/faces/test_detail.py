"""Keep-detail estimates and blend: closed forms on synthetic images."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clrface.batch import restore_files
from clrface.data.io import save_image
from clrface.faces.align import affine_scale, align_affine, crop_corners
from clrface.faces.detail import (
    DetailEstimate,
    band_signal_fraction,
    band_split,
    blend,
    blockiness,
    choose,
    estimate,
    fine_detail,
    input_face,
    keep_input_detail,
    lower_band_from,
    luma,
    noise_sigma,
    octave_ratio,
    photo_blockiness,
    resize,
    upper_band_from,
)
from clrface.options import RestoreOptions
from clrface.photo import restore_photo
from clrface.restorer import Restorer


def dead_leaves(n: int, seed: int = 0, discs: int = 1500) -> np.ndarray:
    """uint8 [n, n, 3] occluding discs of random colour and radius ~ 1/r^3 (a clean image with a natural,
    scale-invariant spectrum: sparse edges, flat insides, no noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] / n
    img = np.full((n, n, 3), 128.0)
    for _ in range(discs):
        r = 0.01 / np.sqrt(rng.uniform(0.002, 1.0))
        cx, cy = rng.uniform(0, 1, 2)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(40, 215, 3)
    return img.round().astype(np.uint8)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].double()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.mark.parametrize("sigma", [2.0, 5.0, 12.0])
def test_noise_sigma_of_pure_noise(sigma):
    g = torch.Generator().manual_seed(0)
    y = 128 + sigma * torch.randn(1, 512, 512, generator=g, dtype=torch.float64)
    assert noise_sigma(y).item() == pytest.approx(sigma, rel=0.03)


def test_pure_noise_band_is_no_signal_and_edges_are():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 512, 512, generator=g, dtype=torch.float64)
    assert band_signal_fraction(noise).item() < 0.02  # Gaussian: median/0.6745 is its rms
    y = luma(_t(dead_leaves(512)))
    _, high = band_split(y[:, None], 128)
    assert band_signal_fraction(high[:, 0]).item() > 0.9  # sparse edges on flat discs


def test_blocky_image_has_high_blockiness_and_smooth_image_none():
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.uniform(0, 255, (32, 32)), np.ones((8, 8)))  # constant 8x8 blocks
    smooth = luma(_t(dead_leaves(256)))
    noisy = torch.from_numpy(rng.normal(128, 10, (1, 256, 256)))
    assert blockiness(torch.from_numpy(blocks)[None]).item() > 20
    assert blockiness(torch.from_numpy(np.roll(blocks, 3, axis=1))[None]).item() > 20  # any phase
    assert blockiness(noisy).item() == pytest.approx(1.0, abs=0.05)
    assert blockiness(smooth).item() < 1.15


def test_jpeg_at_low_quality_is_blocky():
    img = dead_leaves(256, seed=3)
    smooth = np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.LANCZOS).resize(
        (256, 256), Image.Resampling.BICUBIC))
    def jpeg(q):
        buf = io.BytesIO()
        Image.fromarray(smooth).save(buf, "JPEG", quality=q)
        return np.asarray(Image.open(buf).convert("RGB"))
    assert photo_blockiness(jpeg(10)) > 1.3
    assert photo_blockiness(jpeg(95)) < 1.1
    assert photo_blockiness(jpeg(10), box=np.array([40.0, 40.0, 200.0, 200.0])) > 1.3


def test_band_split_sums_back_exactly():
    x = _t(dead_leaves(512))
    low, high = band_split(x, 128)
    torch.testing.assert_close(low + high, x, rtol=0, atol=1e-10)
    _, high_s = band_split(resize(x, 128), 128)
    assert high_s.abs().max().item() == 0  # nothing above the model's resolution at the model's resolution
    # a 128 px image enlarged has little high band: one residual step leaves 17 % of x's, two leave 7 %
    small = resize(resize(x, 128), 512)
    _, high_up = band_split(small, 128)
    one_step = small - resize(resize(small, 128), 512)
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(high_up) < 0.08 * rms(high) and rms(high_up) < 0.45 * rms(one_step)


def test_blend_end_points():
    x = _t(dead_leaves(256))
    r = _t(dead_leaves(64, seed=5))
    torch.testing.assert_close(blend(x, r, 1.0, 1.0), x, rtol=0, atol=1e-9)  # the input itself
    torch.testing.assert_close(blend(x, r, 0.0, 0.0), resize(r, 256), rtol=0, atol=1e-9)  # today's paste
    low, high = band_split(x, 64)
    torch.testing.assert_close(blend(x, r, 0.5, 0.25), 0.5 * (low + resize(r, 256)) + 0.25 * high, rtol=0, atol=1e-9)


def test_clean_input_passes_through_within_45_db():
    x = dead_leaves(512, seed=2)
    restored = dead_leaves(128, seed=9)  # the model's face: entirely different
    out, e = keep_input_detail(x, restored)
    assert e.gate == 1.0 and e.high_weight == 1.0, e
    assert psnr(out, x) > 45


def test_noisy_input_takes_the_restored_face():
    x = dead_leaves(512, seed=2).astype(np.float64)
    x = np.clip(x + np.random.default_rng(0).normal(0, 8, x.shape), 0, 255).round().astype(np.uint8)
    restored = np.asarray(Image.fromarray(dead_leaves(512, seed=2)).resize((128, 128), Image.Resampling.LANCZOS))
    out, e = keep_input_detail(x, restored)
    assert e.noise == pytest.approx(8 * np.sqrt(0.299**2 + 0.587**2 + 0.114**2), rel=0.1)  # luma of RGB noise
    assert e.gate == 0.0 and e.high_weight == 0.0
    today = resize(_t(restored), 512)[0].permute(1, 2, 0).round().clamp(0, 255).numpy()
    assert np.abs(out - today).max() <= 1  # float32 vs float64 rounding only


def test_enlarged_small_face_is_not_sharp_and_is_restored():
    small = Image.fromarray(dead_leaves(256, seed=4)).resize((48, 48), Image.Resampling.LANCZOS)
    x = np.asarray(small.resize((512, 512), Image.Resampling.BICUBIC))
    e = estimate(x, 128)
    assert e.sharpness < 0.3 and octave_ratio(luma(resize(_t(dead_leaves(512, 4)), 128))).item() > 0.6
    assert choose(e).gate == 0.0


def test_estimate_record_and_input_face_size():
    x = dead_leaves(256)
    e = choose(estimate(x, 128))
    assert isinstance(e, DetailEstimate)
    assert set(e.to_json()) == {"size", "noise", "high_signal", "sharpness", "blockiness", "gate", "high_weight"}
    # the face fills photo pixels 0..383, i.e. it is 3x the 128 px crop
    m = align_affine(crop_corners(384), 128)
    assert affine_scale(m) == pytest.approx(1 / 3)
    photo = dead_leaves(400)
    face = input_face(photo, m, 128)
    assert face.shape == (384, 384, 3)
    # at the photo's own scale the crop is the pixels themselves (its border is faded where it meets the photo edge);
    # up to resampling round-off at disc edges, which differs between CPUs (49.9 dB on an AMD EPYC)
    assert psnr(face[32:-32, 32:-32], photo[32:352, 32:352]) > 45
    assert input_face(photo, m, 128, scale=2.0).shape == (768, 768, 3)
    with pytest.raises(ValueError, match="square and at least 128"):
        keep_input_detail(x[:100], x[:128, :128])


def test_restore_keeps_a_clean_face_and_reports_it(restorer, tmp_path):
    s = restorer.resolution
    clean = dead_leaves(8 * s, seed=6, discs=300)  # sparse edges at the tiny model's 32 px too
    o = RestoreOptions(steps=1, mode="irn")
    kept = restore_photo(restorer, clean, o, aligned=True)
    today = restore_photo(restorer, clean, o, aligned=True, keep_detail=False)
    assert kept.faces[0].detail["gate"] == 1.0 and kept.faces[0].detail["high_weight"] == 1.0
    assert psnr(kept.image, clean) > 45 and psnr(today.image, clean) < 30
    assert today.faces[0].detail is None
    save_image(tmp_path / "in" / "clean.png", clean)
    report = restore_files([tmp_path / "in" / "clean.png"], tmp_path / "out", restorer, o, aligned=True,
                           progress=False, log=lambda _: None)
    face = report["images"][0]["faces"][0]
    assert face["keep_detail"]["gate"] == 1.0 and face["keep_detail"]["size"] == 8 * s
    off = restore_files([tmp_path / "in" / "clean.png"], tmp_path / "off", restorer, o, aligned=True,
                        progress=False, log=lambda _: None, keep_detail=False)
    assert "keep_detail" not in off["images"][0]["faces"][0]


def test_upper_band_from_keeps_the_lower_band_and_takes_the_detail():
    g = torch.Generator().manual_seed(0)
    smooth = resize(torch.rand(2, 3, 16, 16, generator=g), 128)
    detail = torch.rand(2, 3, 128, 128, generator=g) - 0.5
    sharp = smooth + 0.2 * detail
    sharp_hi = band_split(sharp, 64)[1]
    out = upper_band_from(smooth, sharp)
    assert (resize(out, 32) - resize(smooth, 32)).abs().max() < 0.01  # the half-resolution face is unchanged
    # the upper octave is now the sharp image's (band_split is no projection, so not to the last digit)
    assert (band_split(out, 64)[1] - sharp_hi).abs().mean() < 0.25 * sharp_hi.abs().mean()
    torch.testing.assert_close(upper_band_from(smooth, sharp, 0.0), smooth)
    torch.testing.assert_close(upper_band_from(sharp, sharp), sharp)
    # two octaves: the quarter-resolution face is kept, the band above it is the sharp image's
    two = upper_band_from(smooth, sharp, octaves=2)
    assert (resize(two, 16) - resize(smooth, 16)).abs().max() < 0.01
    sharp_hi2 = band_split(sharp, 32)[1]
    assert (band_split(two, 32)[1] - sharp_hi2).abs().mean() < 0.25 * sharp_hi2.abs().mean()
    assert (two - sharp).abs().mean() < (out - sharp).abs().mean()  # closer to the sharp image than one octave


def test_lower_band_from_takes_the_tone_and_keeps_the_shapes():
    g = torch.Generator().manual_seed(0)
    shapes = torch.rand(2, 3, 128, 128, generator=g) - 0.5
    faithful = resize(torch.rand(2, 3, 4, 4, generator=g), 128)  # a smooth colour field: the tone to take
    drifted = faithful + 0.3 + 0.2 * shapes  # the same shapes over a colour cast
    out = lower_band_from(drifted, faithful, 8)
    # the cast is gone: over 16-px blocks the output's mean colour is the faithful one's
    assert (resize(out, 8) - resize(faithful, 8)).abs().max() < 0.02
    assert (resize(drifted, 8) - resize(faithful, 8)).abs().min() > 0.25
    # the shapes above 8 px are the drifted image's own
    hi = band_split(drifted, 8)[1]
    torch.testing.assert_close(band_split(out, 8)[1], hi, atol=0.02 * float(hi.abs().max()), rtol=0)
    torch.testing.assert_close(lower_band_from(faithful, faithful, 8), faithful)
    # tone and detail at the same split give the source back (up to band_split being no projection)
    both = upper_band_from(lower_band_from(drifted, faithful, 8), faithful, octaves=4)
    assert (both - faithful).abs().max() < 0.005 < (drifted - faithful).abs().min()


def enlarged_from(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, N, 3] shrunk to ``size`` px and enlarged back (bicubic, as the degradations and the aligner)."""
    t = torch.from_numpy(x).permute(2, 0, 1)[None].double()
    return resize(resize(t, size), x.shape[0])[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def test_fine_detail_tells_an_enlarged_face_from_a_detailed_one():
    clean = dead_leaves(128, seed=3)
    full, small = fine_detail(clean, 32), fine_detail(enlarged_from(clean, 32), 32)
    assert full > 15 and small < 0.2 * full  # bicubic is no projection: the enlarged image keeps ~15 % (3.3 of 21)
    assert fine_detail(np.full((128, 128, 3), 90, np.uint8), 32) == 0.0


def test_a_model_with_an_input_detail_limit_warns_on_detailed_faces(tmp_path, tiny_model_builder):
    folder = tiny_model_builder(tmp_path / "model")  # 32 px faces
    (folder / "restore.json").write_text(json.dumps({"input_detail_limit": {"size": 8, "rms": 5.0}}))
    restorer = Restorer.from_pretrained(folder)
    assert restorer.input_detail_limit == (8, 5.0)
    clean = dead_leaves(32, seed=4)
    enlarged = enlarged_from(clean, 8)
    o = RestoreOptions(mode="irn")
    (warning,) = restore_photo(restorer, clean, o, aligned=True).warnings
    assert warning.startswith("face 0: has more fine detail than the faces this model was trained on") and \
        f"rms {fine_detail(clean, 8):.1f} above 8 px, its limit 5)" in warning
    assert restore_photo(restorer, enlarged, o, aligned=True).warnings == []
    assert restore_photo(restorer, clean, RestoreOptions(mode="direct"), aligned=True).warnings == []  # no IRN
