"""IDS: identity similarity between a restored face and its ground truth.

IDS = cos(e(pred), e(gt)) per image, averaged over a set (higher is better). The paper (and CodeFormer/VQFR
style tables) computes it with an ArcFace network; **ours uses the ported dlib ResNet descriptor**
(``clrface.identity.facerec``, 128-d, applied to the whole FFHQ-aligned crop through a fixed chip warp),
because no ArcFace weights are available offline. The scales differ: with the dlib network different people
already score ~0.83 and the same person ~0.96 on our 128 px crops (see the data README), so an IDS difference
of 0.01 is meaningful and our numbers are not comparable with ArcFace-based values.
"""

from __future__ import annotations

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
