"""Tone handling at paste-back (colorization and monochrome photos) and fine-tuned models with a base."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import clrface.model_folder
from clrface.cli import main
from clrface.data.io import load_image
from clrface.errors import CheckpointError, ClrfaceError
from clrface.faces.paste import paste_mask
from clrface.options import RestoreOptions
from clrface.photo import colour_face_only, face_oval, is_monochrome, keep_tone
from clrface.restorer import Restorer

S = 32  # the resolution of conftest.build_tiny_model


def test_is_monochrome_gray_sepia_and_colour():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 256, (40, 50, 1)).astype(np.float64)
    gray = np.repeat(y, 3, -1).astype(np.uint8)
    sepia = np.clip(y * np.array([1.0, 0.85, 0.65]), 0, 255).astype(np.uint8)  # one tint, scaled by luminance
    colour = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert is_monochrome(gray) and is_monochrome(sepia) and not is_monochrome(colour)
    two_tone = np.concatenate([sepia[:, :25], sepia[:, 25:, ::-1]], 1)  # warm left half, cold right half
    assert not is_monochrome(two_tone)


def test_keep_tone_takes_luminance_only():
    rng = np.random.default_rng(1)
    restored = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ref = np.full((16, 16, 3), 90, np.uint8)  # gray reference
    out = keep_tone(restored, ref)
    assert np.abs(out.astype(int) - out[..., :1].astype(int)).max() <= 1  # gray: R = G = B up to rounding
    ycc = lambda a: np.asarray(Image.fromarray(a).convert("YCbCr"), dtype=float)  # noqa: E731
    assert np.abs(ycc(out)[..., 0] - ycc(restored)[..., 0]).mean() < 1.5


def test_face_oval_covers_the_skin_of_an_aligned_crop():
    w = face_oval(128)
    assert w.shape == (128, 128) and w.dtype == np.float32
    # brows (y 0.39), eyes (0.47), cheeks, mouth (0.75) and chin (0.9) are inside; hair, ears, corners are not
    for x, y in [(0.5, 0.39), (0.4, 0.47), (0.7, 0.6), (0.5, 0.75), (0.5, 0.88)]:
        assert w[int(y * 128), int(x * 128)] > 0.99
    assert 0.35 < w[int(0.26 * 128), 64] < 0.65 and 0.35 < w[int(0.6 * 128), int(0.75 * 128)] < 0.65  # the edge
    for x, y in [(0.5, 0.2), (0.15, 0.5), (0.85, 0.5), (0.05, 0.05), (0.5, 0.99)]:
        assert w[int(y * 128), int(x * 128)] == 0.0
    assert np.allclose(w, w[:, ::-1])  # mirror-symmetric
    assert 0.25 < w.mean() < 0.29  # the ellipse's pi * 0.25 * 0.34 = 0.267 of the crop


def test_colour_face_only_keeps_the_crop_tone_off_the_face():
    rng = np.random.default_rng(2)
    restored = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    crop = np.repeat(rng.integers(0, 256, (64, 64, 1), dtype=np.uint8), 3, -1)  # a gray crop
    out, w = colour_face_only(restored, crop), face_oval(64)
    assert np.array_equal(out[w == 1], restored[w == 1])  # the face keeps the restored colours
    assert np.array_equal(out[w == 0], keep_tone(restored, crop)[w == 0])  # the rest: the crop's (gray) tone


def test_gray_photo_keeps_its_tone_and_non_face_pixels(restorer, shared_data):
    photo = load_image(shared_data("real_lq", "whole", "codeformer_01.jpg"))
    gray = np.repeat(np.asarray(Image.fromarray(photo).convert("L"))[..., None], 3, -1)
    auto = restorer.restore_image(gray, RestoreOptions(steps=1))
    assert len(auto.faces) >= 1
    mask = sum(paste_mask(gray.shape[:2], f.affine, affine_size=S) for f in auto.faces)
    assert np.array_equal(auto.image[mask == 0], gray[mask == 0])  # every pixel outside the faces unchanged
    spread = lambda a: np.abs(a.astype(int) - a[..., :1].astype(int)).max()  # noqa: E731
    assert spread(auto.image) <= 2  # auto -> keep on a gray photo: it stays gray (no colour cast)
    full = restorer.restore_image(gray, RestoreOptions(steps=1, color="full"))
    assert np.array_equal(full.image[mask == 0], gray[mask == 0])  # colorizing touches the faces only
    assert spread(full.image[mask > 0.99]) > 10  # the random tiny model's colours are pasted on the face's skin
    # and not on the rest of the crop's square: above the forehead (hair, background) the first face stays gray
    f, others = auto.faces[0], mask - paste_mask(gray.shape[:2], auto.faces[0].affine, affine_size=S)
    ys, xs = np.nonzero((mask > 0.5) & (others == 0))
    v = f.affine[1, 0] * xs + f.affine[1, 1] * ys + f.affine[1, 2]  # crop row of each photo pixel
    top = v < 0.12 * S  # clear of the oval (0 above 0.22) by the bicubic paste's reach
    assert top.sum() > 50 and spread(full.image[ys[top], xs[top]]) <= 2


def test_color_option_is_validated():
    with pytest.raises(ClrfaceError, match="color"):
        RestoreOptions(color="sepia")


def test_fine_tuned_model_takes_missing_stages_from_its_base(tmp_path, model_dir, restorer, monkeypatch):
    weights = tmp_path / "weights"
    shutil.copytree(model_dir, weights / "tinybase")
    ft = weights / "tinyft"
    monkeypatch.setattr(clrface.model_folder, "package_weights", lambda name: weights / name)
    (ft).mkdir()
    (ft / "restore.json").write_text(json.dumps({"defaults": {"mode": "irn", "color": "full"}}))

    assert main(["pack", "--irn", str(model_dir / "irn"), "--base", "tinybase", "-o", str(ft)]) == 0
    assert sorted(p.name for p in ft.iterdir()) == ["irn", "restore.json"]  # only what changed ships
    assert json.loads((ft / "restore.json").read_text())["base"] == "tinybase"
    assert main(["pack", "--irn", str(model_dir / "irn"), "-o", str(tmp_path / "x")]) == 1  # no base, no vqgan
    r = Restorer.from_pretrained("tinyft", facerec=restorer.facerec)
    assert r.irn is not None and r.mask is not None and r.options().color == "full"
    x = torch.rand(1, 3, S, S) * 2 - 1
    torch.testing.assert_close(r.restore_faces(x, r.options(steps=1)).restored,  # fp16 copy of the same IRN
                               restorer.restore_faces(x, restorer.options(steps=1, mode="irn")).restored,
                               atol=5e-3, rtol=0)
    # settings the folder leaves out come from its base, key by key
    (weights / "tinybase" / "restore.json").write_text(json.dumps(
        {"defaults": {"mode": "irn", "steps": 3}, "fidelity_map": {"guidance_at_1": 7.0}}))
    (ft / "restore.json").write_text(json.dumps({"base": "tinybase", "defaults": {"steps": 2}}))
    r = Restorer.from_pretrained("tinyft", facerec=restorer.facerec)
    assert (r.options().mode, r.options().steps, r.fidelity_map.guidance_at_1) == ("irn", 2, 7.0)
    (ft / "restore.json").write_text(json.dumps({"base": "nosuchmodel"}))
    with pytest.raises(CheckpointError, match="nosuchmodel"):
        Restorer.from_pretrained("tinyft", facerec=restorer.facerec)


def test_pack_checks_everything_before_writing_and_a_base_may_have_a_base(tmp_path, model_dir, restorer,
                                                                          monkeypatch, capsys):
    weights = tmp_path / "weights"
    shutil.copytree(model_dir, weights / "tinybase")
    monkeypatch.setattr(clrface.model_folder, "package_weights", lambda name: weights / name)
    refused = tmp_path / "refused"
    assert main(["pack", "--base", "tinybase", "--irn", str(model_dir / "prior"), "-o", str(refused)]) == 1
    assert "is a 'prior' checkpoint, expected 'irn'" in capsys.readouterr().err
    assert main(["pack", "--base", "tinybase", "--irn", str(tmp_path / "none"), "-o", str(refused)]) == 1
    assert not refused.exists()  # no restore.json that would load as a copy of the base
    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir / "prior", damaged)
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:-100])
    assert main(["pack", "--vqgan", str(model_dir / "vqgan"), "--prior", str(damaged), "-o", str(refused)]) == 1
    assert "model.safetensors: unreadable weights" in capsys.readouterr().err
    assert not refused.exists()  # the good vqgan/ was not written before the damaged prior was found
    (weights / "orphan").mkdir()
    (weights / "orphan" / "restore.json").write_text(json.dumps({"base": "nosuch"}))
    assert main(["pack", "--base", "orphan", "--irn", str(model_dir / "irn"), "-o", str(refused)]) == 1
    assert "orphan/restore.json: base: model 'nosuch': no such folder" in capsys.readouterr().err
    # mask onto tinybase, the IRN onto that: vqgan/ and prior/ come from two bases down
    assert main(["pack", "--base", "tinybase", "--mask", str(model_dir / "mask"), "-o", str(weights / "mid")]) == 0
    top = tmp_path / "top"
    assert main(["pack", "--base", "mid", "--irn", str(model_dir / "irn"), "-o", str(top)]) == 0
    r = Restorer.from_pretrained(top, facerec=restorer.facerec)
    assert r.irn is not None and r.mask is not None
    # packed again without a base: the earlier irn/ is neither kept silently nor deleted; the base goes
    stages = ["--vqgan", str(model_dir / "vqgan"), "--prior", str(model_dir / "prior")]
    assert main(["pack", *stages, "-o", str(top)]) == 1
    assert "holds irn/ from an earlier pack" in capsys.readouterr().err
    assert main(["pack", *stages, "--irn", str(model_dir / "irn"), "-o", str(top)]) == 0
    assert json.loads((top / "restore.json").read_text()) == {}
    (weights / "mid" / "restore.json").write_text(json.dumps({"base": "mid"}))
    with pytest.raises(CheckpointError, match="leads back"):
        Restorer.from_pretrained("mid", facerec=restorer.facerec)
    assert main(["pack", "--base", "mid", "--irn", str(model_dir / "irn"), "-o", str(refused)]) == 1  # at pack time
    (weights / "mid" / "restore.json").write_text("{}")  # now a base of a mask alone
    assert main(["pack", "--base", "mid", "--irn", str(model_dir / "irn"), "-o", str(refused)]) == 1
    assert "supplies no vqgan/ and prior/" in capsys.readouterr().err and not refused.exists()
