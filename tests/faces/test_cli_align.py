"""`clrface align`: crops + faces.json, one-line failures, non-zero exit when something failed."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from clrface.cli import main
from clrface.faces.align import apply_affine, crop_corners, warp_face


def test_align_folder(real_data, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(real_data / "real_lq" / "whole" / "codeformer_03.jpg", src / "face.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(src / "wall.png")
    out = tmp_path / "out"
    rc = main(["align", str(src), str(out), "--size", "128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert any("broken.png" in line and line.startswith("clrface: error:") for line in err)
    assert any("wall.png" in line and "no face" in line for line in err)
    meta = json.loads((out / "faces.json").read_text())
    assert meta["size"] == 128 and len(meta["faces"]) == 1 and len(meta["failures"]) == 1
    rec = meta["faces"][0]
    assert rec["file"] == "face_0.png" and rec["source"].endswith("face.jpg")
    crop = np.asarray(Image.open(out / rec["file"]))
    photo = np.asarray(Image.open(src / "face.jpg").convert("RGB"))
    affine, quad = np.array(rec["affine"]), np.array(rec["quad"])
    np.testing.assert_allclose(apply_affine(affine, quad), crop_corners(128), atol=1e-3)
    assert np.abs(crop.astype(int) - warp_face(photo, affine, 128)).max() <= 1  # json reproduces the crop
    assert len(rec["landmarks68"]) == 68 and len(rec["box"]) == 4


def test_align_single_bad_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "x.jpg"
    bad.write_text("nope")
    assert main(["align", str(bad), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.jpg: not an image" in err[0]


def test_align_refuses_to_overwrite_input(real_data, tmp_path, capsys):
    shutil.copy(real_data / "real_lq" / "whole" / "codeformer_03.jpg", tmp_path / "p.jpg")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "p_0.png")  # an input named like an output
    before = (tmp_path / "p_0.png").read_bytes()
    assert main(["align", str(tmp_path), str(tmp_path), "--size", "64"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "p_0.png").read_bytes() == before


def test_align_gives_namesakes_their_own_crops(real_data, tmp_path, capsys):
    # photo.jpg in two folders, x.jpg beside x.JPG: every face gets its own file (they used to overwrite each other)
    src = tmp_path / "in"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        shutil.copy(real_data / "real_lq" / "whole" / "codeformer_03.jpg", src / sub / "photo.jpg")
    shutil.copy(real_data / "real_lq" / "whole" / "codeformer_03.jpg", src / "x.jpg")
    shutil.copy(real_data / "real_lq" / "whole" / "codeformer_03.jpg", src / "x.JPG")
    out = tmp_path / "out"
    assert main(["align", str(src), str(out), "--size", "64", "--recursive"]) == 0
    files = [r["file"] for r in json.loads((out / "faces.json").read_text())["faces"]]
    assert len(files) == 4 and len({f.casefold() for f in files}) == 4
    assert sorted(p.name for p in out.glob("*.png")) == sorted(files)
