"""Folder restores keep every result: unique names, resume by content, write errors, files not restored."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

import clrface.batch
from clrface.batch import restore_files
from clrface.cli import main
from clrface.errors import ClrfaceError
from clrface.options import RestoreOptions

QUIET = dict(aligned=True, progress=False, log=lambda s: None)


def _crop(path: Path, seed: int, size: tuple[int, int] = (40, 40)) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(a).save(path)
    return a


def test_colliding_inputs_each_get_their_own_result(tmp_path, restorer):
    src = tmp_path / "in"
    src.mkdir()
    inputs = [src / "x.jpg", src / "x.png", src / "x_png.jpg"]
    for i, p in enumerate(inputs):
        _crop(p, seed=i)
    out = tmp_path / "out"
    report = restore_files(inputs, out, restorer, restorer.options(steps=1, mode="prior"), **QUIET)
    assert [r["input"] for r in report["images"]] == [str(p) for p in inputs]
    finals = sorted((out / "final").glob("*.png"))
    assert len(finals) == 3 and len({f.read_bytes() for f in finals}) == 3
    assert (out / "final" / "x_jpg.png").is_file()  # the input without a collision keeps its name
    assert {r["final"][0] for r in report["images"]} == {str(f) for f in finals}


def _restored_folder(tmp_path: Path, restorer, n: int) -> tuple[list[Path], Path, RestoreOptions]:
    """n random crops face0.png .. restored once into tmp_path/out: (inputs, out, options)."""
    src = tmp_path / "in"
    src.mkdir()
    inputs = [src / f"face{i}.png" for i in range(n)]
    for i, p in enumerate(inputs):
        _crop(p, seed=i)
    out, o = tmp_path / "out", restorer.options(steps=1, mode="prior")
    restore_files(inputs, out, restorer, o, **QUIET)
    return inputs, out, o


def test_resume_redoes_an_input_replaced_since(tmp_path, restorer):
    inputs, out, o = _restored_folder(tmp_path, restorer, 3)
    before = (out / "final" / "face1.png").read_bytes()
    _crop(inputs[1], seed=99)  # same name, new content
    st = inputs[1].stat()
    os.utime(inputs[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = restore_files(inputs, out, restorer, o, **QUIET)
    assert again["skipped"] == 2 and len(again["images"]) == 3
    assert (out / "final" / "face1.png").read_bytes() != before


def test_unwritable_output_fails_before_the_model_loads(tmp_path, capsys):
    _crop(tmp_path / "a.png", seed=0)
    (tmp_path / "file").write_text("x")
    rc = main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "file" / "out"), "--model", "no-such-model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1  # about the output folder: the (missing) model was never looked at
    assert err[0].startswith(f"clrface: error: {tmp_path / 'file' / 'out'}: cannot write") and "no-such" not in err[0]


def test_a_full_disk_fails_that_input_only_and_the_report_is_written(tmp_path, model_dir, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(["a", "b", "c"]):
        _crop(src / f"{name}.png", seed=i)
    save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        if "b.png" in str(fp) and "final" in str(fp):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    rc = main(["restore", str(src), "-o", str(out), "--model", str(model_dir), "--aligned", "--steps", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clrface:")]
    assert rc == 1 and err == [f"clrface: error: {out / 'final' / 'b.png'}: cannot write (No space left on device)"]
    report = json.loads((out / "report.json").read_text())
    assert [Path(r["input"]).name for r in report["images"]] == ["a.png", "c.png"]
    assert [Path(f["input"]).name for f in report["failures"]] == ["b.png"]
    assert not (out / "final" / "b.png").exists() and not list((out / "final").glob(".*"))


def test_files_not_restored_are_reported(tmp_path, model_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _crop(src / "good.png", seed=0)
    (src / "notes.txt").write_text("holiday 1962")
    (src / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic not decodable here")
    (src / ".hidden.png").write_bytes(b"ours")
    (src / "sub").mkdir()
    _crop(src / "sub" / "deeper.png", seed=2)
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    readable = features.check("avif")
    if readable:
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / "new.avif")
    out = tmp_path / "out"
    rc = main(["restore", str(src), "-o", str(out), "--model", str(model_dir), "--aligned", "--steps", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    report = json.loads((out / "report.json").read_text())
    ignored = {Path(r["input"]).name: r["reason"] for r in report["ignored"]}
    assert set(ignored) == {"notes.txt", "phone.heic", "sub", "gone.png"} and "(.heic)" in ignored["phone.heic"]
    assert ignored["sub"] == "a folder: sub-folders are searched with --recursive"
    assert ignored["gone.png"] == "a broken link: its target does not exist"
    assert "4 other file(s) or folder(s) not restored" in cap.out
    assert [Path(r["input"]).name for r in report["images"]] == ["good.png", "new.avif"][:1 + readable]


def test_recursive_restores_sub_folders_flat_and_never_its_own_outputs(tmp_path, model_dir, capsys):
    src = tmp_path / "album"
    for sub, seed in (("1962", 0), ("1975", 1), ("1975/.thumbs", 2)):
        (src / sub).mkdir(parents=True)
        _crop(src / sub / "portrait.png", seed=seed)
    (src / "1975" / "notes.txt").write_text("x")
    out = src / "restored"  # inside the input folder: its results must not become inputs of a rerun
    args = ["restore", str(src), "-o", str(out), "--model", str(model_dir), "--aligned", "--steps", "1", "--recursive"]
    for _ in range(2):
        assert main(args) == 0, capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())
        assert [Path(r["input"]).relative_to(src).as_posix() for r in report["images"]] == \
            ["1962/portrait.png", "1975/portrait.png"]
        assert [Path(r["input"]).relative_to(src).as_posix() for r in report["ignored"]] == ["1975/notes.txt"]
    finals = sorted(p.name for p in (out / "final").iterdir())
    assert len(finals) == 2 and all(n.startswith("portrait_") for n in finals)  # same name: hashed apart


def test_output_folder_equal_to_the_input_folder_never_reads_its_results(tmp_path, model_dir, capsys):
    src = tmp_path / "album"
    (src / "1975").mkdir(parents=True)
    _crop(src / "a.png", seed=0)
    _crop(src / "1975" / "b.png", seed=1)
    args = ["restore", str(src), "-o", str(src), "--model", str(model_dir), "--aligned", "--steps", "1", "--recursive"]
    for _ in range(2):  # the second run sees final/, cmp/, cropped_faces/ and restored_faces/ in its input folder
        assert main(args) == 0, capsys.readouterr().err
        report = json.loads((src / "report.json").read_text())
        assert [Path(r["input"]).relative_to(src).as_posix() for r in report["images"]] == ["1975/b.png", "a.png"]
    assert sorted(p.name for p in (src / "final").iterdir()) == ["a.png", "b.png"]
    assert len(list((src / "cmp").iterdir())) == 2
    # a result folder named as the input is restored: its files are what the user asked for
    assert main(["restore", str(src / "final"), "-o", str(src), "--model", str(model_dir), "--aligned", "--steps",
                 "1", "--overwrite"]) == 1  # both would be written over themselves: refused per file
    assert "refusing to overwrite the input file" in capsys.readouterr().err


def test_results_of_an_earlier_run_into_the_input_folder_are_not_inputs(tmp_path, model_dir, capsys):
    src = tmp_path / "album"
    (src / "1975").mkdir(parents=True)
    _crop(src / "a.png", seed=0)
    _crop(src / "1975" / "b.png", seed=1)
    common = ["--model", str(model_dir), "--aligned", "--steps", "1"]
    assert main(["restore", str(src / "1975"), "-o", str(src / "1975"), *common]) == 0  # results beside b.png
    assert main(["restore", str(src), "-o", str(src), *common]) == 0  # and beside a.png
    out = tmp_path / "elsewhere"
    for recursive in ([], ["--recursive"]):
        assert main(["restore", str(src), "-o", str(out), *common, *recursive]) == 0, capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())
        names = [Path(r["input"]).relative_to(src).as_posix() for r in report["images"]]
        assert names == (["1975/b.png", "a.png"] if recursive else ["a.png"])
        ignored = {Path(r["input"]).relative_to(src).as_posix(): r["reason"] for r in report["ignored"]}
        earlier = "written by an earlier restore into this folder"
        written = ("cmp", "cropped_faces", "final", "report.json", "restored_faces")
        want = {d: earlier for d in written}
        if recursive:
            want.update({f"1975/{d}": earlier for d in written})
        else:
            want["1975"] = "a folder: sub-folders are searched with --recursive"
        assert ignored == want
        # the summary line counts what a user might miss, not the earlier results
        printed = capsys.readouterr().out
        missed = "not restored" not in printed if recursive else "1 other file(s) or folder(s) not restored" in printed
        assert missed, printed


def test_a_photo_folder_that_only_looks_like_results_is_restored(tmp_path, model_dir, capsys):
    src = tmp_path / "album"
    (src / "final").mkdir(parents=True)  # the user's own "final" edits beside a scanner's report.json
    (src / "report.json").write_text('{"scanner": "epson"}')
    _crop(src / "final" / "edit1.png", seed=0)
    out = tmp_path / "out"
    args = ["restore", str(src), "-o", str(out), "--model", str(model_dir), "--aligned", "--steps", "1", "--recursive"]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [Path(r["input"]).relative_to(src).as_posix() for r in report["images"]] == ["final/edit1.png"]


def test_aligned_non_square_crop_warns(tmp_path, model_dir, capsys):
    _crop(tmp_path / "wide.png", seed=0, size=(48, 32))
    out = tmp_path / "out"
    rc = main(["restore", str(tmp_path / "wide.png"), "-o", str(out), "--model", str(model_dir), "--aligned",
               "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 0 and "48x32, not square" in err and "warning" in err
    (img,) = json.loads((out / "report.json").read_text())["images"]
    assert any("not square" in w for w in img["warnings"])


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "-2"), ("--sigma-start", "inf"),
                                        ("--fidelity", "nan"), ("--guidance-scale", "nan"), ("--sigma-start", "-inf"),
                                        ("--steps", "0"), ("--samples", "0"), ("--max-faces", "0"),
                                        ("--bg-tile", "16")])
def test_bad_numbers_are_rejected_at_parse_time(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["restore", str(tmp_path), "-o", str(tmp_path / "out"), f"{flag}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and flag in err[0] and value in err[0]


@pytest.mark.parametrize("args", [["align", "IN", "OUT", "--size", "0"],
                                  ["align", "IN", "OUT", "--upsample", "-3"],
                                  ["align", "IN", "OUT", "--max-faces", "-1"],
                                  ["degrade", "IN", "OUT", "--size", "-3"]])
def test_align_and_degrade_reject_bad_numbers_at_parse_time(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and args[-2] in err[-1] and "must be >=" in err[-1]


def test_options_refuse_non_finite_values():
    for kw in ({"sigma_start": float("inf")}, {"guidance_scale": float("nan")}, {"fidelity": float("nan")}):
        with pytest.raises(ClrfaceError, match="finite|fidelity"):
            RestoreOptions(**kw)


def test_a_rerun_redoes_an_input_whose_result_was_deleted(tmp_path, restorer):
    inputs, out, o = _restored_folder(tmp_path, restorer, 2)
    (out / "final" / "face0.png").unlink()
    again = restore_files(inputs, out, restorer, o, **QUIET)
    assert again["skipped"] == 1 and (out / "final" / "face0.png").is_file()
    assert [r["final"] for r in again["images"]] == [[str(out / "final" / f"face{i}.png")] for i in range(2)]


def test_a_rerun_with_nothing_left_to_do_says_so(tmp_path, model_dir, capsys):
    _crop(tmp_path / "a.png", seed=0)
    args = ["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--aligned",
            "--steps", "1"]
    assert main(args) == 0 and capsys.readouterr().out.startswith("restored 1 face(s) in 1 image(s)")
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == (f"nothing to do: the 1 input(s) were already restored into "
                                               f"{tmp_path / 'out'} with these options (--overwrite redoes them)")
    (tmp_path / "in").mkdir()
    for name in ("a.png", "broken.png"):
        (tmp_path / "in" / name).write_bytes((tmp_path / "a.png").read_bytes()[:None if name == "a.png" else 60])
    args[1] = str(tmp_path / "in")
    assert main(args) == 1 and capsys.readouterr().out.strip().startswith("restored 1 face(s) in 1 image(s)")
    assert main(args) == 1  # the broken file fails again; nothing else is redone
    assert capsys.readouterr().out.strip() == (f"nothing new restored into {tmp_path / 'out'}: 1 input(s) were "
                                               "already restored with these options, 1 failed")


def test_an_input_replacing_another_inputs_results_warns(tmp_path, model_dir, capsys):
    for folder, seed in (("one", 0), ("two", 1)):
        (tmp_path / folder).mkdir()
        _crop(tmp_path / folder / "x.png", seed=seed)
    out = tmp_path / "out"
    for folder in ("one", "two"):
        assert main(["restore", str(tmp_path / folder / "x.png"), "-o", str(out), "--model", str(model_dir),
                     "--aligned", "--steps", "1"]) == 0
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warn == [f"clrface: warning: {tmp_path / 'two' / 'x.png'}: replaces the results of "
                    f"{tmp_path / 'one' / 'x.png'} (same output name x)"]


def test_transparency_is_kept_and_an_animation_is_named(tmp_path, model_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, 40).round().astype(np.uint8), (40, 1))
    Image.fromarray(np.dstack([rgb, alpha])).save(src / "cutout.png")
    frames = [Image.fromarray(np.roll(rgb, k, 0)) for k in range(3)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(src / "scan.tif", save_all=True, append_images=frames[1:])
    out = tmp_path / "out"
    rc = main(["restore", str(src), "-o", str(out), "--model", str(model_dir), "--aligned", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 0
    final = np.asarray(Image.open(out / "final" / "cutout.png"))
    assert final.shape == (40, 40, 4) and np.array_equal(final[..., 3], alpha)  # same size: the alpha as it was
    assert Image.open(out / "final" / "anim.png").mode == "RGB"
    assert f"clrface: warning: {src / 'anim.gif'}: an animated image: only the first of its 3 frames was restored" \
        in err.splitlines()
    assert f"clrface: warning: {src / 'scan.tif'}: a multi-page image: only the first of its 3 pages was restored" \
        in err.splitlines()


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_the_photos_exif_is_kept_upright(tmp_path, model_dir, ext):
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 8, "TestCam"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
        tmp_path / "p.jpg", exif=exif.tobytes())
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "p.jpg"), "-o", str(out), "--model", str(model_dir), "--aligned",
                 "--steps", "1", "--ext", ext]) == 0
    final = Image.open(out / "final" / f"p.{ext}")
    assert final.size == (40, 48) and final.getexif()[0x0112] == 1 and final.getexif()[0x010F] == "TestCam"


def test_ext_jpg_writes_whole_photos_as_jpeg_and_says_what_it_drops(tmp_path, model_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((40, 40), 128, np.uint8)])).save(src / "cutout.png")
    Image.fromarray(rgb).save(src / "plain.png")
    out = tmp_path / "out"
    args = ["restore", str(src), "-o", str(out), "--model", str(model_dir), "--aligned", "--steps", "1"]
    assert main([*args, "--ext", "jpg"]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in (out / "final").iterdir()) == ["cutout.jpg", "plain.jpg"]
    jpg = Image.open(out / "final" / "plain.jpg")
    assert jpg.format == "JPEG" and jpg.mode == "RGB" and jpg.size == (40, 40)
    assert f"clrface: warning: {src / 'cutout.png'}: its transparency is not kept in JPG (--ext png keeps it)" \
        in err.splitlines()
    assert sorted(p.name for p in (out / "restored_faces").iterdir()) == ["cutout_0.png", "plain_0.png"]
    # the same options but PNG: another result, so the run redoes both inputs instead of skipping them
    assert main(args) == 0
    assert "by an earlier run" not in capsys.readouterr().out
    assert {p.name for p in (out / "final").iterdir()} >= {"cutout.png", "plain.png"}


def test_a_run_refused_for_its_options_leaves_no_output_folder(tmp_path, model_dir, capsys):
    _crop(tmp_path / "a.png", seed=0)
    out = tmp_path / "new" / "out"
    (tmp_path / "new").mkdir()
    rc = main(["restore", str(tmp_path / "a.png"), "-o", str(out), "--model", str(model_dir), "--irn-tone", "32"])
    err = capsys.readouterr().err.strip()  # refused against the model (the tiny one is 32 px), after the inputs
    assert rc == 1 and err == "clrface: error: irn_tone 32 px must be below the model's resolution 32 px"
    assert not out.exists()


def test_a_result_that_would_land_on_its_input_fails_before_the_work(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    _crop(out / "final" / "a.png", seed=0)
    before = (out / "final" / "a.png").read_bytes()
    monkeypatch.setattr("clrface.batch.restore_photo", lambda *a, **k: pytest.fail("restored before the check"))
    rc = main(["restore", str(out / "final"), "-o", str(out), "--model", str(model_dir), "--aligned"])
    err = capsys.readouterr().err
    assert rc == 1 and "refusing to overwrite the input file" in err
    assert (out / "final" / "a.png").read_bytes() == before


def test_a_large_photo_says_the_search_takes_a_while(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(clrface.batch, "LARGE_PHOTO_MP", 0.001)  # 40 x 40 = 0.0016 MP counts as large here
    _crop(tmp_path / "p.png", seed=0)
    assert main(["restore", str(tmp_path / "p.png"), "-o", str(tmp_path / "o"), "--model", str(model_dir)]) == 0
    assert (f"clrface: {tmp_path / 'p.png'}: 0.0 MP; searching it for faces takes a while (--min-face 64 searches "
            "~3.5x faster when its faces are larger)") in capsys.readouterr().err.splitlines()
    main(["restore", str(tmp_path / "p.png"), "-o", str(tmp_path / "o2"), "--model", str(model_dir), "--aligned"])
    assert "takes a while" not in capsys.readouterr().err  # a crop is not searched


def _files(out: Path) -> set[Path]:
    return {f for d in ("final", "cropped_faces", "restored_faces", "cmp") for f in (out / d).glob("*")}


def test_a_rerun_removes_what_the_earlier_result_of_a_name_had_and_this_one_has_not(tmp_path, restorer):
    src = tmp_path / "in"
    src.mkdir()
    _crop(src / "x.png", seed=0)
    out = tmp_path / "out"
    first = restore_files([src / "x.png"], out, restorer, restorer.options(steps=1, mode="prior", samples=3), **QUIET)
    assert _files(out) == clrface.batch.record_files(out, "x", first["images"][0])  # the record names every file
    assert len(_files(out)) == 3 + 1 + 3 + 3  # final, input crop, restored and side-by-side per sample
    again = restore_files([src / "x.png"], out, restorer, restorer.options(steps=1, mode="prior"), **QUIET)
    assert {f.name for f in _files(out)} == {"x.png", "x_0.png"}  # final/, cropped_faces/, restored_faces/, cmp/
    assert len(_files(out)) == 4 and _files(out) == clrface.batch.record_files(out, "x", again["images"][0])


def test_stale_faces_go_but_never_an_input(tmp_path):
    out = tmp_path / "out"
    old = {"final": ["elsewhere/final/p.png"], "faces": [{"index": 0}, {"index": 1}, {"index": 2}]}
    new = {"final": ["final/p.png"], "faces": [{"index": 0}]}
    for f in clrface.batch.record_files(out, "p", old):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    an_input = out / "cmp" / "p_2.png"  # restoring OUT/cmp into OUT: a file there may be an input
    clrface.batch.remove_stale(out, "p", old, new, inputs=[an_input])
    left = sorted(str(f.relative_to(out)) for f in _files(out))
    assert left == ["cmp/p_0.png", "cmp/p_2.png", "cropped_faces/p_0.png", "final/p.png", "restored_faces/p_0.png"]


def test_a_photo_without_a_face_is_copied_as_it_is(tmp_path, restorer):
    src = tmp_path / "in"
    src.mkdir()
    _crop(src / "wall.jpg", seed=3, size=(96, 64))
    _crop(src / "sky.png", seed=4, size=(96, 64))
    inputs = [src / "sky.png", src / "wall.jpg"]
    o = restorer.options(steps=1, mode="prior")
    quiet = dict(progress=False, log=lambda s: None)
    for ext, copied in (("png", {"sky.png"}), ("jpg", {"wall.jpg"})):
        out = tmp_path / ext
        report = restore_files(inputs, out, restorer, o, final_ext=ext, **quiet)
        assert all(r["no_face"] for r in report["images"])
        for p in inputs:
            final = out / "final" / f"{p.stem}.{ext}"
            assert (final.read_bytes() == p.read_bytes()) == (p.name in copied)  # a second JPEG generation: no
            assert np.array_equal(np.asarray(Image.open(final)), np.asarray(Image.open(p))) or ext == "jpg"
    up = restore_files(inputs, tmp_path / "up", restorer, restorer.options(steps=1, mode="prior", upscale=2),
                       **quiet)
    assert Image.open(up["images"][1]["final"][0]).size == (192, 128)  # enlarged: written, not copied
