"""The README's Python API example, run as written against the shipped default model."""

import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clrface.device
import clrface.restorer
from clrface import Restorer
from clrface.demo import demo_image
from clrface.errors import ClrfaceError
from clrface.faces.align import align_faces

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
    (face,) = result.faces  # the face only (the weak detection on the mission patch is dropped)
    assert face.crops_out[0].shape == (128, 128, 3)
    assert face.box.tolist() == pytest.approx([175, 76, 266, 167], abs=1)
    assert 0.9 < face.id_vs_input[0] <= 1.0  # clean input: the restored face keeps its identity
    assert "(512, 512, 3)" in capsys.readouterr().out


def test_api_accepts_paths_and_pil_and_takes_overrides(tmp_path):
    r = Restorer.from_pretrained("default")
    (crop, _), = align_faces(demo_image(), 128, max_faces=1)
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
    def native(answer: bool) -> None:  # the CPU's bf16 support, as auto and the emulation warning see it
        for module in (clrface.device, clrface.restorer):
            monkeypatch.setattr(module, "native_bf16", lambda device, flags=None: answer)

    native(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native bf16: nothing to warn about
        assert Restorer.from_pretrained("default", dtype="auto").dtype == torch.bfloat16
        assert Restorer.from_pretrained("default", dtype="bfloat16").dtype == torch.bfloat16
    native(False)
    assert Restorer.from_pretrained("default", dtype="auto").dtype == torch.float32
    with pytest.warns(UserWarning, match="no native bfloat16 .*: emulated, about 8-10x slower than float32"):
        assert Restorer.from_pretrained("default", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="float16 on a CPU is emulated"):
        assert Restorer.from_pretrained("default", dtype="float16").dtype == torch.float16
    with pytest.raises(ClrfaceError, match="dtype must be 'auto', one of float32, bfloat16, float16"):
        Restorer.from_pretrained("default", dtype="half")


@pytest.fixture(scope="module")
def shipped() -> Restorer:
    return Restorer.from_pretrained("default")


def _crop() -> np.ndarray:
    return np.asarray(Image.fromarray(demo_image()[40:260, 130:350]).resize((128, 128)))


def test_bad_options_are_one_error_before_any_work(shipped, monkeypatch):
    monkeypatch.setattr(shipped, "restore_faces", lambda *a, **kw: pytest.fail("restored with a bad option"))
    for kw, words in [({"steps": "3"}, "steps must be an integer, got '3'"), ({"steps": 2.5}, "steps must be an "
                      "integer"), ({"fidelity": "high"}, "fidelity must be a number"), ({"upscale": True},
                      "upscale must be an integer"), ({"max_faces": 1.5}, "max_faces must be an integer"),
                      ({"fidelty": 0.3}, "unknown option(s) 'fidelty'; known: fidelity"),
                      ({"keep_detail": "no"}, "keep_detail must be True or False, got 'no'"),
                      ({"aligned": 1}, "aligned must be True or False, got 1")]:
        with pytest.raises(ClrfaceError) as e:
            shipped.restore(demo_image(), **kw)
        assert words in str(e.value)
    o = shipped.options(steps=np.int64(3), upscale=np.int64(2), fidelity=np.float32(0.25))
    assert (type(o.steps), o.upscale, type(o.fidelity)) == (int, 2, float)  # NumPy scalars taken as numbers


def test_options_the_mode_does_not_read_are_warned_about(shipped):
    ignored = r"mode irn does not use fidelity, seed \(read in modes full and prior\): without effect here"
    with pytest.warns(UserWarning, match=ignored):
        shipped.restore(_crop(), aligned=True, fidelity=0.1, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shipped.restore(_crop(), aligned=True, mode="full", steps=1, fidelity=0.1)
    assert not [w for w in caught if "does not use" in str(w.message)]


def test_the_lower_level_calls_take_the_models_defaults_and_check_their_input(shipped):
    crops = np.stack([_crop(), _crop()[:, ::-1]])
    out = shipped.restore_crops(crops)  # no options: the model's (mode irn), not RestoreOptions()'s full mode
    assert out.sampling.nfe == 0 and out.restored.shape == (2, 1, 3, 128, 128)
    assert shipped.restore_faces(torch.zeros(1, 3, 128, 128)).sampling.nfe == 0
    for bad, words in [(crops[0], "one crop: crops[None]"), (crops.astype(np.float32) / 255, "uint8 crops"),
                       (crops[:0], "F >= 1")]:
        with pytest.raises(ClrfaceError, match=re.escape(words)):
            shipped.restore_crops(bad)
    for bad in (torch.zeros(1, 3, 128, 128, dtype=torch.uint8), np.zeros((1, 3, 128, 128), np.float32)):
        with pytest.raises(ClrfaceError, match="float tensor of faces"):
            shipped.restore_faces(bad)


def test_result_arrays_are_the_callers(shipped):
    crop = _crop().copy()
    res = shipped.restore(crop, aligned=True, keep_detail=False)
    arrays = [res.image, res.faces[0].crop_in, res.faces[0].crops_out[0]]
    assert all(a.flags.c_contiguous and a.flags.writeable for a in arrays)
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays + [crop]) for b in (arrays + [crop])[i + 1:])


def test_one_restorer_from_two_threads_gives_what_one_thread_gives(shipped):
    face = demo_image()
    photos = [face, np.concatenate([face, face[:, ::-1]], 1)]  # one face, then two
    alone = [shipped.restore(p).image for p in photos]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda p: shipped.restore(p).image, photos))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_devices_and_dtypes_are_checked_in_one_line():
    for device in ("gpu", "CPU", "meta"):
        with pytest.raises(ClrfaceError, match=f"device '{device}': choose cpu, cuda"):
            Restorer.from_pretrained("default", device=device)
    for dtype in (torch.int8, 16):
        with pytest.raises(ClrfaceError, match="dtype must be"):
            Restorer.from_pretrained("default", dtype=dtype)


def test_an_installed_models_name_is_not_taken_by_a_folder_that_holds_none(tmp_path, monkeypatch):
    (tmp_path / "fast").mkdir()
    monkeypatch.chdir(tmp_path)
    assert Path(Restorer.from_pretrained("fast").source).parent.name == "weights"
    with pytest.raises(ClrfaceError, match="empty model name"):
        Restorer.from_pretrained("")
