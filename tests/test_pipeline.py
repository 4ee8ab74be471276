import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from clrface.checkpoint import save_checkpoint
from clrface.data.io import load_image, to_uint8
from clrface.demo import demo_image
from clrface.device import auto_dtype, native_bf16
from clrface.diffusion.prior import LatentPrior, PriorConfig, load_prior
from clrface.diffusion.unet import UNetConfig
from clrface.errors import CheckpointError, ClrfaceError
from clrface.faces.align import align_faces
from clrface.faces.detail import keep_input_detail, lower_band_from, photo_blockiness, upper_band_from
from clrface.faces.paste import paste_mask
from clrface.options import FidelityMap, RestoreOptions
from clrface.photo import best_first, resize_lanczos, restore_photo
from clrface.restorer import Restorer, face_noise
from clrface.vqgan.model import encoder_fingerprint, load_vqgan

S = 32  # the resolution of conftest.build_tiny_model


def _faces(b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, S, S, generator=g) * 2 - 1).clamp(-1, 1)


def test_prior_config_round_trip(model_dir):
    prior = load_prior(model_dir / "prior")
    assert prior.config.unet.resolution == 8 and prior.config.schedule.steps == 4
    z = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(prior.denormalize(prior.normalize(z)), z)
    # channel 2 has mean 0, std 2: normalize halves it
    torch.testing.assert_close(prior.normalize(z)[:, 2], z[:, 2] / 2)


def test_fidelity_mapping_end_points_and_monotone():
    fm = FidelityMap()
    assert RestoreOptions(fidelity=0.0).resolve(fm) == pytest.approx((4.0, 0.0))
    assert RestoreOptions(fidelity=1.0).resolve(fm) == pytest.approx((0.05, fm.guidance_at_1))
    assert RestoreOptions(fidelity=0.5).resolve(fm)[0] == pytest.approx((4.0 * 0.05) ** 0.5)
    sig = [RestoreOptions(fidelity=f).resolve(fm) for f in np.linspace(0, 1, 6)]
    assert all(a[0] > b[0] and a[1] < b[1] for a, b in zip(sig, sig[1:]))
    assert RestoreOptions(fidelity=0.3, sigma_start=0.2, guidance_scale=3.0).resolve(fm) == (0.2, 3.0)
    for bad, msg in (({"fidelity": 1.5}, "fidelity must be in"), ({"sampler": "ddim"}, "unknown sampler"),
                     ({"mode": "x"}, "unknown mode"), ({"upscale": 0}, "upscale"), ({"steps": 0}, "steps must be")):
        with pytest.raises(ClrfaceError, match=msg):
            RestoreOptions(**bad)


def test_restore_faces_shapes_determinism_and_batching(restorer):
    x = _faces(3)
    o = RestoreOptions(steps=3, seed=7, samples=2, fidelity=0.7)
    a = restorer.restore_faces(x, o)
    assert a.restored.shape == (3, 2, 3, S, S) and a.id_vs_irn.shape == (3, 2)
    assert a.restored.abs().max() <= 1 and a.sampling.nfe == 5  # heun: 2N - 1
    b = restorer.restore_faces(x, o)
    assert torch.equal(a.restored, b.restored)
    # per-face seeds: face 2 alone (as the third face) gives the same result as in the batch. Unguided: on CPUs
    # whose conv kernels depend on the batch size (AVX2), a 1e-6 difference can flip a nearest code of the tiny
    # random codebook inside the guidance's decode, which the guidance then amplifies (per-face guidance itself:
    # tests/identity/test_guidance.py)
    unguided = RestoreOptions(steps=3, seed=7, samples=2, fidelity=0.7, guidance_scale=0.0)
    a0, c = restorer.restore_faces(x, unguided), restorer.restore_faces(x[2:], unguided, first_index=2)
    torch.testing.assert_close(c.restored[0], a0.restored[2], atol=1e-5, rtol=0)
    assert (a.restored[:, 0] - a.restored[:, 1]).abs().max() > 1e-3  # samples differ
    d = restorer.restore_faces(x, RestoreOptions(steps=3, seed=8, samples=2, fidelity=0.7))
    assert (d.restored - a.restored).abs().max() > 1e-3
    # identity scores: cosines of each sample's embedding with the IRN output's (what --samples ranks by) and
    # with the input's
    with torch.no_grad():
        e = restorer.embed(a.restored.flatten(0, 1)).view(3, 2, -1)
        e_irn, e_in = restorer.embed(a.x_id), restorer.embed(x)
    torch.testing.assert_close(a.id_vs_irn, (e * e_irn[:, None]).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.id_vs_input, (e * e_in[:, None]).sum(-1), atol=1e-5, rtol=0)


