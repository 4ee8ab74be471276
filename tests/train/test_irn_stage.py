import shutil
from pathlib import Path

import pytest
import torch
import yaml

from clrface.checkpoint import load_weights, save_checkpoint
from clrface.data.datasets import load_face_folder
from clrface.data.io import data_root, to_model_range
from clrface.errors import ClrfaceError
from clrface.faces.detail import band_split
from clrface.identity.facerec import load_facerec
from clrface.identity.irn import IRN, IRNConfig, load_irn
from clrface.metrics.ids import IDS_BLUR_SIGMA, low_pass
from clrface.metrics.psnr_ssim import psnr
from clrface.train.irn import IRNStage, IRNTrainConfig, anchor_l1, descriptor, irn_loss
from clrface.train.run import run_stage
from clrface.vqgan.losses import detail_energy_l1, hinge_d_loss

DATA = data_root() / "faces128" / "val"
TINY = IRNConfig(body="conv", channels=(8, 16), blocks=(1, 1))


@pytest.fixture(scope="module")
def facerec():
    try:
        return load_facerec()
    except ClrfaceError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def faces_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Six real faces for training and four for validation (copies of shared val faces)."""
    if not DATA.is_dir():
        pytest.skip("shared face data absent")
    files = sorted(DATA.glob("*.jpg"))[:10]
    root = tmp_path_factory.mktemp("faces")
    for name, part in (("train", files[:6]), ("val", files[6:])):
        (root / name).mkdir()
        for f in part:
            shutil.copy(f, root / name / f.name)
    return root / "train", root / "val"


def _stage(faces_dirs, facerec, **kw):
    cfg = IRNTrainConfig(train_dir=str(faces_dirs[0]), val_dir=str(faces_dirs[1]), val_count=4, **kw)
    return IRNStage(TINY, cfg, seed=0, batch_size=2, facerec=facerec)


def test_irn_loss_is_eq11_and_facerec_stays_frozen(facerec, faces_dirs):
    gt = to_model_range(load_face_folder(faces_dirs[1]))[:2]
    x_id = (gt.flip(0) * 0.9).requires_grad_()  # the other face, dimmed: a real identity gap
    loss, logs = irn_loss(x_id, gt, facerec, alpha=2.5)
    e1 = torch.nn.functional.normalize(descriptor(facerec, x_id.detach()), dim=-1)
    e2 = torch.nn.functional.normalize(descriptor(facerec, gt), dim=-1)
    expect = 2.5 * (x_id.detach() - gt).abs().mean() + (1 - (e1 * e2).sum(-1)).mean()
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-5, atol=1e-6)
    assert logs["id"] > 0.05  # two different people: dlib cosine well below 1
    loss.backward()
    assert all(p.grad is None for p in facerec.parameters())
    assert x_id.grad is not None and x_id.grad.abs().sum() > 0


def test_irn_loss_without_identity_is_l1_only(facerec, faces_dirs):
    gt = to_model_range(load_face_folder(faces_dirs[1]))[:2]
    x_id = gt.flip(0) * 0.9
    loss, logs = irn_loss(x_id, gt, facerec, alpha=2.5, identity_weight=0.0)
    torch.testing.assert_close(loss, 2.5 * (x_id - gt).abs().mean())
    assert set(logs) == {"l1"}
    half, _ = irn_loss(x_id, gt, facerec, alpha=2.5, identity_weight=0.5)
    full, logs = irn_loss(x_id, gt, facerec, alpha=2.5)
    torch.testing.assert_close(full - half, 0.5 * torch.tensor(logs["id"]), rtol=1e-4, atol=1e-6)


def test_identity_gradient_flows_to_the_irn(facerec, faces_dirs):
    st = _stage(faces_dirs, facerec)
    b = st.batch(0, 0, 1)
    net = st.modules["irn"]
    loss, _ = irn_loss(net(b["lq"]), b["gt"], facerec, alpha=0.0)  # identity term only
    loss.backward()
    assert net.tail.weight.grad.abs().sum() > 0  # through the frozen recogniser into the IRN


def test_batches_are_a_pure_function_of_the_step(facerec, faces_dirs):
    st = _stage(faces_dirs, facerec)
    a, b, c = st.batch(5, 0, 1), st.batch(5, 0, 1), st.batch(6, 0, 1)
    assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
    assert not torch.equal(a["lq"], c["lq"])
    assert a["lq"].shape == (2, 3, 128, 128) and a["lq"].abs().max() <= 1
    assert (a["lq"] - a["gt"]).abs().mean() > 0.005  # actually degraded
    # the validation pair is fixed at construction: a second stage sees the very same LQ faces
    torch.testing.assert_close(_stage(faces_dirs, facerec).val_lq, st.val_lq, rtol=0, atol=0)


def test_chunked_degradation_serves_the_same_faces_per_step(facerec, faces_dirs):
    one, four = _stage(faces_dirs, facerec), _stage(faces_dirs, facerec, degrade_steps=4)
    faces = to_model_range(one.train_faces)
    for step in (5, 4, 7, 9):  # out of order: steps 4-7 share a chunk, 9 starts the next
        a, b = one.batch(step, 0, 1), four.batch(step, 0, 1)
        assert b["gt"].shape == b["lq"].shape == (2, 3, 128, 128)
        # the step's faces (up to the flip, drawn per chunk), degraded differently
        for x, y in zip(a["gt"], b["gt"]):
            assert torch.equal(x, y) or torch.equal(x, y.flip(-1))
            assert any(torch.equal(y, f) or torch.equal(y, f.flip(-1)) for f in faces)
        assert (b["lq"] - b["gt"]).abs().mean() > 0.005
    # a chunk is a pure function of its index: a fresh stage asked for step 6 first agrees
    again = _stage(faces_dirs, facerec, degrade_steps=4)
    assert torch.equal(again.batch(6, 0, 1)["lq"], four.batch(6, 0, 1)["lq"])


def test_validate_reports_input_and_output_numbers(facerec, faces_dirs, tmp_path):
    st = _stage(faces_dirs, facerec)
    vals = st.validate(IRN(TINY).eval(), 0, tmp_path)  # untrained IRN = identity: output numbers == input's
    assert vals["psnr"] == pytest.approx(vals["psnr_in"], abs=1e-4)
    assert vals["id_cos"] == pytest.approx(vals["id_cos_in"], abs=1e-5)
    assert vals["id_cos_blur"] == pytest.approx(vals["id_cos_blur_in"], abs=1e-5)
    assert vals["id_cos_in"] < vals["id_cos_blur_in"] < 1.0  # blurred alike, the faces differ less
    assert vals["psnr_in"] == pytest.approx(psnr(st.val_lq, st.val_gt).mean().item())
    assert 0.5 < vals["id_cos_in"] < 1.0
    assert (tmp_path / "val" / "0000000.png").is_file()


def _tiny_run_config(tmp_path, faces_dirs, val_every: int, **stage) -> Path:
    """A two-step YAML config of the TINY IRN on the test faces; ``stage`` adds stage keys."""
    cfg = {
        "model": {"body": "conv", "channels": [8, 16], "blocks": [1, 1]},
        "stage": {"train_dir": str(faces_dirs[0]), "val_dir": str(faces_dirs[1]), "val_count": 4, "warmup": 0,
                  **stage},
        "train": {"steps": 2, "batch_size": 2, "mixed_precision": "no", "val_every": val_every, "ckpt_every": 1,
                  "log_every": 1, "threads": 1},
    }
    path = tmp_path / "irn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_steps_through_the_engine_and_exact_resume(facerec, faces_dirs, tmp_path):
    path = _tiny_run_config(tmp_path, faces_dirs, val_every=2)
    assert run_stage("irn", path, out=str(tmp_path / "a")) == 2
    log = (tmp_path / "a" / "log.csv").read_text()
    assert "val/id_cos" in log and "val/psnr_in" in log and ",id," in log
    net = load_irn(tmp_path / "a" / "model")
    assert net.cfg == TINY and net.tail.weight.abs().sum() > 0  # trained away from the zero init

    # 1 step, then resume to 2: the same weights as the uninterrupted run
    assert run_stage("irn", path, ["train.steps=1"], out=str(tmp_path / "b")) == 1
    assert run_stage("irn", path, out=str(tmp_path / "b"), resume=True) == 2
    wa = load_weights(tmp_path / "a" / "model", IRN(TINY)).state_dict()
    wb = load_weights(tmp_path / "b" / "model", IRN(TINY)).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_adversarial_option_adds_a_discriminator_objective(faces_dirs, facerec):
    stage = _stage(faces_dirs, facerec, adv_weight=0.1, disc_channels=8, disc_layers=2)
    assert set(stage.modules) == {"irn", "disc"}
    torch.nn.init.normal_(stage.modules["irn"].tail.weight, std=0.01)  # zero tail: no adaptive-weight gradient
    g, d = stage.objectives(stage.modules)
    batch, cache = stage.batch(0, 0, 1), {}
    loss, logs = g.loss_fn(batch, 0, cache)
    loss.backward()
    out, disc, cfg = cache["out"].detach(), stage.modules["disc"], stage.cfg
    with torch.no_grad():  # the generator's loss: Eq. 11 + perceptual, plus adv_weight x adaptive weight x -D(out)
        base = irn_loss(out, batch["gt"], facerec, cfg.alpha, identity_weight=cfg.identity_weight,
                        perceptual_weight=cfg.perceptual_weight)[0]
        assert logs["adv"] == pytest.approx(-disc(out).mean().item(), rel=1e-5)
        assert loss.item() == pytest.approx(base.item() + cfg.adv_weight * logs["adv_w"] * logs["adv"], rel=1e-5)
        assert logs["adv_w"] > 0
        d_want = hinge_d_loss(disc(batch["gt"]), disc(out)).item()
    d_loss, d_logs = d.loss_fn(batch, 0, cache)
    d_loss.backward()
    assert d_logs["d_loss"] == pytest.approx(d_want, rel=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    assert g.name == "irn" and d.name == "disc"


def test_detail_energy_term_adds_its_weighted_loss(faces_dirs, facerec):
    stage = _stage(faces_dirs, facerec, detail_energy_weight=3.0, detail_window=4)
    (g,) = stage.objectives(stage.modules)
    batch = stage.batch(0, 0, 1)
    loss, logs = g.loss_fn(batch, 0, {})
    loss.backward()
    cfg = stage.cfg
    with torch.no_grad():
        out = stage.modules["irn"](batch["lq"])
        base = irn_loss(out, batch["gt"], facerec, cfg.alpha, identity_weight=cfg.identity_weight,
                        perceptual_weight=cfg.perceptual_weight)[0]
        want = detail_energy_l1(out, batch["gt"], 4).item()
    assert logs["detail"] == pytest.approx(want, rel=1e-5) and want > 0
    assert loss.item() == pytest.approx(base.item() + 3.0 * want, rel=1e-5)
    assert all(p.grad is not None for p in stage.modules["irn"].parameters())


def test_disc_warmup_trains_only_the_discriminator_first(faces_dirs, tmp_path):
    path = _tiny_run_config(tmp_path, faces_dirs, val_every=0, adv_weight=0.1, disc_channels=8, disc_layers=2,
                            disc_warmup=2)
    assert run_stage("irn", path, out=str(tmp_path / "w")) == 2
    log = (tmp_path / "w" / "log.csv").read_text()
    assert ",d_loss," in log and ",adv," not in log and ",l1," not in log  # two discriminator-only steps
    assert load_irn(tmp_path / "w" / "model").tail.weight.abs().sum() == 0  # the IRN kept its zero init
    assert run_stage("irn", path, ["train.steps=3"], out=str(tmp_path / "w"), resume=True) == 3
    assert ",adv," in (tmp_path / "w" / "log.csv").read_text()  # then both train


def test_jittered_identity_loss_shares_the_chip_of_output_and_target(facerec, faces_dirs):
    gt = to_model_range(load_face_folder(faces_dirs[1]))[:2]
    torch.manual_seed(0)
    same, logs = irn_loss(gt.clone(), gt, facerec, alpha=1.0, jitter=0.05)
    assert logs["id"] < 1e-5  # the output is the GT: the same random chip on both sides
    other, logs_other = irn_loss(gt.flip(0), gt, facerec, alpha=0.0, jitter=0.05)
    plain, logs_plain = irn_loss(gt.flip(0), gt, facerec, alpha=0.0)
    assert logs_other["id"] > 0.05 and abs(logs_other["id"] - logs_plain["id"]) < 0.05  # a small perturbation


def test_blurred_identity_loss_sees_both_faces_through_the_low_pass(facerec, faces_dirs):
    gt = to_model_range(load_face_folder(faces_dirs[1]))[:2]
    t = (torch.arange(128) // 2) % 2 * 2.0 - 1
    gridded = (gt + 0.15 * t[:, None] * t[None, :]).clamp(-1, 1)
    _, plain = irn_loss(gridded, gt, facerec, alpha=0.0)
    _, blurred = irn_loss(gridded, gt, facerec, alpha=0.0, blur=IDS_BLUR_SIGMA, e_gt=descriptor(facerec, gt))
    e1 = torch.nn.functional.normalize(descriptor(facerec, low_pass(gridded, IDS_BLUR_SIGMA)), dim=-1)
    e2 = torch.nn.functional.normalize(descriptor(facerec, low_pass(gt, IDS_BLUR_SIGMA)), dim=-1)
    # the cached full-view target is ignored: both sides are blurred
    assert blurred["id"] == pytest.approx((1 - (e1 * e2).sum(-1)).mean().item(), abs=1e-5)
    assert blurred["id"] < plain["id"]  # the grid the blur removes no longer costs identity


def test_anchor_term_pins_the_upper_octave_to_the_start_irn(faces_dirs, facerec, tmp_path):
    start = IRN(TINY)
    torch.nn.init.normal_(start.tail.weight, std=0.05)
    save_checkpoint(tmp_path / "start", start, TINY, "irn")
    stage = _stage(faces_dirs, facerec, init_from=str(tmp_path / "start"), anchor_weight=4.0)
    assert set(stage.modules) == {"irn"}  # the anchor is frozen, not trained or checkpointed
    (g,) = stage.objectives(stage.modules)
    batch = stage.batch(0, 0, 1)
    loss, logs = g.loss_fn(batch, 0, {})
    assert logs["anchor"] == pytest.approx(0.0, abs=1e-6)  # the model starts as its anchor
    with torch.no_grad():
        irn = stage.modules["irn"]
        irn.tail.weight.mul_(0.5)
        out, ref = irn(batch["lq"]), start(batch["lq"])
        base = irn_loss(out, batch["gt"], facerec, stage.cfg.alpha, identity_weight=stage.cfg.identity_weight,
                        perceptual_weight=stage.cfg.perceptual_weight)[0]
        want = (band_split(out, 64)[1] - band_split(ref, 64)[1]).abs().mean().item()
    loss, logs = g.loss_fn(batch, 1, {})
    assert logs["anchor"] == pytest.approx(want, rel=1e-4) and want > 1e-4
    assert loss.item() == pytest.approx(base.item() + 4.0 * want, rel=1e-4)
    assert anchor_l1(out, out + 0.3, 1).item() == pytest.approx(0.0, abs=1e-5)  # a constant shift is no texture


def test_anchor_needs_a_start_irn(faces_dirs, facerec):
    with pytest.raises(ClrfaceError, match="init_from"):
        _stage(faces_dirs, facerec, anchor_weight=1.0)
