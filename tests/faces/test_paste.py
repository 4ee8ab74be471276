"""Paste-back: exact outside the mask, faithful inside, correct under crop/photo rescaling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clrface.faces.align import align_affine, warp_face
from clrface.faces.paste import face_mask, paste_face, paste_faces, paste_mask


def _rot_quad(c, half, deg) -> np.ndarray:
    t = np.radians(deg)
    x = half * np.array([np.cos(t), np.sin(t)])
    y = np.array([-x[1], x[0]])
    c = np.asarray(c, float)
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def _psnr(a, b) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def test_face_mask_profile():
    s = 100
    # along the middle row: 0 up to erode*S from the edge, 1 from (erode+feather)*S, 0.5 halfway
    u = np.array([-0.5, 3.5, 4.5, 8.5, 12.5, 50.0, 90.5])  # 90.5 mirrors 8.5
    w = face_mask(u, np.full_like(u, 49.5), s, erode=0.05, feather=0.08)
    np.testing.assert_allclose(w, [0, 0, 0, 0.5, 1, 1, 0.5], atol=1e-12)
    assert face_mask(np.array([49.5]), np.array([49.5]), s, shape="ellipse")[0] == 1.0
    assert face_mask(np.array([5.0]), np.array([5.0]), s, shape="ellipse")[0] == 0.0  # corner cut off


def test_round_trip_exact_outside_and_faithful_inside(make_photo):
    photo = make_photo(300, 400, seed=2)
    m = align_affine(_rot_quad((190, 150), 70.0, 15.0), 128)
    crop = warp_face(photo, m, 128)
    out = paste_face(photo, crop, m)
    mask = paste_mask(photo.shape[:2], m, affine_size=128)
    np.testing.assert_array_equal(out[mask == 0], photo[mask == 0])
    assert (mask > 0).sum() > 0.5 * 140**2
    assert _psnr(out[mask > 0], photo[mask > 0]) > 40
    assert out is not photo and np.shares_memory(out, photo) is False


def test_blend_follows_the_mask_weights():
    photo = np.full((200, 200, 3), 50, np.uint8)
    crop = np.full((64, 64, 3), 200, np.uint8)
    m = align_affine(_rot_quad((100, 100), 60.0, 30.0), 64)
    out = paste_face(photo, crop, m).astype(float)
    w = paste_mask(photo.shape[:2], m, affine_size=64)
    np.testing.assert_array_equal(out[..., 0], np.rint(50 + 150 * w))
    assert (w == 1).sum() > 0.4 * 120**2 and ((w > 0) & (w < 1)).sum() > 0


def test_any_crop_size_and_upscaled_photo(make_photo):
    photo = make_photo(240, 300, seed=4)
    quad = _rot_quad((150, 120), 60.0, -10.0)
    m128 = align_affine(quad, 128)
    # a crop rendered at 256 pastes with the 128 px affine; the mask does not depend on crop size
    crop256 = warp_face(photo, align_affine(quad, 256), 256)
    out = paste_face(photo, crop256, m128, affine_size=128)
    mask = paste_mask(photo.shape[:2], m128, affine_size=128)
    np.testing.assert_allclose(paste_mask(photo.shape[:2], m128, affine_size=128, crop_size=256), mask, atol=1e-9)
    np.testing.assert_array_equal(out[mask == 0], photo[mask == 0])
    assert _psnr(out[mask > 0], photo[mask > 0]) > 40
    # the photo upscaled x2 before pasting: same face, 4x the area, still aligned
    big = np.asarray(Image.fromarray(photo).resize((600, 480), Image.Resampling.BICUBIC))
    crop = warp_face(photo, m128, 128)
    out2 = paste_face(big, crop, m128, scale=2.0)
    mask2 = paste_mask(big.shape[:2], m128, affine_size=128, scale=2.0)
    assert abs(mask2.sum() / mask.sum() - 4) < 0.05
    np.testing.assert_array_equal(out2[mask2 == 0], big[mask2 == 0])
    assert _psnr(out2[mask2 > 0.5], big[mask2 > 0.5]) > 35  # the crop is 128 px, the upscaled face ~170 px


def test_several_faces_and_faces_leaving_the_photo():
    photo = np.full((200, 300, 3), 10, np.uint8)
    ma = align_affine(_rot_quad((70, 100), 50.0, 0.0), 32)
    mb = align_affine(_rot_quad((290, 20), 50.0, 45.0), 32)  # mostly outside the photo
    ca = np.full((32, 32, 3), 100, np.uint8)
    cb = np.full((32, 32, 3), 240, np.uint8)
    out = paste_faces(photo, [ca, cb], [ma, mb])
    assert out[100, 70].tolist() == [100, 100, 100]
    assert out[5, 295].tolist() == [240, 240, 240]
    assert out[190, 170].tolist() == [10, 10, 10]
    wa = paste_mask(photo.shape[:2], ma, affine_size=32)
    wb = paste_mask(photo.shape[:2], mb, affine_size=32)
    np.testing.assert_array_equal(out[(wa == 0) & (wb == 0)], 10)
    with pytest.raises(ValueError):
        paste_faces(photo, [ca], [ma, mb])


def test_bicubic_keeps_fine_texture():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)  # white noise: worst case
    m = align_affine(_rot_quad((80, 80), 40.0, 9.0), 256)  # face enlarged ~3x into the crop
    mask = paste_mask(photo.shape[:2], m, affine_size=256) > 0
    lin = paste_face(photo, warp_face(photo, m, 256), m)
    cub = paste_face(photo, warp_face(photo, m, 256, resample="bicubic"), m, interpolation="bicubic")
    assert _psnr(cub[mask], photo[mask]) > _psnr(lin[mask], photo[mask]) + 3


def test_a_2000px_photo_changes_only_around_the_face(make_photo):
    photo = np.asarray(Image.fromarray(make_photo(500, 500, seed=6)).resize((2000, 2000), Image.Resampling.BILINEAR))
    m = align_affine(_rot_quad((900, 1100), 220.0, 12.0), 512)
    crop = warp_face(photo, m, 512)
    out = paste_face(photo, crop, m)
    assert np.array_equal(out[:400], photo[:400])
    white = paste_face(photo, np.full((512, 512, 3), 255, np.uint8), m).astype(float)
    w = paste_mask(photo.shape[:2], m, affine_size=512)[..., None]
    np.testing.assert_array_equal(white, np.rint(photo + (255 - photo.astype(float)) * w))  # every pixel
    assert (w == 1).sum() > 0.4 * 440**2 and (white[1100, 900] == 255).all()  # the face's centre is the crop's
