"""Smoke and plumbing tests of benchmarks/real_world.py and benchmarks/lfw_downstream.py on a tiny random model."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clrface.bench import consecutive_runs, embed_faces, parse_row, resize_square, row_options, slug, to_tensor
from clrface.data.io import data_root, load_image, to_model_range, to_uint8
from clrface.errors import ClrfaceError
from clrface.metrics.fid import feature_stats, inception_features
from clrface.metrics.noref import noref_scores
from clrface.metrics.verification import verification_accuracy
from clrface.restorer import Restorer

DATA = data_root()
CROPPED = ["codeformer_0143.png", "gfpgan_Adele_crop.png", "vqfr_00000052_lq.png"]
WHOLE = "codeformer_04.jpg"  # 225 x 225, one face
LFW = ["Abel_Pacheco/Abel_Pacheco_0001", "Abel_Pacheco/Abel_Pacheco_0004",
       "Abdel_Madi_Shabneh/Abdel_Madi_Shabneh_0001", "Dean_Barker/Dean_Barker_0001"]


@pytest.fixture(scope="module")
def scripts(benchmark_script):
    return benchmark_script("real_world"), benchmark_script("lfw_downstream")


class StubInception(nn.Module):
    """A stand-in for the FID Inception (fast): [B,3,299,299] -> 4x4 average pool -> fixed projection [B,16]."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 16)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


# ------------------------------------------------------------------------------------------ helpers


def test_parse_row_and_runs():
    assert parse_row("f0.8=full:fidelity=0.8,steps=10") == ("f0.8", {"mode": "full", "fidelity": 0.8, "steps": 10})
    assert parse_row("a=b=irn") == ("a=b", {"mode": "irn"})  # the name may hold '='
    opts, mask = row_options(parse_row("x=full:mask=off,sigma_start=none,sampler=euler")[1], batch_size=3)
    assert (opts.mode, opts.sigma_start, opts.sampler, opts.batch_size, mask) == ("full", None, "euler", 3, False)
    for bad, msg in (("nomode", "expected NAME=MODE"), ("x=fancy", "expected NAME=MODE"),
                     ("x=full:steps", "not key=val"), ("x=full:colour=1", "unknown RestoreOptions field"),
                     ("x=full:fidelity=2", "fidelity must be")):
        with pytest.raises(ClrfaceError, match=msg):
            parse_row(bad)
    assert consecutive_runs([0, 1, 2, 5, 6, 9], 2) == [(0, 2), (2, 1), (3, 2), (5, 1)]
    assert slug("full model / f=0.8") == "full_model_f=0.8"


