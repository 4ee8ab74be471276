"""Smoke test of benchmarks/restore_speed.py on a tiny random model (1 repetition); no figures are checked."""

import math

import numpy as np
import pytest
import torch

from clrface.data.io import data_root
from clrface.device import native_bf16
from clrface.options import FidelityMap, RestoreOptions
from clrface.restorer import Restorer

# 248 x 189, four small faces: the fastest real photo to detect
PHOTO = data_root() / "real_lq" / "whole" / "codeformer_01.jpg"


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("restore_speed")


def test_model_stages_on_tiny_model(bench, model_dir):
    torch.set_num_threads(1)
    r = Restorer.from_pretrained(model_dir)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    o = RestoreOptions(steps=2)
    t = bench.model_stage_times(r, x, 1, o, steps=(1,))
    assert set(t) == {"irn", "encode", "embed", "denoise", "denoise_guided", "id_grad", "refine", "refine_1",
                      "decode", "restore_faces", "restore_default"}
    assert "aligned_api" in bench.model_stage_times(r, x[:1], 1, o)  # the user's one-crop call, 1 face only
    assert all(math.isfinite(v) and v > 0 for v in t.values())
    # fidelity 0.5 with the default map: sigma_start = sqrt(4 * 0.05), guidance 0.5, heun 2 steps = 3 NFE
    sigma, scale, calls = bench.default_refine(r, o)
    assert sigma == pytest.approx(0.2**0.5) and scale == pytest.approx(0.5 * FidelityMap().guidance_at_1) and calls == 3
    rows = bench.stage_labels(r, o, (1,), "p.jpg 10x10, 1 faces")
    one = {k: 2.0 for k, _ in rows}
    many = {k: 8.0 for k, _ in rows} | {"detect": float("nan")}
    table = bench.stage_table(rows, one, many, 4)
    lines = table.splitlines()
    assert lines[0] == "| stage | 1 face (ms) | 4 faces (ms per face) |" and len(lines) == 2 + len(rows)
    assert lines[2].endswith("| 2.0 | — |") and lines[3].endswith("| 2.0 | 2.0 |")  # 8 ms / 4 faces
    assert "heun 2 steps (3 NFE, sigma_start 0.447, guidance 5)" in table
    assert "restore_faces total, full mode (fidelity 0.5, 3 NFE)" in table
    assert "heun 1 steps (1 NFE" in table


@pytest.mark.skipif(not PHOTO.is_file(), reason=f"shared data {PHOTO} not found (set CLRFACE_DATA)")
def test_main_writes_markdown(bench, model_dir, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    # a second precision where it is native; an AVX2-only CPU emulates bf16 (~80x slower), so there the same twice
    second = "bfloat16" if native_bf16(torch.device("cpu")) else "float32"
    report = bench.main(["--model", str(model_dir), "--photo", str(PHOTO), "--threads", "1", "--reps", "1",
                         "--batch", "2", "--steps", "1", "--full-steps", "2", "--dtype", "float32", second,
                         "--md", str(md)])
    text = md.read_text()
    assert text.startswith("# Results\n") and text.endswith(report)
    assert "command: `python " in report and "restore_speed.py --model" in report and "--reps 1" in report
    assert f"torch {torch.__version__}" in report
    assert report.count("| stage | 1 face (ms) | 2 faces (ms per face) |") == 2  # one table per dtype
    assert "codeformer_01.jpg 248x189, 4 faces (per photo) |" in report
    assert "heun 2 steps (3 NFE, sigma_start 0.447, guidance 5)" in report
    for line in report.splitlines():
        if line.startswith("| ") and "stage" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")[1:]]
            assert all(c == "—" or float(c) > 0 for c in cells), line


def test_aligned_crop_skips_photo_stages(bench, model_dir, tmp_path):
    # --aligned: the model stages of one crop only; no dlib detection, the photo rows are left empty
    crop = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    report = bench.run_benchmark(model_dir, crop, reps=1, batch=2, options=RestoreOptions(steps=1),
                                 photo_name="crop.png", aligned=True)
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert "crop.png (aligned crop, no photo stages)" in report
    assert rows["align: FFHQ warp to 32 px"].endswith("| — | — |")
    assert float(rows["IRN"].split("|")[2]) > 0 and float(rows["IRN"].split("|")[3]) > 0
