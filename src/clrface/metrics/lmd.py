"""LMD: landmark distance between a restored face and its ground truth.

VQFR's landmark-distance script and PMRF's ``evaluation/calculate_landmark_distance.py`` (adopted from VQFR;
github.com/ohayonguy/PMRF commit dc2ec0d9c9f81bf23a89320a7a512e32f8297775) define LMD as the mean over
landmarks of the Euclidean distance between the landmarks of the restored image and of the ground truth,
``mean_k ||p_k - q_k||_2``, in **pixels of the 512 px aligned image**, unnormalised, averaged over images.
They use a 98-point AWing FAN (WFLW) run on the whole crop; **we use dlib's 68-point predictor** (iBUG 300-W
points, ``clrface.faces.detect.landmarks68``): same protocol, but values are not interchangeable with theirs.

Our faces are 128 px: both images are resized to ``size`` = 512 px (PIL bicubic) before landmarking and LMD is
reported in pixels at 512 px, the unit the published tables use (divide by 4 for 128 px pixels, by 512 for a
fraction of the crop). dlib's predictor needs a face box; both images of a pair use the *same* box, so LMD
measures only how the image content moves the landmarks, not detector jitter: the HOG box found on the ground
truth, or, when the detector misses it (degraded or profile faces), the fixed box ``FFHQ_DLIB_BOX`` where dlib's
detector puts FFHQ-aligned faces. The restored image is never re-detected.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from clrface.data.io import to_uint8
from clrface.faces.detect import detect_faces, landmarks68
from clrface.metrics.meter import MeanMeter

LMD_SIZE = 512

#: Mean dlib HOG box (x0, y0, x1, y1) on FFHQ-aligned crops, unit coordinates: 177 detected faces of the first
#: 200 faces128/val crops resized to 512 px (bicubic), ``detect_faces(upsample=0)``; std (0.033, 0.031, 0.025, 0.028).
FFHQ_DLIB_BOX = (0.197, 0.264, 0.796, 0.862)


def landmark_distance(pred_lm: Tensor | np.ndarray, gt_lm: Tensor | np.ndarray) -> Tensor:
    """Mean Euclidean distance over points. pred_lm, gt_lm: [B,K,2] (or [K,2]) in pixels. Returns [B] (or [])."""
    a = torch.as_tensor(pred_lm, dtype=torch.float64)
    b = torch.as_tensor(gt_lm, dtype=torch.float64)
    if a.shape != b.shape or a.shape[-1] != 2:
        raise ValueError(f"expected matching [...,K,2] landmarks, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a - b).pow(2).sum(-1).sqrt().mean(-1)


def to_uint8_hwc(x: Tensor) -> list[np.ndarray]:
    """[B,3,H,W] float in [-1,1] or uint8 -> list of uint8 [H,W,3] (floats rounded, as when saved to a file)."""
    if x.dtype != torch.uint8:
        return list(to_uint8(x).numpy())
    return list(x.permute(0, 2, 3, 1).cpu().numpy())


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return np.ascontiguousarray(img)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))


def face_box(gt: np.ndarray, *, detect: bool = True) -> tuple[np.ndarray, bool]:
    """The dlib box (x0,y0,x1,y1) for an aligned face ``gt`` (uint8 [S,S,3]) and whether it was detected.

    Largest HOG detection (no upsampling: at 512 px the face is ~300 px), else the fixed ``FFHQ_DLIB_BOX``.
    """
    h, w = gt.shape[:2]
    if detect:
        faces = detect_faces(gt, upsample=0, max_faces=1)
        if faces:
            return faces[0].box, True
    return np.asarray(FFHQ_DLIB_BOX) * np.array([w, h, w, h]), False


def lmd_pair(pred: np.ndarray, gt: np.ndarray, *, size: int = LMD_SIZE, detect: bool = True) -> tuple[float, bool]:
    """LMD of one pair of aligned faces (uint8 [H,W,3], any size, resized to ``size``) in ``size``-px pixels.

    Returns (distance, gt_box_detected).
    """
    p, g = _resize(pred, size), _resize(gt, size)
    box, found = face_box(g, detect=detect)
    return float(landmark_distance(landmarks68(p, box), landmarks68(g, box))), found


class LMD(MeanMeter):
    """Mean LMD over images (pixels at ``size`` px): ``update(pred, gt) -> [B]``, ``compute() -> float``.

    pred, gt: [B,3,H,W] float in [-1,1] or uint8. ``fallbacks`` counts pairs that used the fixed box.
    """

    def __init__(self, size: int = LMD_SIZE, detect: bool = True) -> None:
        super().__init__(self._lmd)
        self.size, self.detect = size, detect
        self.fallbacks = 0

    def _lmd(self, pred: Tensor, gt: Tensor) -> Tensor:
        if pred.shape != gt.shape:
            raise ValueError(f"pred and gt differ in shape: {tuple(pred.shape)} vs {tuple(gt.shape)}")
        out = []
        for p, g in zip(to_uint8_hwc(pred), to_uint8_hwc(gt)):
            d, found = lmd_pair(p, g, size=self.size, detect=self.detect)
            out.append(d)
            self.fallbacks += not found
        return torch.tensor(out, dtype=torch.float64)
