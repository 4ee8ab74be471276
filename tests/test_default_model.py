"""The shipped default model: loads offline from the package and improves degraded faces with its defaults."""


import numpy as np
import pytest
import torch
from PIL import Image

from clrface.data.datasets import load_face_folder
from clrface.data.degradation import degrade_batch, get_preset
from clrface.data.io import data_root, to_model_range
from clrface.demo import demo_image
from clrface.faces.detail import band_split
from clrface.metrics.ids import cosine
from clrface.metrics.noref import colorfulness
from clrface.metrics.psnr_ssim import psnr
from clrface.model_folder import merged_spec, package_weights, read_spec
from clrface.options import FidelityMap, RestoreOptions
from clrface.photo import restore_photo
from clrface.restorer import Restorer

VAL = data_root() / "faces128" / "val"
NO_VAL = f"shared data {VAL} not found (set CLRFACE_DATA)"


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    torch.set_num_threads(1)
    return Restorer.from_pretrained()  # the packaged default, no path


def test_default_model_loads_with_its_measured_defaults(restorer):
    assert restorer.resolution == 128 and restorer.irn is not None
    o = restorer.options()  # the defaults README and docs/RESULTS.md describe: the IRN alone
    assert (o.mode, o.steps, o.sampler, o.fidelity, o.irn_tone) == ("irn", 10, "heun", 0.75, 8)
    assert o.resolve(restorer.fidelity_map) == pytest.approx((0.4472, 5.0), abs=1e-4)  # mode full's start


@pytest.mark.skipif(not VAL.is_dir(), reason=NO_VAL)
def test_default_restore_improves_psnr_of_degraded_val_faces(restorer):
    gt = to_model_range(load_face_folder(VAL, limit=8))
    lq, _ = degrade_batch(gt, get_preset("bfr", 128), generator=0)
    out = restorer.restore_faces(lq, restorer.options()).restored[:, 0]
    gain = (psnr(out, gt) - psnr(lq, gt)).mean().item()
    assert gain > 0.4, gain  # +0.59 dB on these 8 faces (fp32); the IRN's 500-face figures: docs/RESULTS.md
    with torch.no_grad():
        e = lambda x: restorer.facerec.descriptor_from_chip(restorer.facerec.chip(x))  # noqa: E731
        ids_out, ids_in = cosine(e(out), e(gt)).mean().item(), cosine(e(lq), e(gt)).mean().item()
    assert ids_out > ids_in + 0.002, (ids_out, ids_in)  # 0.9283 vs 0.9232 here


@pytest.mark.parametrize("name,color", [("extreme", "auto"), ("colorize", "full")])
def test_fine_tuned_models_load_by_name_on_the_default_base(restorer, name, color):
    ft = Restorer.from_pretrained(name, facerec=restorer.facerec)
    assert ft.source.endswith(f"weights/{name}") and ft.options().mode == "irn" and ft.options().color == color
    # the prior and VQGAN come from the default; the IRN is the fine-tuned one
    for a, b in zip(ft.prior.parameters(), restorer.prior.parameters()):
        assert torch.equal(a, b)
    diff = max((a - b).abs().max().item() for a, b in zip(ft.irn.parameters(), restorer.irn.parameters()))
    assert diff > 1e-3


def test_extreme_model_warns_on_a_face_with_more_detail_than_it_was_trained_for(restorer):
    ext = Restorer.from_pretrained("extreme", facerec=restorer.facerec)
    assert ext.input_detail_limit == (32, 4.0) and restorer.input_detail_limit is None
    face = np.array(Image.fromarray(demo_image()[40:260, 130:350]).resize((128, 128), Image.LANCZOS))
    tiny = np.array(Image.fromarray(face).resize((16, 16), Image.BICUBIC).resize((128, 128), Image.BICUBIC))

    def detail_warnings(r: Restorer, x: np.ndarray) -> list[str]:  # (the crop is not FFHQ-aligned: warned too)
        return [w for w in restore_photo(r, x, r.options(), aligned=True).warnings if "more fine detail" in w]

    assert len(detail_warnings(ext, face)) == 1
    assert detail_warnings(ext, tiny) == [] and detail_warnings(restorer, face) == []  # x8: what it is for


