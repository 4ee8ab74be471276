import numpy as np
import pytest
import torch
from PIL import Image

from clrface.metrics import lmd as lmd_mod
from clrface.metrics.lmd import FFHQ_DLIB_BOX, LMD, landmark_distance, lmd_pair, to_uint8_hwc


def test_landmark_distance_of_shift_is_shift():
    g = np.random.default_rng(0).uniform(0, 512, (2, 68, 2))
    assert landmark_distance(g + np.array([3.0, 4.0]), g).tolist() == pytest.approx([5.0, 5.0])
    assert landmark_distance(g, g).tolist() == [0.0, 0.0]


def test_landmark_distance_mean_over_points():
    a = np.zeros((4, 2))
    b = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert float(landmark_distance(a, b)) == pytest.approx((0 + 1 + 2 + 5) / 4)


def test_to_uint8_rounds_like_saving():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert to_uint8_hwc(x)[0].ravel().tolist() == [0, 128, 255]


def test_lmd_meter_uses_gt_box_for_both(monkeypatch):
    # fake detector/predictor: the "landmarks" are the mean intensity shifted into a fixed grid, so a brighter
    # prediction moves every point by a known amount; the box passed must be the same for pred and gt.
    boxes = []

    def fake_landmarks68(img, box):
        boxes.append(tuple(np.round(box, 6)))
        return np.zeros((68, 2)) + img.mean() / 255 * np.array([3.0, 4.0]) * 10

    monkeypatch.setattr(lmd_mod, "landmarks68", fake_landmarks68)
    monkeypatch.setattr(lmd_mod, "face_box", lambda g, detect=True: (np.array([10.0, 20.0, 30.0, 40.0]), True))
    gt = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    pred = gt + 255
    m = LMD(size=16)
    v = m.update(pred, gt)
    assert v.tolist() == pytest.approx([50.0, 50.0])
    assert len(set(boxes)) == 1 and m.compute() == pytest.approx(50.0) and m.fallbacks == 0


def test_lmd_real_identical_is_zero_and_blur_positive(real_val_faces):
    faces = to_uint8_hwc(real_val_faces[:3])
    for f in faces:
        d, _ = lmd_pair(f, f)
        assert d == 0.0
    blurred = np.asarray(Image.fromarray(faces[0]).resize((24, 24), Image.Resampling.BICUBIC).resize((128, 128)))
    d, _ = lmd_pair(blurred, faces[0])
    assert 4.0 < d < 40.0  # pixels at 512 px: a few 128-px pixels of landmark drift, times 4


def test_lmd_is_in_pixels_at_512(monkeypatch):
    # fake predictor: all 68 "landmarks" at the brightest pixel, so moving a dot by (3, 4) pixels at 128 px must
    # read as 5 * 512/128 = 20 pixels at 512 px, and the images really are resized before landmarking
    sizes = []

    def brightest(img, box):
        sizes.append(img.shape[:2])
        y, x = np.unravel_index(np.argmax(img[..., 0]), img.shape[:2])
        return np.zeros((68, 2)) + np.array([x, y], dtype=np.float64)

    monkeypatch.setattr(lmd_mod, "landmarks68", brightest)
    gt, pred = np.zeros((2, 128, 128, 3), np.uint8)
    gt[60, 50], pred[64, 53] = 255, 255
    d, _ = lmd_pair(pred, gt, detect=False)
    assert d == pytest.approx(20.0) and set(sizes) == {(512, 512)}


def test_lmd_counts_fallbacks_and_refuses_an_empty_mean():
    m = LMD()
    blank = torch.zeros(1, 3, 128, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no images"):
        m.compute()
    assert m.update(blank, blank).tolist() == [0.0]
    assert m.fallbacks == 1  # no face on a blank image: the fixed FFHQ box was used


def test_fixed_box_fallback_scales_with_size():
    box, found = lmd_mod.face_box(np.zeros((512, 512, 3), np.uint8), detect=False)
    assert not found and box.tolist() == pytest.approx([v * 512 for v in FFHQ_DLIB_BOX])