def test_sigma_start_zero_without_guidance_is_decoded_irn_output(restorer):
    x = _faces(2)
    out = restorer.restore_faces(x, RestoreOptions(sigma_start=0.0, guidance_scale=0.0))
    with torch.no_grad():
        x_id = restorer.irn(x).clamp(-1, 1)
        expect = restorer.vqgan.decode(restorer.vqgan.encode(x_id)).clamp(-1, 1)
    torch.testing.assert_close(out.x_id, x_id)
    torch.testing.assert_close(out.restored[:, 0], expect, atol=1e-5, rtol=0)
    assert out.sampling.nfe == 0
    assert (out.x_id - x).abs().max() > 1e-3  # the IRN did something, so the test can tell


def test_irn_detail_takes_the_upper_octave_from_the_irn_output(restorer):
    x = _faces(2)
    o = RestoreOptions(sigma_start=0.0, guidance_scale=0.0)
    plain = restorer.restore_faces(x, o).restored[:, 0]
    out = restorer.restore_faces(x, RestoreOptions(sigma_start=0.0, guidance_scale=0.0, irn_detail=1.0))
    with torch.no_grad():
        x_id = restorer.irn(x).clamp(-1, 1)
        decoded = restorer.vqgan.decode(restorer.vqgan.encode(x_id))
    torch.testing.assert_close(out.restored[:, 0], upper_band_from(decoded, x_id).clamp(-1, 1), atol=1e-5, rtol=0)
    assert (out.restored[:, 0] - plain).abs().max() > 1e-3
    prior = RestoreOptions(mode="prior", sigma_start=0.0)  # no IRN output to take detail from
    torch.testing.assert_close(restorer.restore_faces(x, dataclasses.replace(prior, irn_detail=1.0)).restored,
                               restorer.restore_faces(x, prior).restored)
    two = restorer.restore_faces(x, RestoreOptions(sigma_start=0.0, guidance_scale=0.0, irn_detail=1.0,
                                                   irn_detail_octaves=2))
    torch.testing.assert_close(two.restored[:, 0], upper_band_from(decoded, x_id, octaves=2).clamp(-1, 1),
                               atol=1e-5, rtol=0)
    assert two.sampling.irn_detail_octaves == 2
    with pytest.raises(ClrfaceError, match="irn_detail"):
        RestoreOptions(irn_detail=1.5)
    with pytest.raises(ClrfaceError, match="irn_detail_octaves"):
        RestoreOptions(irn_detail_octaves=4)


def test_irn_tone_takes_the_lower_band_from_the_irn_output(restorer):
    x = _faces(2)
    out = restorer.restore_faces(x, RestoreOptions(sigma_start=0.0, guidance_scale=0.0, irn_tone=8))
    with torch.no_grad():
        x_id = restorer.irn(x).clamp(-1, 1)
        decoded = restorer.vqgan.decode(restorer.vqgan.encode(x_id))
    torch.testing.assert_close(out.restored[:, 0], lower_band_from(decoded, x_id, 8).clamp(-1, 1), atol=1e-5, rtol=0)
    assert out.sampling.irn_tone == 8 and out.sampling.as_dict()["irn_tone"] == 8
    both = restorer.restore_faces(x, RestoreOptions(sigma_start=0.0, guidance_scale=0.0, irn_tone=8, irn_detail=1.0))
    expected = upper_band_from(lower_band_from(decoded, x_id, 8), x_id).clamp(-1, 1)
    torch.testing.assert_close(both.restored[:, 0], expected, atol=1e-5, rtol=0)
    prior = RestoreOptions(mode="prior", sigma_start=0.0)  # no IRN output to take the tone from
    torch.testing.assert_close(restorer.restore_faces(x, dataclasses.replace(prior, irn_tone=8)).restored,
                               restorer.restore_faces(x, prior).restored)
    assert "irn_tone" not in restorer.restore_faces(x, prior).sampling.as_dict()
    with pytest.raises(ClrfaceError, match="irn_tone"):
        RestoreOptions(irn_tone=-1)
    with pytest.raises(ClrfaceError, match="below the model's resolution"):
        restorer.restore_faces(x, RestoreOptions(sigma_start=0.0, irn_tone=x.shape[-1]))
    with pytest.raises(ClrfaceError, match="below the model's resolution"):  # before any face, once
        restorer.options(irn_tone=x.shape[-1])


