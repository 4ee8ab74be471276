"""benchmarks/irn_scan.py: an untrained IRN (zero tail) returns its input, so its scan is the input's figures."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from clrface.bench import slug
from clrface.checkpoint import save_checkpoint
from clrface.data.datasets import load_face_folder
from clrface.data.degradation import degrade_batch, get_preset
from clrface.data.io import to_model_range, to_uint8
from clrface.identity.facerec import identity_loss, load_facerec
from clrface.identity.irn import IRN, IRNConfig
from clrface.metrics.ids import low_pass
from clrface.metrics.noref import laplacian_variance
from clrface.metrics.psnr_ssim import psnr
from clrface.train.irn import descriptor


def test_untrained_irn_scans_as_its_input(benchmark_script, shared_data, tmp_path, monkeypatch, capsys):
    scan = benchmark_script("irn_scan")
    gt = to_model_range(load_face_folder(shared_data("faces128", "val"), limit=4))
    lq, _ = degrade_batch(gt, get_preset("bfr", 128), generator=0)
    fr = load_facerec().eval()
    with torch.no_grad():
        e_gt, e_lq = descriptor(fr, gt), descriptor(fr, lq)
        e_gt_blur, e_lq_blur = descriptor(fr, low_pass(gt, 1.0)), descriptor(fr, low_pass(lq.clamp(-1, 1), 1.0))
    m = scan.scan_irn(IRN(IRNConfig(channels=(8, 16, 16), blocks=(1, 1, 1))).eval(), fr, lq, gt, e_gt, e_gt_blur)
    # a zero residual is exact (bf16 autocast or not): the output is the input to the last bit
    assert torch.allclose(m["psnr"], psnr(lq.clamp(-1, 1), gt))
    assert torch.allclose(m["lapvar"], laplacian_variance(lq.clamp(-1, 1)).float()) and (m["lapvar"] > 0).all()
    assert torch.allclose(m["ids"], 1 - identity_loss(e_lq, e_gt), atol=1e-5)
    assert torch.allclose(m["ids_blur"], 1 - identity_loss(e_lq_blur, e_gt_blur), atol=1e-5)
    assert m["ids"].mean().item() < 0.99 and (m["facerec_perceptual"] > 0).all()

    # the command line: a table row per IRN folder
    for sub in ("lq", "gt"):
        (tmp_path / "ts" / sub).mkdir(parents=True)
    for i, (a, b) in enumerate(zip(lq, gt)):
        for sub, x in (("lq", a), ("gt", b)):
            arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(tmp_path / "ts" / sub / f"{i}.png")
    cfg = IRNConfig(channels=(8, 16, 16), blocks=(1, 1, 1))
    save_checkpoint(tmp_path / "irn", IRN(cfg), cfg, "irn")
    monkeypatch.setattr(sys, "argv", ["irn_scan", "--testset", str(tmp_path / "ts"), "--flip", "--twice",
                                      "--upper-octave-from", str(tmp_path / "irn"), "--save", str(tmp_path / "out"),
                                      str(tmp_path / "irn")])
    scan.main()
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if str(tmp_path / "irn") in line]
    assert len(rows) == 4 and rows[1][1].strip().endswith("flip-averaged") and rows[2][1].strip().endswith("twice")
    # its own finest octave under its own coarser bands: the same faces, so the same figures
    assert "finest octave of" in rows[3][1] and rows[3][2] == rows[0][2] and rows[3][5] == rows[0][5]
    saved = sorted((tmp_path / "out").iterdir())
    assert len(saved) == 4 and all(sorted(f.name for f in d.iterdir()) == [f"{i}.png" for i in range(4)]
                                   for d in saved)
    first = np.asarray(Image.open(tmp_path / "out" / slug(str(tmp_path / "irn")) / "0.png"))
    np.testing.assert_array_equal(first, to_uint8(lq[:1].clamp(-1, 1))[0].numpy())  # the zero-residual IRN: its input
    assert float(rows[0][2]) == pytest.approx(m["ids"].mean().item(), abs=2e-3)
    # the input mirrored, returned and mirrored back is the input: the flip-averaged row differs by nothing
    assert float(rows[0][3]) == pytest.approx(m["ids_blur"].mean().item(), abs=2e-3)
    assert float(rows[0][6]) == pytest.approx(m["lapvar"].mean().item(), rel=0.01)
    assert rows[0][7].strip() == "+0.0000 [+0.0000, +0.0000]" and rows[0][10].strip() == "+0.0 [+0.0, +0.0]"
    assert rows[1][7].strip().startswith(("+0.0000", "-0.0000"))
    assert rows[2][7].strip().startswith(("+0.0000", "-0.0000"))  # the identity map applied twice: itself again
