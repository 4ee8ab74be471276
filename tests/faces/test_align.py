"""FFHQ quad, the alignment affine and warp_face against PIL / build_data.py's recipe."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from clrface.data.io import data_root
from clrface.demo import demo_image
from clrface.faces.align import (
    ALIGN_TOLERANCE,
    _wide_blur,
    affine_scale,
    align_affine,
    align_faces,
    alignment_error,
    apply_affine,
    crop_corners,
    ffhq_quad,
    invert_affine,
    warp_face,
)
from clrface.faces.detect import detect_faces


def _landmarks(eye_l, eye_r, mouth_l, mouth_r) -> np.ndarray:
    lm = np.zeros((68, 2))
    lm[36:42] = eye_l
    lm[42:48] = eye_r
    lm[48] = mouth_l
    lm[54] = mouth_r
    return lm


def _rot_quad(c, half, deg) -> np.ndarray:
    t = np.radians(deg)
    x = half * np.array([np.cos(t), np.sin(t)])
    y = np.array([-x[1], x[0]])
    c = np.asarray(c, float)
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def test_ffhq_quad_closed_form():
    # eyes 40 px apart at y=50, mouth 40 px below: |x| = max(2*40, 1.8*40) = 80, centre (60, 50 + 4)
    q = ffhq_quad(_landmarks((40, 50), (80, 50), (50, 90), (70, 90)))
    np.testing.assert_allclose(q, [[-20, -26], [-20, 134], [140, 134], [140, -26]], atol=1e-12)
    # a tall face: eye-mouth distance dominates, |x| = 1.8 * 60
    q = ffhq_quad(_landmarks((50, 50), (70, 50), (55, 110), (65, 110)))
    np.testing.assert_allclose(np.linalg.norm(q[3] - q[0]), 2 * 108, atol=1e-9)
    # rotating the landmarks rotates the quad
    t = np.radians(20)
    r = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    lm = _landmarks((40, 50), (80, 50), (50, 90), (70, 90))
    np.testing.assert_allclose(ffhq_quad(lm @ r.T), ffhq_quad(lm) @ r.T, atol=1e-9)


def test_align_affine_maps_quad_to_crop_edges_and_inverts():
    q = _rot_quad((210.3, 170.8), 90.0, 17.0)
    m = align_affine(q, 128)
    np.testing.assert_allclose(apply_affine(m, q), crop_corners(128), atol=1e-9)
    np.testing.assert_allclose(apply_affine(invert_affine(m), crop_corners(128)), q, atol=1e-9)
    np.testing.assert_allclose(affine_scale(m), 128 / 180.0, rtol=1e-12)
    # the crop centre pixel (63.5, 63.5) is the quad centre
    np.testing.assert_allclose(apply_affine(m, q.mean(0)), [63.5, 63.5], atol=1e-9)


def test_warp_face_equals_pil_quad_recipe():
    """build_data's warp for a quad inside the photo: PIL QUAD at 4S (bilinear), Lanczos to S."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (220, 260, 3), dtype=np.uint8)
    for quad, s in [(_rot_quad((130, 110), 50.0, 12.0), 32), (_rot_quad((120, 100), 40.0, -33.0), 48)]:
        ref = Image.fromarray(img).transform((4 * s, 4 * s), Image.Transform.QUAD, tuple((quad + 0.5).ravel()),
                                             Image.Resampling.BILINEAR).resize((s, s), Image.Resampling.LANCZOS)
        out = warp_face(img, align_affine(quad, s), s)
        d = np.abs(np.asarray(ref, int) - out)
        assert d.max() <= 1 and d.mean() < 0.01


def test_warp_face_integer_translation_is_a_copy(make_photo):
    img = make_photo(100, 120)
    m = np.array([[1.0, 0, -30], [0, 1.0, -20]])  # crop pixel (u, v) = photo (u + 30, v + 20)
    np.testing.assert_array_equal(warp_face(img, m, 40, supersample=1), img[20:60, 30:70])


