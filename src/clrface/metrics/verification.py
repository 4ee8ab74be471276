"""Face verification (LFW protocol) and closed-set rank-k identification from embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _np(x: Tensor | np.ndarray | Sequence) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def best_threshold(scores: np.ndarray, is_same: np.ndarray) -> tuple[float, float]:
    """Threshold t maximising the accuracy of ``scores >= t`` -> "same". Returns (t, accuracy).

    t is the midpoint between the two scores where the best split falls, so it generalises to new data.
    """
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], is_same[order].astype(np.int64)
    n = len(s)
    # Predict "same" for positions >= i: correct = (#different below i) + (#same from i on).
    diff_below = np.concatenate([[0], np.cumsum(1 - y)])
    same_from = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    correct = diff_below + same_from
    # Only split between distinct scores.
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] > s[:-1]
    i = int(np.argmax(np.where(valid, correct, -1)))
    if i == 0:
        t = s[0] - 1.0
    elif i == n:
        t = s[-1] + 1.0
    else:
        t = (s[i - 1] + s[i]) / 2
    return float(t), float(correct[i]) / n


def verification_accuracy(
    dist_or_sim: Tensor | np.ndarray,
    is_same: Tensor | np.ndarray,
    folds: int = 10,
    *,
    higher_is_same: bool = True,
) -> tuple[float, float]:
    """LFW-style k-fold verification accuracy (mean, std over folds).

    dist_or_sim: [N] pair scores (a similarity, or a distance with ``higher_is_same=False``); is_same: [N] bool.
    Pairs are split into ``folds`` contiguous folds in the given order (LFW View 2 ``pairs.txt`` order gives the
    official folds); for each fold the threshold is the best one on the other folds.
    """
    s = _np(dist_or_sim).astype(np.float64).reshape(-1)
    y = _np(is_same).astype(bool).reshape(-1)
    if s.shape != y.shape or len(s) < folds:
        raise ValueError(f"need matching scores/labels with at least {folds} pairs, got {s.shape} and {y.shape}")
    if not higher_is_same:
        s = -s
    idx = np.array_split(np.arange(len(s)), folds)
    accs = []
    for k in range(folds):
        test = idx[k]
        train = np.concatenate([idx[j] for j in range(folds) if j != k])
        t, _ = best_threshold(s[train], y[train])
        accs.append(float(((s[test] >= t) == y[test]).mean()))
    return float(np.mean(accs)), float(np.std(accs))


def rank_k_accuracy(
    gallery_emb: Tensor | np.ndarray,
    gallery_ids: Sequence | np.ndarray | Tensor,
    probe_emb: Tensor | np.ndarray,
    probe_ids: Sequence | np.ndarray | Tensor,
    ks: Sequence[int] = (1, 5),
) -> dict[int, float]:
    """Closed-set identification: fraction of probes whose identity is among the k most cosine-similar gallery
    entries. gallery_emb: [G,D]; probe_emb: [P,D]; ids: length G / P. Probes whose identity is not in the gallery
    are skipped (closed set). Returns {k: accuracy}.
    """
    g = torch.nn.functional.normalize(torch.as_tensor(_np(gallery_emb), dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(torch.as_tensor(_np(probe_emb), dtype=torch.float64), dim=-1)
    gids, pids = _np(gallery_ids), _np(probe_ids)
    keep = np.isin(pids, gids)
    if not keep.any():
        raise ValueError("no probe identity occurs in the gallery")
    sim = (p[torch.from_numpy(keep)] @ g.T).numpy()
    order = np.argsort(-sim, axis=1, kind="stable")
    hit = gids[order] == pids[keep][:, None]  # [P', G]
    first = np.where(hit.any(1), hit.argmax(1), len(gids))
    return {int(k): float((first < k).mean()) for k in ks}
