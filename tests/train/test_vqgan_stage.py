"""The VQGAN training stage: batches, and the G and D objectives as the weighted sums of their terms."""

import pytest
import torch

from clrface.checkpoint import read_config
from clrface.data.io import to_model_range
from clrface.train.vqgan import VQGANStage, VQGANTrainConfig
from clrface.vqgan.losses import gradient_l1, hinge_d_loss
from clrface.vqgan.model import VQGANConfig


@pytest.fixture
def stage(tiny_models):
    torch.manual_seed(0)
    model_cfg, _ = read_config(tiny_models["vqgan"], "vqgan", VQGANConfig)
    faces = str(tiny_models["faces"])
    cfg = VQGANTrainConfig(train_dir=faces, val_dir=faces, val_count=4, l1_weight=2.0, grad_l1_weight=0.5,
                           adv_weight=0.1, disc_channels=8, disc_layers=1)
    return VQGANStage(model_cfg, cfg, seed=0, batch_size=4)


def test_batches_are_deterministic_flipped_faces_in_model_range(stage):
    a, b = stage.batch(3, 0, 1)["gt"], stage.batch(3, 0, 1)["gt"]
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1
    # every face is a training face, some of them mirrored
    faces = to_model_range(stage.train_faces)
    mirrored = sum(any(torch.equal(x.flip(-1), f) and not torch.equal(x, f) for f in faces) for x in a)
    assert all(any(torch.equal(x, f) or torch.equal(x.flip(-1), f) for f in faces) for x in a) and mirrored >= 1


def test_generator_and_discriminator_losses_add_up(stage):
    g_obj, d_obj = stage.objectives(stage.modules)
    assert (g_obj.name, d_obj.name) == ("G", "D")
    batch, cache = stage.batch(0, 0, 1), {}
    loss, logs = g_obj.loss_fn(batch, 0, cache)
    rec, gt = cache["rec"].detach(), batch["gt"]
    assert logs["l1"] == pytest.approx(float((rec - gt).abs().mean()), rel=1e-6)
    assert logs["grad_l1"] == pytest.approx(float(gradient_l1(rec, gt)), rel=1e-6)
    expect = 2.0 * logs["l1"] + logs["commit"] + 0.5 * logs["grad_l1"] + 0.1 * logs["adv_w"] * logs["adv"]
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    disc = stage.modules["disc"]
    d_loss, d_logs = d_obj.loss_fn(batch, 0, cache)
    with torch.no_grad():
        ref = hinge_d_loss(disc(gt), disc(rec.detach()))
    assert d_loss.item() == pytest.approx(float(ref), rel=1e-6) == pytest.approx(d_logs["d_loss"], rel=1e-6)