def test_modes(restorer):
    x = _faces(2)
    with torch.no_grad():
        direct = restorer.vqgan.decode(restorer.vqgan.encode(x)).clamp(-1, 1)
        irn = restorer.irn(x).clamp(-1, 1)
    out = restorer.restore_faces(x, RestoreOptions(mode="direct"))
    torch.testing.assert_close(out.restored[:, 0], direct, atol=1e-5, rtol=0)
    out = restorer.restore_faces(x, RestoreOptions(mode="irn"))
    torch.testing.assert_close(out.restored[:, 0], irn)
    torch.testing.assert_close(out.id_vs_irn, torch.ones(2, 1), atol=1e-5, rtol=0)
    # prior from z_d at sigma 0 is the direct reconstruction; at sigma_max it ignores the start latent
    out = restorer.restore_faces(x, RestoreOptions(mode="prior", sigma_start=0.0))
    torch.testing.assert_close(out.restored[:, 0], direct, atol=1e-5, rtol=0)
    o = RestoreOptions(mode="prior", sigma_start=80.0, steps=3)
    a, b = restorer.restore_faces(x, o), restorer.restore_faces(_faces(2, seed=5), o)
    assert torch.isfinite(a.restored).all() and (a.restored - b.restored).abs().max() > 0  # cond differs

    def start_effect(sigma: float) -> float:  # how much a shifted start latent moves the output
        o = RestoreOptions(mode="prior", sigma_start=sigma, steps=3)
        moved = restorer.restore_faces(x, o, start=lambda z: z + 0.5).restored
        return (moved - restorer.restore_faces(x, o).restored).abs().mean().item()

    assert start_effect(80.0) < 0.05 * start_effect(0.5)
    # full mode: guidance changes the result relative to the same run without guidance
    g0 = restorer.restore_faces(x, RestoreOptions(steps=2, guidance_scale=0.0))
    g1 = restorer.restore_faces(x, RestoreOptions(steps=2, guidance_scale=50.0))
    assert g1.sampling.guidance_scale == 50.0 and (g0.restored - g1.restored).abs().max() > 1e-4


def test_restore_image_aligned_sizes(restorer):
    crop = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    o = RestoreOptions(steps=2)
    res = restorer.restore_image(crop, o, aligned=True)
    assert res.image.shape == (200, 200, 3) and len(res.faces) == 1 and not res.no_face
    f = res.faces[0]
    assert np.array_equal(f.crop_in, resize_lanczos(crop, S, S))
    assert np.array_equal(f.crops_out[0], to_uint8(restorer.restore_crops(f.crop_in[None], o).restored[0])[0].numpy())
    kept = keep_input_detail(crop, f.crops_out[0], block=photo_blockiness(crop))[0]  # 200 px >= S: detail kept
    assert np.array_equal(res.image, resize_lanczos(kept, 200, 200))
    assert f.box.tolist() == [0, 0, 200, 200]
    np.testing.assert_allclose(f.affine, [[0.16, 0, -0.42], [0, 0.16, -0.42]])  # S / 200, pixel centres
    res2 = restorer.restore_image(crop, RestoreOptions(steps=2, upscale=2), aligned=True)
    assert np.array_equal(res2.image, resize_lanczos(kept, 400, 400))
    wide = restorer.restore_image(crop[:, :160], o, aligned=True)  # 160 wide, 200 high: stretched and back
    assert wide.image.shape == (200, 160, 3) and "not square" in wide.warnings[0]
    assert np.array_equal(wide.faces[0].crop_in, resize_lanczos(crop[:, :160], S, S))


