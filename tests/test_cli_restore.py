import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clrface.photo
from clrface.cli import build_parser, main
from clrface.errors import ClrfaceError
from clrface.model_folder import merged_spec, package_weights, read_spec
from clrface.options import FidelityMap, RestoreOptions


def _face_like(path: Path, size: int = 48, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return a


def _huge_png_header(path: Path, w: int = 12_000, h: int = 12_000) -> None:
    """A PNG whose header claims w x h pixels (no pixel data): load_image must refuse it from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_folder_with_a_corrupt_file(tmp_path, model_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _face_like(src / "good.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    rc = main(["restore", str(src), "-o", str(out), "--model", str(model_dir), "--aligned", "--steps", "2",
               "--samples", "2", "--irn-detail", "0.5", "--irn-detail-octaves", "2", "--irn-tone", "4"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if "broken.jpg" in ln]
    assert len(lines) == 1 and lines[0].startswith("clrface: error:")
    assert Image.open(out / "final" / "good_s0.png").size == (48, 48)
    assert (out / "final" / "good_s1.png").is_file() and (out / "restored_faces" / "good_0_s1.png").is_file()
    assert Image.open(out / "cmp" / "good_0_s0.png").size == (2 * 32, 32)  # input crop | restored
    report = json.loads((out / "report.json").read_text())
    assert [f["input"] for f in report["failures"]] == [str(src / "broken.jpg")]
    (img,) = report["images"]
    assert len(img["faces"][0]["id_vs_irn"]) == 2 and img["seconds"] > 0
    assert img["sampling"]["nfe"] == 3 and img["sampling"]["sigma_start"] == pytest.approx(0.2 ** 0.5, rel=1e-5)
    assert img["sampling"]["irn_detail"] == 0.5 and img["sampling"]["irn_detail_octaves"] == 2
    assert img["sampling"]["irn_tone"] == 4


def test_folder_with_an_impossible_option_fails_once_before_the_first_file(tmp_path, model_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        _face_like(src / name)
    rc = main(["restore", str(src), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--aligned",
               "--irn-tone", "32"])  # the test model's resolution
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err == ["clrface: error: irn_tone 32 px must be below the model's resolution 32 px"]
    assert not (tmp_path / "out" / "final").exists()


def test_no_face_photo_is_copied_with_a_warning(tmp_path, model_dir, capsys):
    photo = np.full((60, 90, 3), 200, np.uint8)
    photo[20:40, 30:60] = (10, 120, 30)
    Image.fromarray(photo).save(tmp_path / "wall.png")
    out = tmp_path / "out"
    rc = main(["restore", str(tmp_path / "wall.png"), "-o", str(out), "--model", str(model_dir)])
    cap = capsys.readouterr()
    assert rc == 0 and "no face" in cap.err and "warning" in cap.err
    assert np.array_equal(np.asarray(Image.open(out / "final" / "wall.png")), photo)
    assert json.loads((out / "report.json").read_text())["images"][0]["no_face"] is True
    assert not (out / "restored_faces").exists()
    assert "--aligned" not in cap.err  # a wide picture: no hint
    # a small square picture without a detected face is most likely a face crop: the warning says how to restore it
    Image.fromarray(photo[:48, :48]).save(tmp_path / "crop.png")
    assert main(["restore", str(tmp_path / "crop.png"), "-o", str(tmp_path / "o2"), "--model", str(model_dir)]) == 0
    assert "if it is an aligned face crop, restore it as one: --aligned" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["corrupt", "tiny", "huge"])
def test_bad_single_input_is_one_line(tmp_path, model_dir, capsys, kind):
    p = tmp_path / f"{kind}.png"
    if kind == "corrupt":
        p.write_bytes(b"garbage")
    elif kind == "tiny":
        Image.fromarray(np.zeros((10, 40, 3), np.uint8)).save(p)
    else:
        _huge_png_header(p)
    rc = main(["restore", str(p), "-o", str(tmp_path / "out"), "--model", str(model_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"clrface: error: {p}")
    assert {"corrupt": "not an image", "tiny": "too small", "huge": "too large"}[kind] in err[0]


def test_wrong_kind_model_folder_is_one_line(tmp_path, model_dir, capsys):
    _face_like(tmp_path / "a.png")
    rc = main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", str(model_dir / "prior")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "missing vqgan/ and prior/" in err[0]
    rc = main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", "no-such-model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "no-such-model" in err[0]
    for flag, value, message in (("--fidelity", "2", "must be in [0, 1], got 2"),
                                 ("--bg-upscale", "0", "must be >= 1, got 0"),
                                 ("--threads", "-1", "must be >= 1, got -1")):
        with pytest.raises(SystemExit) as e:  # refused by the parser, as every other flag's bad value
            main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", str(model_dir), flag,
                  value])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].endswith(message) and flag in err[-1]


def test_never_overwrites_inputs(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    a = _face_like(out / "final" / "a.png")  # the input sits exactly where its output would go
    rc = main(["restore", str(out / "final"), "-o", str(out), "--model", str(model_dir), "--aligned", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "refusing to overwrite" in err
    assert np.array_equal(np.asarray(Image.open(out / "final" / "a.png")), a)


def test_output_defaults_to_results_in_the_current_folder(tmp_path, model_dir, capsys, monkeypatch):
    _face_like(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    rc = main(["restore", "a.png", "--model", str(model_dir), "--aligned", "--steps", "1"])
    assert rc == 0 and "into results" in capsys.readouterr().out
    assert Image.open(tmp_path / "results" / "final" / "a.png").size == (48, 48)


def test_help_names_every_flag():
    text = build_parser()._subparsers._group_actions[0].choices["restore"].format_help()
    for flag in ("--model", "--aligned", "--upscale", "--bg-upscale", "--bg-model", "--bg-tile", "--fidelity",
                 "--steps", "--sampler", "--seed", "--samples", "--device", "--dtype", "--batch-size", "--mode",
                 "--output", "--irn-detail", "--sigma-start", "--guidance-scale"):
        assert flag in text
    assert "sigma_start" in text and "guidance" in text  # the fidelity mapping is documented
    fm = FidelityMap()  # ... with the numbers the code uses
    flat = " ".join(text.split())
    assert (f"sigma_start = {fm.sigma_start_at_0}^(1-f) * {fm.sigma_start_at_1}^f, "
            f"guidance scale = {fm.guidance_at_1} * f") in flat
    assert fm.guidance_at_0 == 0
    # ... and the installed models' maps, as their restore.json set them
    base = read_spec(package_weights("default"))
    spec = {"default": base, "fast": merged_spec(read_spec(package_weights("fast")), base)}
    dm, fm_fast = (FidelityMap(**spec[m]["fidelity_map"]) for m in ("default", "fast"))
    assert (f"sigma_start = {dm.sigma_start_at_0}^(1-f) * {dm.sigma_start_at_1}^f, guidance scale = "
            f"{dm.guidance_at_1:.1f} * f (fast: {fm_fast.guidance_at_1:.1f} * f), default fidelity "
            f"{spec['default']['defaults']['fidelity']}") in flat
    assert (fm_fast.sigma_start_at_0, fm_fast.sigma_start_at_1) == (dm.sigma_start_at_0, dm.sigma_start_at_1)
    assert spec["fast"]["defaults"]["fidelity"] == spec["default"]["defaults"]["fidelity"]


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert e.value.code == 0 and f'version = "{capsys.readouterr().out.split()[1]}"' in pyproject


def test_demo_writes_the_comparison(tmp_path, model_dir, capsys, monkeypatch):
    pytest.importorskip("skimage")
    rc = main(["demo", "-o", f"{tmp_path / 'demo'}/", "--model", str(model_dir), "--steps", "1"])
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith(f"see {tmp_path / 'demo' / 'demo_cmp.png'}")
    cmp = Image.open(tmp_path / "demo" / "demo_cmp.png")
    assert cmp.size == (3 * 512, 512)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["degradation"]["seed"] == 1 and report["faces_total"] == 1
    # the degradation is reproducible: the degraded third of the strip is identical across runs
    first = np.asarray(Image.open(tmp_path / "demo" / "degraded.png"))
    # (the second run without -o, into results/demo as `restore` writes into results)
    monkeypatch.chdir(tmp_path)
    main(["demo", "--model", str(model_dir), "--steps", "1"])
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "results" / "demo" / "degraded.png")))


def test_min_face_reaches_the_photo_search(tmp_path, model_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(clrface.photo, "align_faces", lambda *a, **k: seen.append(k["min_face"]) or [])
    _face_like(tmp_path / "a.png", size=64)
    for extra, want in (([], 32), (["--min-face", "80"], 80)):
        assert main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / f"o{want}"), "--model", str(model_dir),
                     *extra]) == 0
        assert seen.pop() == want
    with pytest.raises(SystemExit):
        main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o8"), "--min-face", "8"])
    with pytest.raises(ClrfaceError, match="min_face must be an integer number of pixels >= 16"):
        RestoreOptions(min_face=8)


def test_training_without_accelerate_says_which_extra_to_install():
    code = ("import sys; sys.modules['accelerate'] = None\nfrom clrface.cli import main\n"
            "raise SystemExit(main(['train', 'irn', '--config', 'configs/irn-128.yaml']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 1 and r.stderr.strip() == "clrface: error: training needs accelerate: pip install " \
        "'clrface[train]'"


def test_the_parser_is_built_without_torch():
    code = "import sys\nfrom clrface.cli import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"  # `clrface --help` and argument errors answer without loading torch


@pytest.mark.parametrize("flags,needs", [(["--bg-tile", "128"], "--bg-tile needs --bg-model"),
                                         (["--reference-guidance", "10"], "need --reference")])
def test_flags_without_their_partner_are_refused(tmp_path, model_dir, capsys, flags, needs):
    _face_like(tmp_path / "a.png")
    rc = main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", str(model_dir),
               "--aligned", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and needs in err[0]
    assert not (tmp_path / "out" / "final").exists()


def test_a_huge_guidance_scale_warns(tmp_path, model_dir, capsys):
    _face_like(tmp_path / "a.png")
    args = ["restore", str(tmp_path / "a.png"), "--model", str(model_dir), "--aligned", "--steps", "1"]
    assert main([*args, "-o", str(tmp_path / "o1"), "--guidance-scale", "1e7"]) == 0
    assert "--guidance-scale 1e+07 is far above the measured range (up to 40" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "o2"), "--guidance-scale", "40"]) == 0
    assert "far above" not in capsys.readouterr().err
