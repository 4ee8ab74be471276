import pytest
import torch

from clrface.identity.guidance import LatentMask, MaskConfig
from clrface.train.mask import MaskStage, MaskTrainConfig


def test_mask_gradient_only_through_mask_and_sparsity_counts(tiny_models):
    cfg = MaskTrainConfig(vqgan=str(tiny_models["vqgan"]), prior=str(tiny_models["prior"]), irn=str(tiny_models["irn"]),
                          train_dir=str(tiny_models["faces"]), val_dir=str(tiny_models["faces"]), val_count=4,
                          sparsity_weight=1.0, guidance_scale=5.0)
    stage = MaskStage(MaskConfig(), cfg, seed=0, batch_size=2)
    mask = stage.modules["mask"]
    b = stage.batch(0, 0, 1)
    loss, logs = stage.losses(mask, b)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mask.parameters())
    assert 0 < logs["mask_mean"] < 1
    # the loss is the weighted sum of its logged terms, the sparsity term the mean of the mask guided_step applies
    c = stage.cfg
    want = c.perceptual_weight * logs["perc"] + c.identity_weight * logs["id"] + c.sparsity_weight * logs["mask_mean"]
    assert loss.item() == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        assert logs["mask_mean"] == pytest.approx(float(stage.guided_step(mask, b)[1].float().mean()), rel=1e-5)
    # a mask of zeros leaves the denoised latent untouched: guidance acts only through M_l
    zero = LatentMask(MaskConfig())
    for p in zero.parameters():
        torch.nn.init.zeros_(p)
    zero.net[-1].bias.data.fill_(-50.0)
    x0, m = stage.guided_step(zero, b)
    x = b["zid"] + b["sigma"].view(-1, 1, 1, 1) * b["noise"]
    torch.testing.assert_close(x0, stage.prior.precond(x, b["sigma"], b["zd"]), atol=1e-6, rtol=0)