def test_missing_and_wrong_models(tmp_path, model_dir, tiny_model_builder):
    a = tiny_model_builder(tmp_path / "a", irn=False, mask=False)
    shutil.rmtree(a / "prior")
    with pytest.raises(CheckpointError, match="missing prior/"):
        Restorer.from_pretrained(a)
    with pytest.raises(CheckpointError, match="no installed model"):
        Restorer.from_pretrained("no-such-model")
    # a prior checkpoint in the vqgan slot: wrong kind
    b = tiny_model_builder(tmp_path / "b", irn=False, mask=False)
    shutil.rmtree(b / "vqgan")
    shutil.copytree(model_dir / "prior", b / "vqgan")
    with pytest.raises(CheckpointError, match="expected 'vqgan'"):
        Restorer.from_pretrained(b)
    # a prior for 16 x 16 latents beside a VQGAN with 8 x 8 latents: wrong shape
    c = tiny_model_builder(tmp_path / "c", irn=False, mask=False)
    unet = UNetConfig(resolution=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(), head_channels=8, norm_groups=4)
    cfg = PriorConfig(unet=unet)
    save_checkpoint(c / "prior", LatentPrior(cfg), cfg, "prior")
    with pytest.raises(CheckpointError, match="does not fit the VQGAN"):
        Restorer.from_pretrained(c)
    # a prior trained on another VQGAN's latents (same shape): refused by the encoder's fingerprint it records
    d = tiny_model_builder(tmp_path / "d", irn=False, mask=False)
    meta = json.loads((d / "prior" / "config.json").read_text())
    (d / "prior" / "config.json").write_text(json.dumps({**meta, "vqgan_encoder": "0123456789abcdef"}))
    with pytest.raises(CheckpointError, match="was trained on the latents of another VQGAN encoder"):
        Restorer.from_pretrained(d)
    own = encoder_fingerprint(load_vqgan(d / "vqgan"))
    (d / "prior" / "config.json").write_text(json.dumps({**meta, "vqgan_encoder": own}))
    assert Restorer.from_pretrained(d).prior is not None
    decoder_tuned = load_vqgan(d / "vqgan")
    with torch.no_grad():
        decoder_tuned.decoder.conv_in.weight.add_(1.0)  # a decoder fine-tune keeps the encoder's fingerprint
    assert encoder_fingerprint(decoder_tuned) == own


def test_without_irn_starts_from_zd(tmp_path, tiny_model_builder):
    r = Restorer.from_pretrained(tiny_model_builder(tmp_path / "m", irn=False, mask=False))
    x = _faces(1)
    out = r.restore_faces(x, RestoreOptions(sigma_start=0.0))
    torch.testing.assert_close(out.x_id, x)
    with torch.no_grad():
        direct = r.vqgan.decode(r.vqgan.encode(x)).clamp(-1, 1)
    torch.testing.assert_close(out.restored[:, 0], direct, atol=1e-5, rtol=0)


def test_face_noise_is_per_face():
    a = face_noise((3, 3, 8, 8), seed=1, sample_k=0)
    b = face_noise((2, 3, 8, 8), seed=1, sample_k=0, first_index=1)
    assert torch.equal(a[1:], b)
    assert not torch.equal(a, face_noise((3, 3, 8, 8), seed=1, sample_k=1))


def test_whole_photo_end_to_end(restorer, shared_data):
    photo = load_image(shared_data("real_lq", "whole", "codeformer_01.jpg"))  # 248 x 189, one face
    res = restorer.restore_image(photo, RestoreOptions(steps=4))
    assert not res.no_face and len(res.faces) >= 1 and res.image.shape == photo.shape
    mask = sum(paste_mask(photo.shape[:2], f.affine, affine_size=S) for f in res.faces)
    far = mask == 0
    assert far.mean() > 0.3
    assert np.array_equal(res.image[far], photo[far])  # pixels away from the faces are untouched
    assert np.abs(res.image[mask > 0.99].astype(int) - photo[mask > 0.99]).mean() > 1  # faces were replaced
    up = restorer.restore_image(photo, RestoreOptions(steps=1, upscale=2))
    assert up.image.shape == (photo.shape[0] * 2, photo.shape[1] * 2, 3)


def test_no_face_returns_photo_unchanged(restorer):
    flat = np.full((64, 80, 3), 128, np.uint8)
    res = restorer.restore_image(flat)
    assert res.no_face and res.warnings and np.array_equal(res.image, flat) and res.faces == []
    assert res.warnings == ["no face found; returned unchanged"]
    up = restorer.restore_image(flat, RestoreOptions(upscale=2))
    assert up.image.shape == (128, 160, 3) and up.warnings == ["no face found; returned enlarged x2 only"]


