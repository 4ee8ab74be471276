"""IDS: identity similarity between a restored face and its ground truth.

IDS = cos(e(pred), e(gt)) per image, averaged over a set (higher is better). The paper (and CodeFormer/VQFR
style tables) computes it with an ArcFace network; **ours uses the ported dlib ResNet descriptor**
(``clrface.identity.facerec``, 128-d, applied to the whole FFHQ-aligned crop through a fixed chip warp),
because no ArcFace weights are available offline. The scales differ: with the dlib network different people
already score ~0.83 and the same person ~0.96 on our 128 px crops (see the data README), so an IDS difference
of 0.01 is meaningful and our numbers are not comparable with ArcFace-based values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from clrface.metrics.meter import MeanMeter

#: images [B,3,H,W] in [-1,1] -> embeddings [B,D]
Embed = Callable[[Tensor], Tensor]


def cosine(e_pred: Tensor, e_gt: Tensor) -> Tensor:
    """Row-wise cosine similarity. e_*: [B,D] (normalised here). Returns [B] float64."""
    a = F.normalize(e_pred.detach().to(torch.float64), dim=-1)
    b = F.normalize(e_gt.detach().to(torch.float64), dim=-1)
    return (a * b).sum(-1).clamp(-1.0, 1.0)


@torch.no_grad()
def embed_pair(pred: Tensor, gt: Tensor, embed: Embed) -> tuple[Tensor, Tensor]:
    """Embeddings of pred and gt [B,3,H,W] in one call of ``embed``."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt differ in shape: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    e = embed(torch.cat([pred, gt], 0))
    return e[: len(pred)], e[len(pred):]


#: Std (px of a 128-px crop, scaled with the crop) of the Gaussian both faces pass through for ``ids_blur``.
IDS_BLUR_SIGMA = 1.0


def low_pass(x: Tensor, sigma: float) -> Tensor:
    """[B,C,H,W] through a separable Gaussian of std ``sigma * H / 128`` px (reflect padding); sigma 0: ``x``.

    The identity terms of the IRN are trained against the same recogniser that IDS asks, so the IRN can raise
    IDS with patterns in the finest octave that the recogniser reads as identity (a 4-px grid, colour fringes
    along eyelids) but a person does not. Seen through this blur by both faces, the recogniser judges what the
    coarser bands hold: ``ids_blur`` in evaluation, ``id_blur`` in training.
    """
    s = sigma * x.shape[-2] / 128
    if s <= 0:
        return x
    r = max(1, math.ceil(3 * s))
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / s) ** 2)
    g = (g / g.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ids(pred: Tensor, gt: Tensor, embed: Embed) -> Tensor:
    """Per-image IDS. pred, gt: [B,3,H,W] FFHQ-aligned crops in [-1,1]; embed: images -> [B,D]. Returns [B]."""
    return cosine(*embed_pair(pred, gt, embed))


#: dlib's own verification rule: two faces are the same person when their raw (unnormalised) descriptors lie
#: closer than 0.6. The raw descriptors have norm ~1.44 (LFW), so as a cosine of unit descriptors this is ~0.91,
#: not the 0.82 that unit descriptors would give.
DLIB_SAME_PERSON_DISTANCE = 0.6


def descriptor_distance(e_pred: Tensor, e_gt: Tensor) -> Tensor:
    """Row-wise Euclidean distance [B] float64 of raw descriptors [B,D]."""
    return (e_pred.detach().double() - e_gt.detach().double()).norm(dim=-1)


class IDS(MeanMeter):
    """Mean IDS over images: ``update(pred, gt) -> [B]``, ``compute() -> float``. With ``embed`` giving dlib's raw
    descriptors, ``distances`` keeps each pair's descriptor distance (the same-person rule)."""

    def __init__(self, embed: Embed) -> None:
        super().__init__(self._ids)
        self.embed = embed
        self.distances: list[float] = []

    def _ids(self, pred: Tensor, gt: Tensor) -> Tensor:
        a, b = embed_pair(pred, gt, self.embed)
        self.distances += descriptor_distance(a, b).tolist()
        return cosine(a, b)
