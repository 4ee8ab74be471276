"""The README's Python API example, run as written against the shipped default model."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clrface.device
from clrface import Restorer
from clrface.demo import demo_image
from clrface.errors import ClrfaceError

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_and_restores_the_demo_face(capsys):
    scope: dict = {}
    exec(compile(_api_example(), "README.md", "exec"), scope)
    result = scope["result"]
    photo = scope["demo_image"]()
    assert result.image.shape == photo.shape and result.image.dtype == np.uint8
    assert len(result.faces) >= 1  # dlib's HOG also fires on the mission patch of this portrait
    for face in result.faces:
        assert face.crops_out[0].shape == (128, 128, 3)
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= photo.shape[1] and 0 <= y0 < y1 <= photo.shape[0]
        assert 0.9 < face.id_vs_input[0] <= 1.0  # clean input: the restored face keeps its identity
    assert "(512, 512, 3)" in capsys.readouterr().out


def test_api_accepts_paths_and_pil_and_takes_overrides(tmp_path):
    r = Restorer.from_pretrained("default")
    crop = np.asarray(Image.fromarray(demo_image()[40:260, 130:350]).resize((128, 128)))
    Image.fromarray(crop).save(tmp_path / "crop.png")
    from_path = r.restore(tmp_path / "crop.png", aligned=True, mode="direct")
    from_pil = r.restore(Image.fromarray(crop), aligned=True, mode="direct")
    assert np.array_equal(from_path.image, from_pil.image)
    assert from_path.sampling["nfe"] == 0
    up = r.restore(crop, aligned=True, upscale=2, mode="direct")
    assert up.image.shape == (256, 256, 3)
    assert not up.warnings
    wide = r.restore(crop[16:112], aligned=True, mode="direct")  # 128x96: stretched to a square
    assert wide.image.shape == (96, 128, 3) and "128x96, not square" in wide.warnings[0]
    # arrays are read as files are: grey repeated, 16-bit scaled, alpha composited on white
    grey = r.restore(crop[..., 0], aligned=True, mode="direct")
    assert np.array_equal(grey.image, r.restore(np.repeat(crop[..., :1], 3, 2), aligned=True, mode="direct").image)
    deep = crop.astype(np.uint16) * 257  # 255 * 257 = 65535: the same picture in 16 bits
    assert np.array_equal(r.restore(deep, aligned=True, mode="direct").image, from_path.image)
    opaque = np.concatenate([crop, np.full_like(crop[..., :1], 255)], 2)
    assert np.array_equal(r.restore(opaque, aligned=True, mode="direct").image, from_path.image)
    for bad, msg in ((crop.astype(np.float32), "scale floats to 0..255"), (crop[..., :2], r"\[H, W, 4\]")):
        with pytest.raises(ClrfaceError, match=msg):
            r.restore(bad)
    # too small to hold a face: refused, where dlib would abort the process on an image a few pixels wide
    for tiny in (np.zeros((0, 0, 3), np.uint8), np.full((300, 4, 3), 128, np.uint8), np.zeros((15, 15, 3), np.uint8)):
        with pytest.raises(ClrfaceError, match=r"a photo to restore is uint8 \[H, W, 3\] with H, W >= 16"):
            r.restore(tiny)


def test_from_pretrained_takes_the_cli_dtype_names(monkeypatch):
    monkeypatch.setattr(clrface.device, "native_bf16", lambda device, flags=None: True)
    assert Restorer.from_pretrained("default", dtype="auto").dtype == torch.bfloat16
    monkeypatch.setattr(clrface.device, "native_bf16", lambda device, flags=None: False)
    assert Restorer.from_pretrained("default", dtype="auto").dtype == torch.float32
    assert Restorer.from_pretrained("default", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ClrfaceError, match="dtype must be 'auto', one of float32, bfloat16, float16"):
        Restorer.from_pretrained("default", dtype="half")
