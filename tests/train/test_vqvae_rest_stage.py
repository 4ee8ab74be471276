import pytest
import torch

from clrface.metrics.psnr_ssim import psnr
from clrface.train.vqvae_rest import RestStage, RestTrainConfig


def test_loss_falls_from_the_irn_start(tiny_models, tmp_path):
    torch.manual_seed(0)
    cfg = RestTrainConfig(vqgan=str(tiny_models["vqgan"]), irn=str(tiny_models["irn"]),
                          train_dir=str(tiny_models["faces"]), val_dir=str(tiny_models["faces"]), val_count=4)
    stage = RestStage(cfg, seed=0, batch_size=4)
    # before training the rest-encoder is E(x_id), so its PSNR is the VQGAN round trip of the IRN output's
    start = stage.validate(stage.modules["rest_encoder"].eval(), 0, tmp_path)
    with torch.no_grad():
        vq, gt = stage.vq, stage.val_gt
        round_trip = vq.decode(vq.encode(stage.val_id)).float().clamp(-1, 1)
        direct = vq.decode(vq.encode(stage.val_lq)).float().clamp(-1, 1)
    assert start["psnr"] == pytest.approx(psnr(round_trip, gt).mean().item(), abs=1e-3)
    assert start["psnr_irn"] == pytest.approx(psnr(stage.val_id, gt).mean().item(), abs=1e-9)
    assert start["psnr_direct"] == pytest.approx(psnr(direct, gt).mean().item(), abs=1e-9)
    b = stage.batch(0, 0, 1)
    assert b["lq"].shape == (4, 3, 32, 32) and b["z"].shape == (4, 3, 8, 8)
    again = stage.batch(0, 0, 1)  # batches are a pure function of the step (exact resume)
    torch.testing.assert_close(again["lq"], b["lq"])
    (obj,) = stage.objectives(stage.modules)
    opt = torch.optim.Adam(obj.params, lr=1e-3)
    first = obj.loss_fn(b, 0, {})[0].item()
    for _ in range(40):
        opt.zero_grad()
        loss, logs = obj.loss_fn(b, 0, {})
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first and set(logs) == {"latent_mse"}
    vals = stage.validate(stage.modules["rest_encoder"].eval(), 0, tmp_path)
    assert set(vals) == {"psnr", "psnr_irn", "psnr_direct"}
    assert vals["psnr_irn"] == start["psnr_irn"] and vals["psnr_direct"] == start["psnr_direct"]
    assert (tmp_path / "val" / "0000000.png").is_file()
