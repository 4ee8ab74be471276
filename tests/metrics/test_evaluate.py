import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clrface.cli import main
from clrface.data.io import load_image, stack_images, to_model_range
from clrface.errors import ClrfaceError
from clrface.identity.facerec import load_facerec, perceptual_distance
from clrface.metrics.evaluate import (
    evaluate_folders,
    evaluate_tensors,
    format_table,
    lfw_verification,
    match_files,
    read_pairs,
)
from clrface.metrics.ids import cosine
from clrface.metrics.lmd import lmd_pair
from clrface.metrics.psnr_ssim import psnr, psnr_y, ssim, ssim_y


def _degrade(src, dst):
    im = Image.open(src).convert("RGB")
    lo = im.resize((32, 32), Image.Resampling.BICUBIC).resize((128, 128), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    lo.save(buf, "JPEG", quality=30)
    Image.open(buf).convert("RGB").save(dst)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, val_dir):
    root = tmp_path_factory.mktemp("eval")
    for d in ("gt", "same", "deg"):
        (root / d).mkdir()
    for f in sorted(val_dir.glob("*.jpg"))[:3]:
        shutil.copy(f, root / "gt" / f.name)
        shutil.copy(f, root / "same" / f.name)
        _degrade(f, root / "deg" / (f.stem + ".png"))  # another extension: matched by stem
    return root


def _values(res):
    return {r["metric"]: r["value"] for r in res["rows"]}


FAST = ("psnr", "ssim", "psnr_y", "ssim_y", "ids", "ids_blur", "lmd", "facerec_perceptual", "lpips", "fid")