def test_colorize_model_colours_a_gray_face(restorer):
    face = np.array(Image.fromarray(demo_image()[40:260, 130:350]).convert("L").resize((128, 128)))
    gray = torch.from_numpy(face).float().div(127.5).sub(1)[None, None].expand(1, 3, -1, -1)
    col = Restorer.from_pretrained("colorize", facerec=restorer.facerec)
    out = col.restore_faces(gray, col.options()).restored[:, 0]
    assert colorfulness(gray).max().item() == 0
    assert colorfulness(out).mean().item() > 5  # 30 on the gray test set (docs/RESULTS.md, 'Colorization')


def test_fast_fidelity_knob_starts_where_it_measured_best():
    spec = merged_spec(read_spec(package_weights("fast")), read_spec(package_weights("default")))
    fm = FidelityMap(**spec["fidelity_map"])
    # default: sigma 0.447 with guidance 10; fidelity 1: sigma 0.25, not the VQGAN round trip of sigma 0.05
    # (500 bfr faces, docs/RESULTS.md 'The fidelity knob of the one-step model')
    assert RestoreOptions(**spec["defaults"]).resolve(fm) == pytest.approx((0.2**0.5, 10.0))
    assert RestoreOptions(fidelity=1.0).resolve(fm) == pytest.approx((0.25, 40 / 3))
    assert fm.sigma_start(0.0) > 2.0 and fm.guidance_scale(0.0) == 0  # fidelity 0 still regenerates


@pytest.mark.skipif(not VAL.is_dir(), reason=NO_VAL)
def test_fast_model_matches_the_teacher_in_one_evaluation(restorer):
    fast = Restorer.from_pretrained("fast", facerec=restorer.facerec)
    o = fast.options()
    # the default's IRN (base default): its outputs started the trajectories the prior was distilled on
    assert (o.mode, o.sampler, o.steps) == ("full", "euler", 1) and fast.mask is not None and fast.irn is not None
    gt = to_model_range(load_face_folder(VAL, limit=4))
    lq, _ = degrade_batch(gt, get_preset("bfr", 128), generator=0)
    got = fast.restore_faces(lq, o)
    # with the IRN's finest octave, as fast takes it by default (docs/RESULTS.md, 'The IRN's finest octave in the
    # one-step model')
    assert (o.irn_tone, o.irn_detail, o.irn_detail_octaves) == (8, 1.0, 1)
    teacher = restorer.restore_faces(lq, restorer.options(mode="full", steps=10, sampler="heun", irn_detail=1.0))
    assert got.sampling.nfe == 1 and teacher.sampling.nfe == 19
    agree = psnr(got.restored[:, 0], teacher.restored[:, 0]).mean().item()
    assert agree > 30, agree  # the student lands where the default's 19 evaluations do (38.7 dB)


@pytest.mark.skipif(not VAL.is_dir(), reason=NO_VAL)
def test_full_mode_keeps_the_irn_tone(restorer):
    # the decoded latent drifts in colour; the installed models take the tone below 8 px from the IRN output
    # (docs/RESULTS.md, 'The IRN's tone under the decoded face')
    gt = to_model_range(load_face_folder(VAL, limit=4))
    lq, _ = degrade_batch(gt, get_preset("bfr", 128), generator=1)
    o = restorer.options(mode="full", steps=1, sampler="euler")
    assert o.irn_tone == 8
    toned = restorer.restore_faces(lq, o)
    plain = restorer.restore_faces(lq, restorer.options(mode="full", steps=1, sampler="euler", irn_tone=0))
    assert toned.sampling.irn_tone == 8 and plain.sampling.irn_tone == 0

    def tone_gap(r):
        return (band_split(r.restored[:, 0], 8)[0] - band_split(r.x_id, 8)[0]).abs().mean().item()

    assert tone_gap(toned) < 0.2 * tone_gap(plain), (tone_gap(toned), tone_gap(plain))
    # the shapes above 8 px stay the decoded face's
    diff_hi = band_split(toned.restored[:, 0], 8)[1] - band_split(plain.restored[:, 0], 8)[1]
    assert diff_hi.abs().mean().item() < 0.1 * band_split(plain.restored[:, 0], 8)[1].abs().mean().item()