def test_select_pairs_keeps_folds(scripts, tmp_path):
    _, ld = scripts
    lines = ["2 3"]
    for f in range(2):
        lines += [f"S{f}{i} 1 2" for i in range(3)] + [f"A{f}{i} 1 B{f}{i} 1" for i in range(3)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    sel, folds, allp = ld.select_pairs(tmp_path / "pairs.txt", limit=4)
    assert folds == 2 and len(allp) == 12
    assert sel == [("S00_0001", "S00_0002", True), ("A00_0001", "B00_0001", False),
                   ("S10_0001", "S10_0002", True), ("A10_0001", "B10_0001", False)]
    real = DATA / "lfw128" / "pairs.txt"
    if real.is_file():
        sel, folds, allp = ld.select_pairs(real, limit=600)
        assert folds == 10 and len(allp) == 6000 and len(sel) == 600
        same = np.array([p[2] for p in sel]).reshape(10, 60)
        assert (same[:, :30].all() and not same[:, 30:].any())  # each fold: 30 matched then 30 mismatched
    assert ld.identification_split(["B_0002", "A_0003", "A_0001", "C_0001", "A_0002"]) == (
        ["A_0001"], ["A_0002", "A_0003"])


def test_degradation_presets(scripts):
    _, ld = scripts
    assert ld.degradation_config("x8", 128).scale == (8.0, 8.0)
    assert ld.degradation_config("x16", 128).scale == (16.0, 16.0)
    assert ld.degradation_config("x16", 128).jpeg is None
    assert ld.degradation_config("bfr", 128).scale == (1.0, 8.0)
    # a file's degradation depends on its name and the seed only
    a = ld.file_seed(0, "A_0001").standard_normal(3)
    assert np.array_equal(a, ld.file_seed(0, "A_0001").standard_normal(3))
    assert not np.array_equal(a, ld.file_seed(1, "A_0001").standard_normal(3))


# ------------------------------------------------------------------------------------------ real_world


def test_real_world_smoke(scripts, restorer, tmp_path):
    rw, _ = scripts
    src = DATA / "real_lq"
    if not src.is_dir():
        pytest.skip(f"shared data {src} not found (set CLRFACE_DATA)")
    (tmp_path / "crop").mkdir()
    (tmp_path / "whole").mkdir()
    for f in CROPPED:
        shutil.copy(src / "cropped" / f, tmp_path / "crop" / f)
    shutil.copy(src / "whole" / WHOLE, tmp_path / "whole" / WHOLE)
    s = restorer.resolution
    # FID reference = the inputs themselves, so the input row's FID over all faces is exactly 0
    names, crops = rw.load_cropped(tmp_path / "crop", s)
    wn, wc, _ = rw.align_whole(tmp_path / "whole", s)
    assert len(names) == 3 and len(wn) == 1 and wc.shape == (1, s, s, 3)
    inc = StubInception()
    mu, sigma = feature_stats(inception_features(inc, to_tensor(np.concatenate([crops, wc]))))
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma, n=4)

    rows = {**rw.DEFAULT_ROWS, "two steps": parse_row("two steps=full:steps=2,mask=off")[1]}
    res = rw.run(None, tmp_path / "out", cropped=tmp_path / "crop", whole=tmp_path / "whole", rows=rows,
                 fid_ref=tmp_path / "ref.npz", restorer=restorer, inception=inc, log=lambda _: None)
    by = {r["row"]: r for r in res["rows"]}
    assert list(by) == ["bicubic input", "VQVAE-direct", "IRN", "full model", "two steps"]
    assert all(r["status"] == "ok" for r in by.values())
    inp = by["bicubic input"]["subsets"]
    assert inp["all"]["n"] == 4 and inp["cropped"]["n"] == 3 and inp["whole"]["n"] == 1
    # ~0 up to sqrt(round-off) of the rank-3 covariance's null eigenvalues
    assert inp["all"]["fid"] == pytest.approx(0.0, abs=1e-4)
    assert inp["whole"]["fid"] is None  # one face: no covariance
    assert inp["all"]["id_vs_input"] == pytest.approx(1.0, abs=1e-6)
    assert by["full model"]["subsets"]["all"]["fid"] > 1e-3
    assert by["full model"]["s_per_face"] > 0 and by["bicubic input"]["s_per_face"] == 0
    # the saved faces are the scored ones: no-reference figures recomputed from the PNGs agree
    out = tmp_path / "out"
    irn_png = np.stack([load_image(out / "cropped" / "IRN" / f"{Path(f).stem}.png") for f in CROPPED])
    nr = noref_scores(to_tensor(irn_png))
    assert by["IRN"]["subsets"]["cropped"]["laplacian_var"] == pytest.approx(float(nr["laplacian_var"].mean()))
    assert by["IRN"]["subsets"]["cropped"]["noise_sigma"] == pytest.approx(float(nr["noise_sigma"].mean()))
    # ... and the IRN row is the IRN applied to the resized input
    with torch.no_grad():
        expect = to_uint8(restorer.irn(to_model_range(torch.from_numpy(crops))).clamp(-1, 1)).numpy()
    assert np.abs(irn_png.astype(int) - expect).max() <= 1
    js = json.loads((out / "real_world.json").read_text())
    assert js["meta"]["n"] == {"cropped": 3, "whole": 1} and "biased" in js["protocol"]["fid"]
    md = rw.format_markdown(res)
    assert "| two steps |" in md and "**whole** (1 faces" in md


def test_real_world_cli_without_irn_and_fid(scripts, restorer, tmp_path, monkeypatch, capsys):
    rw, _ = scripts
    if not (DATA / "real_lq").is_dir():
        pytest.skip(f"shared data {DATA / 'real_lq'} not found (set CLRFACE_DATA)")
    (tmp_path / "crop").mkdir()
    for f in CROPPED[:2]:
        shutil.copy(DATA / "real_lq" / "cropped" / f, tmp_path / "crop" / f)
    no_irn = Restorer(restorer.vqgan, restorer.prior, None, restorer.mask, restorer.facerec, source="tiny-no-irn")
    monkeypatch.setattr(rw.Restorer, "from_pretrained", classmethod(lambda cls, *a, **k: no_irn))
    rc = rw.main(["--model", "x", "--out", str(tmp_path / "o"), "--cropped", str(tmp_path / "crop"), "--whole", "",
                  "--fid-ref", "", "--only", "bicubic input", "IRN", "--threads", "1"])
    assert rc == 0
    md = capsys.readouterr().out
    assert "| IRN | skipped: mode 'irn' needs an irn/ checkpoint" in md and "| bicubic input | – |" in md
    assert rw.main(["--model", "x", "--only", "nope", "--whole", "", "--fid-ref", "", "--threads", "1"]) == 1


