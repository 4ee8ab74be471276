import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clrface.cli import main
from clrface.data.datasets import PairedFaces, build_testset, degrade_files, load_face_folder
from clrface.data.degradation import DegradationParams, apply_degradation, degrade, get_preset
from clrface.data.io import load_image, to_uint8
from clrface.data.realistic import RealisticConfig
from clrface.errors import ClrfaceError


def face(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 60 + 120 * np.exp(-((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - 0.5) ** 2) / 0.05)[..., None]
    img = img * rng.uniform(0.5, 1.0, 3) + 30 * (xx < 0.3)[..., None]  # asymmetric, so a flip is visible
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def face_dir(tmp_path: Path) -> Path:
    d = tmp_path / "faces"
    d.mkdir()
    for i in range(5):
        Image.fromarray(face(i)).save(d / f"{i:03d}.png")
    return d


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def u8(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def test_paired_faces_items_match_the_numpy_degradation(face_dir: Path):
    ds = PairedFaces(face_dir, "bfr", deterministic=True, base_seed=10)
    assert len(ds) == 5 and ds.size == 64 and ds.cfg == get_preset("bfr", 64)
    it = ds[2]
    assert it["gt"].shape == it["lq"].shape == (3, 64, 64) and it["gt"].dtype == torch.float32
    np.testing.assert_array_equal(u8(it["gt"]), face(2))
    ref, p = degrade(face(2), get_preset("bfr", 64), 12)  # seed = base_seed + index
    np.testing.assert_array_equal(u8(it["lq"]), ref)
    assert it["params"] == p.to_dict() and it["index"] == 2
    again = ds[2]
    assert torch.equal(again["lq"], it["lq"])
    assert not torch.equal(ds[3]["lq"], it["lq"])


def test_random_mode_draws_from_torch_rng_and_flips_pairs_together():
    faces = torch.from_numpy(np.stack([face(i) for i in range(4)]))
    ds = PairedFaces(faces, "bfr", hflip=True)
    torch.manual_seed(0)
    a = [ds[0] for _ in range(12)]
    torch.manual_seed(0)
    b = [ds[0] for _ in range(12)]
    assert all(torch.equal(x["lq"], y["lq"]) for x, y in zip(a, b))  # reproducible under torch.manual_seed
    assert len({json.dumps(x["params"]) for x in a}) == 12  # a new draw every time
    flipped = [np.array_equal(u8(x["gt"]), face(0)[:, ::-1]) for x in a]
    plain = [np.array_equal(u8(x["gt"]), face(0)) for x in a]
    assert all(f != p for f, p in zip(flipped, plain)) and 0 < sum(flipped) < 12
    # LQ degrades the flipped GT, not the original: a noise-free replay of the recorded parameters fits it better
    for x in (x for x, f in zip(a, flipped) if f):
        p = DegradationParams.from_dict({**x["params"], "noise_sigma": 0.0})
        lq, gt = u8(x["lq"]).astype(int), u8(x["gt"])
        err_same = np.abs(apply_degradation(gt, p, 0) - lq).mean()
        err_mirror = np.abs(apply_degradation(np.ascontiguousarray(gt[:, ::-1]), p, 0) - lq).mean()
        assert err_same < err_mirror


def test_dataloader_collates_params():
    faces = torch.from_numpy(np.stack([face(i) for i in range(4)]))
    ds = PairedFaces(faces, "x32", deterministic=True)  # jpeg_q = -1, never None
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["lq"].shape == (4, 3, 64, 64)
    assert batch["params"]["scale"].tolist() == [4.0] * 4  # ×32 at 512 px is ×4 at 64 px
    assert batch["params"]["jpeg_q"].tolist() == [-1] * 4


def test_size_resizes_tensor_source_and_scales_the_preset():
    faces = torch.from_numpy(np.stack([face(i) for i in range(2)]))
    ds = PairedFaces(faces, get_preset("bfr"), size=32, deterministic=True)
    assert ds.size == 32 and ds.cfg.scale == (1.0, 2.0) and ds[0]["lq"].shape == (3, 32, 32)
    with pytest.raises(ClrfaceError, match=r"needs uint8 \[N, S, S, 3\]"):
        PairedFaces(torch.zeros(2, 8, 9, 3, dtype=torch.uint8))


def test_build_testset_writes_what_paired_faces_yields(face_dir: Path, tmp_path: Path):
    (face_dir / "zz_broken.png").write_bytes(b"not a png")
    out = tmp_path / "test"
    m = build_testset(face_dir, out, "bfr", seed=3)
    assert [e["name"] for e in m["images"]] == [f"{i:03d}.png" for i in range(5)]
    assert len(m["failures"]) == 1 and "zz_broken.png" in m["failures"][0]["source"]
    assert json.loads((out / "manifest.json").read_text()) == m
    (face_dir / "zz_broken.png").unlink()
    ds = PairedFaces(face_dir, "bfr", deterministic=True, base_seed=3)
    for i, e in enumerate(m["images"]):
        lq = read(out / "lq" / e["name"])
        gt = read(out / "gt" / e["name"])
        np.testing.assert_array_equal(gt, face(i))
        np.testing.assert_array_equal(lq, u8(ds[i]["lq"]))
        assert e["params"] == ds[i]["params"] and e["seed"] == 3 + i
    m2 = build_testset(face_dir, tmp_path / "small", "x32", seed=0, size=32, limit=2)
    assert len(m2["images"]) == 2 and m2["images"][0]["params"]["scale"] == 2.0
    assert read(tmp_path / "small" / "lq" / "000.png").shape == (32, 32, 3)


def test_degrade_files_single_folder_and_no_overwrite(face_dir: Path, tmp_path: Path):
    src = face_dir / "001.png"
    m = degrade_files(src, tmp_path / "one.png", "bfr", seed=5)
    out = read(tmp_path / "one.png")
    np.testing.assert_array_equal(out, degrade(face(1), get_preset("bfr", 64), 5)[0])
    assert json.loads((tmp_path / "one.json").read_text())["images"][0]["params"] == m["images"][0]["params"]
    with pytest.raises(ClrfaceError, match="overwrite"):
        degrade_files(src, src, "bfr")
    with pytest.raises(ClrfaceError, match="overwrite"):
        degrade_files(face_dir, face_dir, "bfr")  # outputs would be <stem>.png = the inputs

    Image.fromarray(face(9)).save(face_dir / "001.jpg")  # same stem as 001.png
    (face_dir / "bad.png").write_bytes(b"")
    Image.fromarray(face(8)[:, :40]).save(face_dir / "wide.png")  # 40x64: stretched to 32x32, with a warning
    logged = []
    m = degrade_files(face_dir, tmp_path / "out", "gray", seed=0, size=32, log=logged.append)
    outs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "001_jpg.png" in outs and "001_png.png" in outs and "manifest.json" in outs  # the names restore gives
    assert [line for line in logged if "stretched" in line] == [
        f"clrface: warning: {face_dir / 'wide.png'}: 40x64 stretched to 32x32 (--size makes images square; crop it "
        "square first to keep its proportions)"]
    with pytest.raises(ClrfaceError, match="a folder input writes a folder of images"):
        degrade_files(face_dir, tmp_path / "f2.png", "bfr")
    (face_dir / "wide.png").unlink()
    assert len(m["images"]) == 7 and len(m["failures"]) == 1 and "empty" in m["failures"][0]["error"]
    assert all(e["size"] == 32 and e["params"]["gray"] for e in m["images"])


def test_cli_degrade_and_make_testset(face_dir: Path, tmp_path: Path, capsys):
    assert main(["degrade", str(face_dir), str(tmp_path / "d"), "--preset", "x32", "--seed", "1"]) == 0
    assert len(list((tmp_path / "d").glob("*.png"))) == 5
    for i in (0, 1):  # image i (sorted) with seed SEED + i, the preset scaled to the image
        want = degrade(load_image(face_dir / f"00{i}.png"), get_preset("x32", 64), 1 + i)[0]
        assert np.array_equal(load_image(tmp_path / "d" / f"00{i}.png"), want)
    assert main(["make-testset", str(face_dir), str(tmp_path / "t"), "--limit", "3"]) == 0
    assert len(list((tmp_path / "t" / "lq").glob("*.png"))) == 3
    want = PairedFaces(face_dir, "bfr", deterministic=True, base_seed=0)[0]["lq"]
    assert np.array_equal(load_image(tmp_path / "t" / "lq" / "000.png"), to_uint8(want[None])[0].numpy())
    (face_dir / "bad.png").write_bytes(b"")
    assert main(["degrade", str(face_dir), str(tmp_path / "d2")]) == 1  # reports, continues, exits 1
    assert len(list((tmp_path / "d2").glob("*.png"))) == 5
    assert main(["degrade", str(face_dir / "000.png"), str(face_dir / "000.png")]) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "overwrite" in err


def test_load_face_folder_feeds_paired_faces(face_dir: Path):
    faces = load_face_folder(face_dir)
    a = PairedFaces(faces, "bfr", deterministic=True)[4]
    b = PairedFaces(face_dir, "bfr", deterministic=True)[4]
    assert torch.equal(a["lq"], b["lq"])


def test_load_face_folder_concatenates_a_list_in_order(face_dir: Path, tmp_path: Path):
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.fromarray(face(9)).save(extra / "000.png")
    both = load_face_folder([face_dir, extra])
    assert both.shape == (6, 64, 64, 3)
    assert torch.equal(both[:5], load_face_folder(face_dir))
    assert torch.equal(both[5], torch.from_numpy(face(9)))
    assert load_face_folder([face_dir, extra], limit=2).shape[0] == 2
    with pytest.raises(ClrfaceError, match="no face folders"):
        load_face_folder([])
    with pytest.raises(ClrfaceError, match=r"^data/nowhere: no such folder \(relative to the current folder "):
        load_face_folder("data/nowhere")  # a config's relative path, run from another folder
    with pytest.raises(ClrfaceError, match=r"empty: no face images found$"):
        load_face_folder((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_build_testset_realistic_mix_grays_targets_and_is_repeatable(face_dir: Path, tmp_path: Path):
    off = dict(second_prob=0.0, fade_prob=0.0, grain_prob=0.0)
    m = build_testset(face_dir, tmp_path / "gray", "bfr", seed=3, realistic=RealisticConfig(**off, gray_prob=1.0))
    assert m["realistic"]["gray_prob"] == 1.0 and "params" not in m["images"][0]
    for e in m["images"]:
        gt, lq = read(tmp_path / "gray" / "gt" / e["name"]), read(tmp_path / "gray" / "lq" / e["name"])
        assert (gt.max(-1) - gt.min(-1)).max() <= 1 and (lq.max(-1) - lq.min(-1)).max() <= 1  # gray, up to rounding
    colour = build_testset(face_dir, tmp_path / "a", "bfr", seed=3, realistic=RealisticConfig(**off, gray_prob=0.0))
    again = build_testset(face_dir, tmp_path / "b", "bfr", seed=3, realistic=RealisticConfig(**off, gray_prob=0.0))
    assert colour["images"] == again["images"]
    for i, e in enumerate(colour["images"]):
        np.testing.assert_array_equal(read(tmp_path / "a" / "gt" / e["name"]), face(i))  # colour targets untouched
        np.testing.assert_array_equal(read(tmp_path / "a" / "lq" / e["name"]), read(tmp_path / "b" / "lq" / e["name"]))


def test_build_testset_keeps_faces_that_share_a_stem_apart(face_dir: Path, tmp_path: Path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    first, second = sorted(face_dir.iterdir())[:2]
    shutil.copy(first, src / "a.png")
    Image.open(second).convert("RGB").save(src / "a.jpg", quality=95)
    m = build_testset(src, tmp_path / "t", "bfr", seed=0)
    names = [im["name"] for im in m["images"]]
    assert names == ["a_jpg.png", "a_png.png"] and [im["source"] for im in m["images"]] == ["a.jpg", "a.png"]
    assert sorted(p.name for p in (tmp_path / "t" / "gt").iterdir()) == names
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            main(["make-testset", str(src), str(tmp_path / "u"), "--limit", bad])
    # an output the system refuses (a file where a folder goes) is a one-line error, not a traceback
    (tmp_path / "file").write_text("x")
    assert main(["make-testset", str(src), str(tmp_path / "file" / "t")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("clrface: error:")