def test_identical_folders_give_ideal_values(folders, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no LPIPS weights anywhere
    res = evaluate_folders(folders / "same", folders / "gt", metrics=FAST)
    v = _values(res)
    assert res["n_pairs"] == 3
    assert v["psnr"] == 100.0 and v["psnr_y"] == 100.0
    assert v["ssim"] == pytest.approx(1.0, abs=1e-12) and v["ssim_y"] == pytest.approx(1.0, abs=1e-12)
    assert v["ids"] == pytest.approx(1.0, abs=1e-5) and v["ids_blur"] == pytest.approx(1.0, abs=1e-5)
    assert v["lmd"] == 0.0 and v["facerec_perceptual"] == 0.0
    rows = {r["metric"]: r for r in res["rows"]}
    assert rows["lpips"]["value"] is None and "alexnet-owt-7be5be79.pth" in rows["lpips"]["status"]
    assert rows["fid"]["status"].startswith("skipped")
    assert "dlib" in rows["ids"]["protocol"] and "512" in rows["lmd"]["protocol"]
    assert rows["same_person"]["value"] == 1.0 and rows["same_person"]["n"] == 3
    assert rows["psnr"]["ci95"] == (100.0, 100.0)
    assert res["per_face"]["names"] == sorted(res["per_face"]["names"]) and len(res["per_face"]["ids"]) == 3


def test_degraded_folder_is_worse(folders):
    res = evaluate_folders(folders / "deg", folders / "gt", metrics=FAST[:8])
    v = _values(res)
    assert 20 < v["psnr"] < 40 and 0.5 < v["ssim"] < 0.99 and v["psnr_y"] > v["psnr"]
    assert 0.8 < v["ids"] < v["ids_blur"] < 0.999 and v["lmd"] > 0 and v["facerec_perceptual"] > 0
    lo, hi = next(r["ci95"] for r in res["rows"] if r["metric"] == "psnr")
    assert lo <= v["psnr"] <= hi and lo < hi
    # every row is the mean of the metric's own function on the loaded files
    pairs, _, _ = match_files(folders / "deg", folders / "gt")
    pred = stack_images([load_image(p) for p, _ in pairs])
    gt = stack_images([load_image(g) for _, g in pairs])
    for name, fn in (("psnr", psnr), ("ssim", ssim), ("psnr_y", psnr_y), ("ssim_y", ssim_y)):
        assert v[name] == pytest.approx(float(fn(pred, gt).mean()), abs=1e-12), name
    fr = load_facerec()
    a, b = (fr.descriptor_from_chip(fr.chip(to_model_range(x, channels_last=False))) for x in (pred, gt))
    assert v["ids"] == pytest.approx(float(cosine(a, b).mean()), abs=1e-6)
    assert v["same_person"] == pytest.approx(float(((a - b).norm(dim=-1) < 0.6).double().mean()))
    assert v["facerec_perceptual"] == pytest.approx(float(perceptual_distance(fr, to_model_range(
        pred, channels_last=False), to_model_range(gt, channels_last=False)).mean()), abs=1e-6)
    lmds = [lmd_pair(p.permute(1, 2, 0).numpy(), g.permute(1, 2, 0).numpy())[0] for p, g in zip(pred, gt)]
    assert v["lmd"] == pytest.approx(float(np.mean(lmds)), abs=1e-9)
    # the tensor entry point gives the same means
    t = evaluate_tensors(pred, gt, metrics=("psnr", "ssim", "psnr_y", "ssim_y", "ids", "facerec_perceptual"))
    for name, value in t.items():
        assert value == pytest.approx(v[name], abs=1e-9), name


def test_match_files_by_stem(folders, tmp_path):
    pairs, missing, extra = match_files(folders / "deg", folders / "gt")
    assert [p.stem for p, _ in pairs] == [g.stem for _, g in pairs] and len(pairs) == 3
    (tmp_path / "p").mkdir()
    shutil.copy(pairs[0][0], tmp_path / "p" / "zzz.png")
    shutil.copy(pairs[1][0], tmp_path / "p" / pairs[1][0].name)
    pairs, missing, extra = match_files(tmp_path / "p", folders / "gt")
    assert len(pairs) == 1 and len(missing) == 2 and extra == ["zzz"]


def test_evaluate_tensors_identical_and_refusals(real_val_faces):
    x = real_val_faces[:2]
    out = evaluate_tensors(x, x, metrics=("psnr", "ssim", "ids"))
    assert out["psnr"] == 100.0 and out["ssim"] == pytest.approx(1.0) and out["ids"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ClrfaceError, match="FID needs reference"):
        evaluate_tensors(x, x, metrics=("fid",))
    with pytest.raises(ClrfaceError, match="unknown metric"):
        evaluate_tensors(x, x, metrics=("psnrr",))
    with pytest.raises(ClrfaceError, match="no images"):
        evaluate_tensors(x[:0], x[:0], metrics=("psnr",))


def test_cli_writes_json_and_reports_errors(folders, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--pred", str(folders / "same"), "--gt", str(folders / "gt"),
               "--metrics", "psnr,ssim", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "100.0000" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["metric"] for r in rows] == ["psnr", "ssim"]
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--pred", str(tmp_path / "empty"), "--gt", str(folders / "gt")]) == 1
    assert "namesake" in capsys.readouterr().err


class _ColourNet(torch.nn.Module):
    """Fake recognizer: the embedding is the mean colour, so identities (one colour each) separate perfectly."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def embed(self, x):
        return torch.nn.functional.normalize(x.mean((2, 3)) + 1.0001, dim=-1)


def test_lfw_verification_protocol(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"P{i}" for i in range(8)]
    lines = ["10\t2"]
    for i, n in enumerate(names):
        (tmp_path / n).mkdir()
        colour = rng.integers(0, 256, 3)
        for k in (1, 2):
            a = np.clip(colour + rng.integers(-3, 4, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / n / f"{n}_{k:04d}.png")
        lines.append(f"{n}\t1\t2")
        lines.append(f"{n}\t1\t{names[(i + 1) % 8]}\t2")
    lines.append("Nobody\t1\t2")  # a pair whose images are absent
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    assert read_pairs(tmp_path / "pairs.txt")[1] == ("P0", 1, "P1", 2, False)
    v = lfw_verification(tmp_path, tmp_path / "pairs.txt", facerec=_ColourNet())
    assert v["accuracy"] == 1.0 and v["n_pairs"] == 16 and v["n_missing"] == 1 and v["n_images"] == 16


def test_folders_may_mix_sizes_between_pairs(folders, tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for d in (gt, pred):
        d.mkdir()
    for i, f in enumerate(sorted((folders / "gt").iterdir())):
        size = 128 if i % 2 else 96  # 96, 128, 96: three runs of one size each
        Image.open(f).convert("RGB").resize((size, size)).save(gt / f"{i}.png")
        Image.open(f).convert("RGB").resize((size, size)).save(pred / f"{i}.png")
    res = evaluate_folders(pred, gt, metrics=("psnr", "ids"))
    assert res["n_pairs"] == 3 and _values(res)["psnr"] == 100.0 and len(res["per_face"]["ids"]) == 3
    assert res["protocol"]["resolution"] == "96x96 px, 128x128 px"
    fid = evaluate_folders(pred, None, metrics=("fid",), fid_ref=gt)["rows"][0]  # both sides mix sizes
    assert fid["n"] == 3 and fid["value"] == pytest.approx(0.0, abs=1e-3)
    # too few restored faces for FID, a bad number in pairs.txt, a bad --batch-size: one line, exit 1 or 2
    (tmp_path / "one").mkdir()
    shutil.copy(gt / "0.png", tmp_path / "one" / "0.png")
    with pytest.raises(ClrfaceError, match="FID needs at least 2 restored images, found 1"):
        evaluate_folders(tmp_path / "one", None, metrics=("fid",), fid_ref=gt)
    (tmp_path / "pairs.txt").write_text("1\t1\nAnn\tone\t2\n")
    with pytest.raises(ClrfaceError, match="pairs.txt:2: expected image numbers"):
        read_pairs(tmp_path / "pairs.txt")
    with pytest.raises(SystemExit):
        main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--batch-size", "0"])
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--metrics", " , "]) == 1
    assert "no metric named" in capsys.readouterr().err


def test_missing_weights_give_unavailable_rows_not_values(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("CLRFACE_FID_WEIGHTS", str(tmp_path / "missing.pt"))
    res = evaluate_folders(folders / "deg", folders / "gt", metrics=("psnr", "lpips", "fid"),
                           fid_ref=folders / "gt", lpips_dir=tmp_path / "none")
    rows = {r["metric"]: r for r in res["rows"]}
    assert rows["psnr"]["status"] == "ok" and rows["psnr"]["n"] == 3
    for m in ("lpips", "fid"):
        assert rows[m]["value"] is None and rows[m]["n"] == 0 and rows[m]["status"].startswith("unavailable")
    assert str(tmp_path / "missing.pt") in rows["fid"]["status"]
    assert len([line for line in format_table(res).splitlines() if "unavailable" in line]) == 2