def _build_data():
    path = data_root() / "build_data.py"
    try:
        spec = importlib.util.spec_from_file_location("build_data", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except (FileNotFoundError, ImportError, OSError):
        pytest.skip(f"{path} not available")
    return mod


def test_warp_face_matches_build_data_with_padding(make_photo):
    bd = _build_data()
    img = make_photo(200, 240, seed=3)
    img[::7] = 255  # some edges, so a sub-pixel offset would show
    for quad in [_rot_quad((40, 60), 70.0, 10.0), _rot_quad((200, 150), 60.0, -25.0)]:  # leave the photo
        ref, pad = bd.warp_ffhq(Image.fromarray(img), quad, float(np.linalg.norm(quad[3] - quad[0])), out=64)
        assert pad > 0.05
        out = warp_face(img, align_affine(quad, 64), 64)
        d = np.abs(np.asarray(ref, int) - out)
        assert d.max() <= 1 and d.mean() < 0.01


def test_warp_face_antialiases_large_faces():
    # a 1-px checkerboard seen through a quad larger than the crop must average to grey, not
    # alias into stripes: 3x (supersampling does it) and 10x (the Lanczos shrink does it)
    y, x = np.mgrid[:900, :900]
    img = np.repeat((((x + y) % 2) * 255).astype(np.uint8)[..., None], 3, 2)
    m3 = align_affine(_rot_quad((450, 450), 100.0, 7.0), 64)
    out = warp_face(img, m3, 64).astype(float)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 2
    assert warp_face(img, m3, 64, supersample=1).std() > 20  # what the supersampling prevents
    out = warp_face(img, align_affine(_rot_quad((450, 450), 320.0, 7.0), 64), 64).astype(float)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 2


def test_warp_face_shrink_branch_geometry(make_photo):
    # with shrinking (quad 5x the crop) the crop of a photo that is smooth at crop scale equals a
    # direct bilinear sample through the affine; a quarter-pixel offset would be clearly worse
    img = make_photo(700, 700, seed=5, fmax=0.015)
    quad = _rot_quad((350, 340), 160.0, 21.0)
    s = 64
    m = align_affine(quad, s)
    out = warp_face(img, m, s).astype(float)
    vv, uu = np.mgrid[:s, :s]

    def sample(du: float) -> np.ndarray:
        src = apply_affine(invert_affine(m), np.stack([uu + du, vv], -1).reshape(-1, 2))
        return np.stack([scipy.ndimage.map_coordinates(img[..., c].astype(float), [src[:, 1], src[:, 0]], order=1)
                         for c in range(3)], -1).reshape(s, s, 3)

    err = np.abs(out - sample(0.0))[4:-4, 4:-4].mean()
    err_shifted = np.abs(out - sample(0.25))[4:-4, 4:-4].mean()
    assert err < 1.0 and err < err_shifted / 2


def test_realign_aligned_face_is_nearly_identity(real_data):
    """faces128 crops were made by build_data.py; re-aligning them must give back the crop frame."""
    files = sorted((real_data / "faces128" / "val").glob("*.jpg"))[:12]
    errs = []
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        up = np.asarray(Image.fromarray(img).resize((256, 256), Image.Resampling.BICUBIC))
        faces = detect_faces(up)
        if faces:
            lm = (faces[0].landmarks68 + 0.5) / 2 - 0.5
            errs.append(np.linalg.norm(ffhq_quad(lm) - crop_corners(128), axis=1).mean())
    assert len(errs) >= 8
    assert np.median(errs) < 5.0  # px in a 128 px crop; dlib landmark noise, not a convention error


def test_align_faces_on_a_photo(real_data):
    photo = np.asarray(Image.open(real_data / "real_lq" / "whole" / "codeformer_03.jpg").convert("RGB"))
    res = align_faces(photo, 128)
    assert len(res) == 1
    crop, info = res[0]
    assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(apply_affine(info.affine, info.quad), crop_corners(128), atol=1e-6)
    # the eyes land where FFHQ puts them: level, symmetric about the centre, in the upper half
    lm = apply_affine(info.affine, info.landmarks68)
    el, er = lm[36:42].mean(0), lm[42:48].mean(0)
    assert abs(el[1] - er[1]) < 4 and abs((el[0] + er[0]) / 2 - 63.5) < 4 and 40 < el[1] < 64
    js = info.to_json()
    assert len(js["landmarks68"]) == 68 and len(js["affine"]) == 2


def test_wide_blur_matches_the_full_size_filter():
    # the padding's blur of a large face runs on a reduced copy: within a grey level of scipy's full-size filter
    a = np.random.default_rng(0).uniform(0, 255, (300, 260, 3)).astype(np.float32)
    a += np.linspace(0, 60, 260, dtype=np.float32)[None, :, None]  # a ramp, so the blur has something to keep
    for sigma in (5.0, 24.0, 40.0):
        ref = scipy.ndimage.gaussian_filter(a, [sigma, sigma, 0])
        got = _wide_blur(a, sigma)
        assert got.shape == a.shape and got.dtype == np.float32
        assert np.abs(got - ref)[40:-40, 40:-40].max() < 1.0 and np.abs(got - ref).mean() < 0.2, sigma
    assert np.array_equal(_wide_blur(a, 5.0), scipy.ndimage.gaussian_filter(a, [5.0, 5.0, 0]))  # narrow: exact


def test_alignment_error_tells_a_photo_from_its_aligned_crop():
    photo = demo_image()  # 512 x 512, the face in the upper left third
    (crop, _), = align_faces(photo, 256, max_faces=1)
    assert alignment_error(crop) < 0.05
    assert alignment_error(photo) > 0.3
    assert alignment_error(np.asarray(Image.fromarray(crop).rotate(25, Image.BICUBIC))) > ALIGN_TOLERANCE
    assert alignment_error(np.full((128, 128, 3), 90, np.uint8)) is None  # no face: nothing to say
