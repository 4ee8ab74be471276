"""Reference-guided identity: clean photos of the same person as the target of identity guidance.

The guidance of Sec. 3.3 pulls every decoded estimate toward a target identity embedding, which is the IRN
output's by default, an estimate made from the degraded face itself. A clean photo of the same person is a
better target. References are aligned like inputs (or taken as aligned crops), embedded by the same face
recogniser, and averaged into one unit embedding. The IRN, the prior, the mask and the sampler are unchanged;
only the target of the guidance moves (mode full, so ``default``, ``fast`` and ``extreme`` alike).

Which faces get it (:func:`assign_reference`): in a photo with several faces, the one whose input identity is
closest to the reference, or every face with ``all_faces``; a face whose input disagrees with the reference
beyond ``MATCH_THRESHOLD`` does not get it (with a warning) unless forced, so that a reference of another person
does not turn a face into that person. The threshold and its error rates: docs/reference.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from clrface.data.io import array_to_rgb_uint8, list_images, load_image, to_model_range
from clrface.errors import ClrfaceError
from clrface.faces.align import align_faces

if TYPE_CHECKING:
    from clrface.restorer import Restorer

#: Cosine between the dlib embedding of a degraded input face and the mean embedding of the clean references below
#: which the reference is taken to show someone else. Chosen on 500 LFW identities at the bfr degradation
#: (benchmarks/reference_eval.py): 95.0 % of wrong-person pairs fall below it (94.8 and 95.2 % on each half).
#: It also refuses 49 % of the right-person references at bfr and 73 % at x8, where a degraded face says
#: little about who it is (docs/reference.md): --force-reference is for those.
MATCH_THRESHOLD = 0.905


@dataclass(frozen=True)
class Reference:
    """One person's identity from ``count`` clean photos: a unit embedding [D] and where it came from."""

    embedding: Tensor
    sources: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.sources)


@dataclass(frozen=True)
class ReferencePolicy:
    """all_faces: every face of a photo may take the reference (default: only the best-matching face).
    force: use it even where the face disagrees with it (below ``threshold``)."""

    all_faces: bool = False
    force: bool = False
    threshold: float = MATCH_THRESHOLD


def mean_identity(embeddings: Tensor) -> Tensor:
    """[R,D] embeddings of one person -> their unit mean [D] (each row normalised first, so every photo counts
    the same)."""
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"need [R, D] embeddings with R >= 1, got {tuple(embeddings.shape)}")
    return F.normalize(F.normalize(embeddings.float(), dim=-1).mean(0), dim=0)


def assign_reference(cos_to_input: Sequence[float], policy: ReferencePolicy = ReferencePolicy()
                     ) -> tuple[list[bool], list[str]]:
    """Which faces of a photo take the reference, from each face's cosine between its input and the reference.

    Candidates: the face with the highest cosine (every face with ``all_faces``). A candidate takes it when its
    cosine reaches the threshold, or always with ``force``. Returns (used per face, warnings)."""
    cos = [float(c) for c in cos_to_input]
    if not cos:
        return [], []
    candidates = range(len(cos)) if policy.all_faces else [int(np.argmax(cos))]
    used = [False] * len(cos)
    warnings = []
    for i in candidates:
        if cos[i] >= policy.threshold or policy.force:
            used[i] = True
            if cos[i] < policy.threshold:
                warnings.append(f"face {i}: the reference is used although it looks like another person (identity "
                                f"cosine {cos[i]:.3f} < {policy.threshold:.3f}; --force-reference)")
        else:
            warnings.append(f"face {i}: the reference looks like another person (identity cosine {cos[i]:.3f} < "
                            f"{policy.threshold:.3f}); restored without it (forcing the reference, --force-reference, "
                            "uses it anyway)")
    return used, warnings


def reference_crops(images: Sequence[str | os.PathLike | np.ndarray], size: int, *, aligned: bool = False
                    ) -> tuple[np.ndarray, tuple[str, ...]]:
    """uint8 [R,S,S,3] aligned faces of the reference photos (paths, folders or uint8 [H,W,3] arrays) and a name
    per face. Each photo gives its largest face; aligned: the photos are aligned face crops, resized to S."""
    items: list[tuple[str, np.ndarray | Path]] = []
    for im in images:
        if isinstance(im, np.ndarray):
            items.append((f"photo {len(items) + 1}", im))
        elif Path(im).is_dir():
            items += [(str(p), p) for p in list_images(im)]
        else:
            items.append((str(im), Path(im)))
    if not items:
        raise ClrfaceError("no reference photo given (an empty folder?)")
    crops, names = [], []
    for name, src in items:
        try:
            photo = load_image(src) if isinstance(src, Path) else array_to_rgb_uint8(src)
        except ClrfaceError as e:  # say that the bad file is a reference, not an input
            raise ClrfaceError(f"reference {e}") from None
        if aligned:
            crops.append(np.asarray(Image.fromarray(photo).resize((size, size), Image.Resampling.LANCZOS)))
        else:
            found = align_faces(photo, size, max_faces=1, resample="bicubic")
            if not found:
                raise ClrfaceError(f"reference {name}: no face found (give a clear photo of the person, or aligned "
                                   "face crops given as aligned)")
            crops.append(found[0][0])
        names.append(name)
    return np.stack(crops), tuple(names)


@torch.no_grad()
def load_reference(restorer: Restorer, images: Sequence[str | os.PathLike | np.ndarray], *, aligned: bool = False
                   ) -> Reference:
    """The Reference of one person from one or more photos: aligned, embedded by ``restorer``'s recogniser and
    averaged. One embedding per photo is the whole extra cost of a reference outside the guided steps."""
    crops, names = reference_crops(images, restorer.resolution, aligned=aligned)
    e = restorer.embed(to_model_range(crops).to(restorer.device)).cpu()
    return Reference(mean_identity(e), names)