def test_reduced_precision_runs_under_autocast(model_dir, restorer):
    x = _faces(2)
    o = RestoreOptions(steps=2, guidance_scale=0.0)
    ref = restorer.restore_faces(x, o).restored
    with warnings.catch_warnings():  # on a CPU without native bf16 it warns that bf16 is emulated: known here
        warnings.simplefilter("ignore", UserWarning)
        bf = Restorer.from_pretrained(model_dir, dtype=torch.bfloat16, facerec=restorer.facerec)
    assert next(bf.prior.parameters()).dtype == torch.float32  # weights stay fp32; the nets run in bf16
    out = bf.restore_faces(x, o).restored
    assert out.dtype == torch.float32
    err = (out - ref).abs().mean().item()
    assert 0 < err < 0.1  # bf16 differs, but only by rounding (measured 0.035)
    # guided: the random tiny nets' identity gradient is chaotic, so only check it runs and stays finite
    assert torch.isfinite(bf.restore_faces(x, RestoreOptions(steps=2, guidance_scale=5.0)).restored).all()


def test_restore_json_defaults_are_the_model_default_and_flags_override(tmp_path, tiny_model_builder):
    folder = tiny_model_builder(tmp_path / "m")
    (folder / "restore.json").write_text(json.dumps({"defaults": {"mode": "irn", "steps": 7, "sampler": "euler"}}))
    r = Restorer.from_pretrained(folder)
    o = r.options()
    assert (o.mode, o.steps, o.sampler, o.fidelity) == ("irn", 7, "euler", 0.5)
    o = r.options(mode="direct", steps=None)
    assert (o.mode, o.steps) == ("direct", 7)
    (folder / "restore.json").write_text(json.dumps({"defaults": {"mode": "nonsense"}}))
    with pytest.raises(CheckpointError, match="restore.json"):
        Restorer.from_pretrained(folder)
    shutil.rmtree(folder)


def test_auto_dtype_picks_bf16_only_on_cpus_with_native_bf16():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_dtype(cpu, frozenset({"avx2", "amx_bf16", "amx_tile"})) == "bfloat16"
    assert auto_dtype(cpu, frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
    assert auto_dtype(cpu, frozenset({"avx2", "avx512f"})) == "float32"  # emulated bf16 would be slower
    assert auto_dtype(cpu, frozenset()) == "float32"
    assert auto_dtype(cuda, frozenset({"amx_bf16"})) == "float32"  # GPUs: not measured yet


def test_native_bf16_is_gpus_and_cpus_with_bf16_instructions():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert native_bf16(cpu, frozenset({"avx512f", "avx512_bf16"}))
    assert native_bf16(cpu, frozenset({"amx_bf16"}))
    assert not native_bf16(cpu, frozenset({"fma", "avx", "f16c", "avx2"}))  # an AVX2-only EPYC: emulated, ~80x slower
    assert native_bf16(cuda, frozenset())
    assert not native_bf16(torch.device("mps"), frozenset({"avx512_bf16"}))


def test_samples_are_written_best_identity_first(restorer):
    x = _faces(2)
    o = RestoreOptions(steps=3, seed=7, samples=4, fidelity=0.3)
    raw = restorer.restore_faces(x, o)
    ranked = best_first(raw)
    assert (ranked.id_vs_irn[:, :-1] >= ranked.id_vs_irn[:, 1:]).all()
    for i in range(2):  # the same samples, reordered with their scores and latents
        order = torch.argsort(raw.id_vs_irn[i], descending=True, stable=True)
        assert torch.equal(ranked.restored[i], raw.restored[i, order])
        assert torch.equal(ranked.id_vs_input[i], raw.id_vs_input[i, order])
        assert torch.equal(ranked.latent[i], raw.latent[i, order])
    # a whole restore writes them in that order
    crop = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    res = restore_photo(restorer, crop, o, aligned=True, keep_detail=False)
    scores = res.faces[0].id_vs_irn
    assert scores == sorted(scores, reverse=True)
    single = best_first(restorer.restore_faces(x, RestoreOptions(steps=3, samples=1)))
    assert single.restored.shape[1] == 1


def test_a_photo_restored_as_an_aligned_crop_is_warned_about(restorer):
    photo = demo_image()
    o = RestoreOptions(mode="irn")
    (crop, _), = align_faces(photo, 256, max_faces=1)
    assert restore_photo(restorer, crop, o, aligned=True).warnings == []
    (warning,) = restore_photo(restorer, photo, o, aligned=True).warnings
    assert "not where an FFHQ-aligned crop has it" in warning and "restore it as a photo" in warning
