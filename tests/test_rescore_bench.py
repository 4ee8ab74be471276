"""benchmarks/rescore.py: metrics added to an ablation.json from the faces its rows wrote."""

import json

import numpy as np
import pytest

from clrface.bench import ablation_row_dir
from clrface.data.io import save_image, to_model_range
from clrface.metrics.psnr_ssim import psnr


def test_rescore_adds_per_face_values_that_paired_reads(benchmark_script, tmp_path):
    rescore, paired = benchmark_script("rescore"), benchmark_script("paired")
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    noisy = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
    names = ["a", "b", "c"]
    for n, g, x in zip(names, gt, noisy):
        save_image(tmp_path / "set" / "gt" / f"{n}.png", g)
        save_image(ablation_row_dir(tmp_path / "out", "IRN^ID") / f"{n}.png", x)
    assert ablation_row_dir(tmp_path / "out", "IRN^ID").name == "IRNID"  # the folders ablation.py wrote
    row = {"row": "IRN^ID", "ids": 0.9, "per_face": {"names": names, "ids": [0.9, 0.8, 1.0]}}
    result = tmp_path / "out" / "ablation.json"
    result.write_text(json.dumps({"meta": {"testset": str(tmp_path / "set"), "metrics": ["ids"]}, "rows": [row]}))

    (_, means), = rescore.rescore(result, ["psnr"])
    expect = psnr(to_model_range(noisy), to_model_range(gt)).numpy()
    assert means["psnr"] == pytest.approx(expect.mean(), rel=1e-6)
    names_read, values, _ = paired.load_row(result, "IRN^ID")
    assert names_read == names and values["ids"] == [0.9, 0.8, 1.0]  # what was there stays
    assert values["psnr"] == pytest.approx(expect.tolist(), rel=1e-6)
    assert json.loads(result.read_text())["meta"]["metrics"] == ["ids", "psnr"]
