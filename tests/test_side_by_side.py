"""benchmarks/side_by_side.py: the same centre crop of each face from every folder, enlarged pixel for pixel."""

import numpy as np
import pytest
from PIL import Image

from clrface.bench import LABEL_H


@pytest.fixture(scope="module")
def sbs(benchmark_script):
    return benchmark_script("side_by_side")


def _folders(tmp_path, n_folders=3, names=("a.png", "b.png")):
    rng = np.random.default_rng(0)
    folders = []
    for k in range(n_folders):
        f = tmp_path / f"f{k}"
        f.mkdir()
        for name in names:
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f / name)
        folders.append(f)
    return folders


def test_centre_crop_keeps_pixels(sbs, tmp_path):
    f = _folders(tmp_path, 1)[0]
    img = np.asarray(Image.open(f / "a.png"))
    crop = sbs.centre_crop(f / "a.png", 0.5, 3)
    assert crop.shape == (48, 48, 3)
    np.testing.assert_array_equal(crop[::3, ::3], img[8:24, 8:24])  # nearest: each pixel a 3x3 block


def test_grid_of_faces_and_folders(sbs, tmp_path):
    folders = _folders(tmp_path)
    fig = sbs.side_by_side(folders, ["in", "A", "B"], ["a.png", "b.png"], 0.5, 2)
    gap = 6
    assert fig.size == (3 * 32 + 2 * gap, 2 * (32 + LABEL_H) + gap)
    first = np.asarray(fig)[LABEL_H:LABEL_H + 32, 32 + gap:2 * 32 + gap]  # face a of the second folder
    np.testing.assert_array_equal(first[::2, ::2], np.asarray(Image.open(folders[1] / "a.png"))[8:24, 8:24])