# ------------------------------------------------------------------------------------------ lfw_downstream


def test_lfw_downstream_smoke_and_cache(scripts, restorer, tmp_path, monkeypatch):
    rw, ld = scripts
    if not (DATA / "lfw128").is_dir():
        pytest.skip(f"shared data {DATA / 'lfw128'} not found (set CLRFACE_DATA)")
    lfw = tmp_path / "lfw"
    for f in LFW:
        (lfw / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / "lfw128" / f"{f}.jpg", lfw / f"{f}.jpg")
    # two folds of one pair each: fold 1 matched, fold 2 mismatched
    (lfw / "pairs.txt").write_text("2 1\nAbel_Pacheco\t1\t4\nAbdel_Madi_Shabneh\t1\tDean_Barker\t1\n")
    res = ld.run(None, tmp_path / "out", preset="x8", lfw=lfw, restorer=restorer, log=lambda _: None)
    by = {r["row"]: r for r in res["rows"]}
    assert list(by) == ["clean", "degraded", "IRN", "full model"] and res["n_images"] == 4
    assert all(r["status"] == "ok" for r in by.values())

    # the clean row equals a direct computation: embed the files, cosine per pair, 2-fold accuracy
    s = restorer.resolution
    clean = np.stack([resize_square(load_image(lfw / f"{f}.jpg"), s) for f in LFW])
    e = embed_faces(restorer, clean)
    sims = torch.stack([(e[0] * e[1]).sum(), (e[2] * e[3]).sum()])
    acc, std = verification_accuracy(sims, np.array([True, False]), 2)
    v = by["clean"]["verification"]
    assert (v["accuracy"], v["std"]) == pytest.approx((acc, std))
    assert v["cos_same"] == pytest.approx(float(sims[0])) and v["cos_diff"] == pytest.approx(float(sims[1]))
    assert by["clean"]["ids_vs_clean"] == pytest.approx(1.0, abs=1e-6)
    # one identity with two images: gallery {Abel_Pacheco_0001}, probe Abel_Pacheco_0004 -> rank-1 = 1
    assert by["clean"]["identification"] == {"rank1": 1.0, "rank3": 1.0, "rank5": 1.0}
    assert by["degraded"]["ids_vs_clean"] < 0.999

    # the degraded faces are the per-file seeded degradation of the resized clean faces
    cfg = ld.degradation_config("x8", s)
    deg = load_image(tmp_path / "out" / "x8" / "examples" / "degraded" / "Dean_Barker_0001.png")
    assert np.array_equal(deg, ld.degrade(clean[3], cfg, ld.file_seed(0, "Dean_Barker_0001"))[0])
    assert by["full model"]["s_per_face"] > 0

    # second run: everything comes from the embedding caches, nothing is restored
    monkeypatch.setattr(ld, "restore_row", lambda *a, **k: pytest.fail("restored although cached"))
    again = ld.run(None, tmp_path / "out", preset="x8", lfw=lfw, restorer=restorer, log=lambda _: None)
    assert again["rows"] == res["rows"]
    js = json.loads((tmp_path / "out" / "x8" / "lfw_x8.json").read_text())
    assert js["meta"]["degradation"]["scale"] == [8.0, 8.0]
    assert "| full model |" in ld.format_markdown(res)


def test_sharpness_rows(restorer, benchmark_script):
    sharpness = benchmark_script("sharpness")
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    lq = torch.nn.functional.avg_pool2d(gt, 3, 1, 1)  # a blurred copy: less Laplacian variance than the GT
    rows = sharpness.sharpness_rows(restorer, lq, gt)
    assert list(rows) == ["GT", "LQ input", "VQGAN G(Q(E(GT)))", "IRN(LQ)", "VQGAN of IRN(LQ)"]
    assert rows["LQ input"][0] < rows["GT"][0] / 3 and rows["GT"][1] > 60 and rows["LQ input"][1] < 30
