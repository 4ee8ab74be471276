"""``clrface demo``: the paper's synthetic setting on a public-domain face, degraded and restored."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage import data as skimage_data

from clrface.batch import restore_files
from clrface.data.degradation import REFERENCE_SIZE, degrade, get_preset
from clrface.data.io import save_image
from clrface.errors import ClrfaceError
from clrface.faces.align import align_faces
from clrface.options import RestoreOptions
from clrface.photo import resize_lanczos, side_by_side
from clrface.restorer import Restorer

# x10.7 down (of 1-32), JPEG q55 (of 30-90), blur sigma 9.5 (of 0.1-10), noise 16.6 (of 0-20): a hard face
DEMO_SEED = 1
DEMO_PRESET = "bfr"


def demo_image() -> np.ndarray:
    """The public-domain NASA portrait of astronaut Eileen Collins (``skimage.data.astronaut()``), uint8 [512,512,3]."""
    return np.ascontiguousarray(skimage_data.astronaut()[..., :3])


def run_demo(out_dir: str | Path, restorer: Restorer, options: RestoreOptions, *,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The astronaut's face is FFHQ-aligned at 512 px (the reference size of the bfr ranges), degraded with the
    bfr preset at a fixed seed, and restored as an aligned crop. Writes ``original.png``, ``degraded.png``,
    ``demo_cmp.png`` (degraded | restored | original) and the restore outputs (see
    :func:`clrface.batch.restore_files`) into ``out_dir``; returns the report."""
    out = Path(out_dir)
    found = align_faces(demo_image(), REFERENCE_SIZE, max_faces=1)
    if not found:
        raise ClrfaceError("demo: no face found in the astronaut portrait (dlib detector models missing?)")
    original = found[0][0]
    degraded, params = degrade(original, get_preset(DEMO_PRESET, REFERENCE_SIZE), DEMO_SEED)
    save_image(out / "original.png", original)
    src = save_image(out / "degraded.png", degraded)
    report = restore_files([src], out, restorer, options, aligned=True, log=log, progress=False)
    if report["failures"]:
        raise ClrfaceError(report["failures"][0]["error"])
    restored = np.asarray(Image.open(report["images"][0]["final"][0]).convert("RGB"))
    h, w = restored.shape[:2]
    save_image(out / "demo_cmp.png", side_by_side(resize_lanczos(degraded, w, h), restored,
                                                  resize_lanczos(original, w, h)))
    report["degradation"] = {"preset": DEMO_PRESET, "seed": DEMO_SEED, "params": params.to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
