"""Running mean of a per-image metric, the shape every metric of ``clrface evaluate`` takes."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


class MeanMeter:
    """Running mean of a per-image metric ``fn(pred, gt) -> [B]``: ``update(pred, gt) -> [B]``, ``compute() -> float``.

    ``compute()`` before any image raises: a mean of nothing has no value to report.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.fn = fn
        self.total = 0.0
        self.n = 0

    def update(self, pred: Tensor, gt: Tensor) -> Tensor:
        v = self.fn(pred, gt)
        self.total += float(v.sum())
        self.n += int(v.numel())
        return v

    def compute(self) -> float:
        if not self.n:
            raise ValueError(f"{type(self).__name__}: no images were measured")
        return self.total / self.n
