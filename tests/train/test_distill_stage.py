import functools
import math

import pytest
import torch

from clrface.data.datasets import load_face_folder
from clrface.diffusion.prior import load_prior
from clrface.diffusion.sampler import euler, sample
from clrface.diffusion.schedule import ScheduleConfig, sigmas_from
from clrface.metrics.psnr_ssim import psnr
from clrface.model_folder import load_model_folder
from clrface.train.distill import (
    DistillStage,
    DistillTrainConfig,
    Teacher,
    distill_targets,
    make_trajectories,
    start_kind,
)


def test_distill_targets_follow_the_gaussian_ode():
    # data N(0, 1): the exact denoiser is x / (1 + s^2) and the ODE maps x at sigma to x * sqrt((1 + s'^2) / (1 + s^2))
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * math.sqrt(1 + 2.0**2)
    sigmas = sigmas_from(ScheduleConfig(), 2.0, 20)
    states, x0 = distill_targets(lambda z, s: z / (1 + s.view(-1, 1, 1, 1) ** 2), x, sigmas)
    assert states.shape == (4, 20, 3, 2, 2)
    torch.testing.assert_close(states[:, 0], x)
    for k in (5, 12, 19):
        expect = x * math.sqrt((1 + float(sigmas[k]) ** 2) / (1 + 2.0**2))
        torch.testing.assert_close(states[:, k], expect, atol=1e-2, rtol=1e-2)  # Heun-20 error ~0.5 %
    torch.testing.assert_close(x0, x / math.sqrt(5.0), atol=1e-2, rtol=1e-2)


def test_start_kinds_take_their_shares():
    kinds = [start_kind(i, 0.25, 0.5) for i in range(2000)]
    assert kinds.count("noise") / 2000 == pytest.approx(0.25, abs=0.01)
    assert kinds.count("id") / 2000 == pytest.approx(0.375, abs=0.01)
    assert kinds.count("d") / 2000 == pytest.approx(0.375, abs=0.01)


def test_stage_trajectories_training_and_export(tiny_models, tmp_path, tiny_model_builder):
    torch.set_num_threads(1)
    model = tiny_model_builder(tmp_path / "teacher")
    cfg = DistillTrainConfig(model=str(model), train_dir=str(tiny_models["faces"]), val_dir=str(tiny_models["faces"]),
                             val_count=4, pairs=8, traj_batch=4, teacher_steps=3)
    out = tmp_path / "run"
    stage = DistillStage(cfg, seed=0, batch_size=6, out_dir=out)
    d = stage.data
    assert d["states"].shape == (8, 3, 3, 8, 8) and d["sigmas"].shape == (8, 3) and d["x0"].shape == (8, 3, 8, 8)
    assert (d["sigmas"][:, :-1] > d["sigmas"][:, 1:]).all()  # descending schedules, none at 0
    assert (out / "trajectories.pt").is_file()
    again = DistillStage(cfg, seed=0, batch_size=6, out_dir=out)  # the cache is reused, not regenerated
    torch.testing.assert_close(again.data["x0"], d["x0"])
    b = stage.batch(0, 0, 1)
    assert b["x"].shape == (6, 3, 8, 8) and b["sigma"].shape == (6,)
    # the student starts as the teacher; fitting one batch brings its loss down
    student = stage.modules["prior"]
    (obj,) = stage.objectives(stage.modules)
    opt = torch.optim.Adam(obj.params, lr=3e-3)
    first = obj.loss_fn(b, 0, {})[0].item()
    for _ in range(60):
        opt.zero_grad()
        loss, _ = obj.loss_fn(b, 0, {})
        loss.backward()
        opt.step()
    assert math.isfinite(first) and loss.item() < 0.5 * first
    logs = stage.validate(student.eval(), 0, out)
    assert {"latent_mse@1", "latent_mse@2", "latent_mse@4", "psnr@1", "psnr_teacher"} <= set(logs)
    with torch.no_grad():  # the teacher's row: its trajectory's end decoded, against the ground truth
        teacher_img = stage.teacher.decode(stage.val_teacher).clamp(-1, 1).cpu()
        one_step = sample(euler, functools.partial(student, cond=stage.val_zd), stage.val_zid,
                          sigmas_from(stage.schedule, cfg.val_sigma_start, 1), sigma_start=cfg.val_sigma_start,
                          noise=stage.val_noise)
    assert logs["psnr_teacher"] == pytest.approx(psnr(teacher_img, stage.val_gt).mean().item(), abs=1e-9)
    assert logs["latent_mse@1"] == pytest.approx((one_step - stage.val_teacher).square().mean().item(), rel=1e-6)
    assert (out / "val" / "0000000.png").is_file()
    stage.export(student, tmp_path / "student")
    loaded = load_prior(tmp_path / "student")
    torch.testing.assert_close(loaded(b["x"], b["sigma"], b["zd"]), student(b["x"], b["sigma"], b["zd"]))


def test_trajectories_take_the_realistic_mix(tiny_models, tmp_path, tiny_model_builder):
    teacher = Teacher(load_model_folder(str(tiny_model_builder(tmp_path / "teacher")), torch.device("cpu")))
    faces = load_face_folder(str(tiny_models["faces"]), size=teacher.resolution, limit=4)
    common = dict(model="unused", pairs=4, traj_batch=4, teacher_steps=2)
    off = dict(second_prob=0.0, fade_prob=0.0, gray_prob=0.0, grain_prob=0.0)
    sched = teacher.prior.config.schedule
    same = make_trajectories(teacher, faces, DistillTrainConfig(**common, realistic=off), sched, 0, log=lambda _: None)
    gray = make_trajectories(teacher, faces, DistillTrainConfig(**common, realistic={**off, "gray_prob": 1.0}), sched,
                             0, log=lambda _: None)
    assert gray["zd"].shape == same["zd"].shape == (4, 3, 8, 8)
    # the same draws but gray inputs: a different condition
    assert (gray["zd"] - same["zd"]).abs().mean() > 1e-3
