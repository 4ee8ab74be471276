import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from clrface.cli import main
from clrface.data.io import to_model_range
from clrface.demo import demo_image
from clrface.errors import ClrfaceError
from clrface.photo import restore_photo
from clrface.reference import Reference, ReferencePolicy, assign_reference, load_reference, mean_identity


def _crop(restorer, seed: int) -> np.ndarray:
    """A smooth random 'face' at the model's size (the tiny model and the real recogniser take any image)."""
    s = restorer.resolution
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((s, s), Image.Resampling.BICUBIC))


def test_mean_identity_weighs_every_photo_the_same():
    e = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    assert torch.allclose(mean_identity(e), torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    with pytest.raises(ValueError):
        mean_identity(torch.zeros(0, 2))


def test_assign_reference_best_face_all_faces_and_force():
    p = ReferencePolicy(threshold=0.84)
    assert assign_reference([0.7, 0.9, 0.86], p) == ([False, True, False], [])
    used, warns = assign_reference([0.7, 0.9, 0.86], ReferencePolicy(all_faces=True, threshold=0.84))
    assert used == [False, True, True] and len(warns) == 1 and warns[0].startswith("face 0:")
    used, warns = assign_reference([0.5, 0.6], p)
    assert used == [False, False] and "restored without it" in warns[0] and "face 1" in warns[0]
    used, warns = assign_reference([0.5, 0.6], ReferencePolicy(force=True, threshold=0.84))
    assert used == [False, True] and "--force-reference" in warns[0]
    assert assign_reference([], p) == ([], [])


def test_zero_rows_change_nothing_and_a_reference_pulls_toward_its_identity(restorer):
    faces = to_model_range(np.stack([_crop(restorer, 1), _crop(restorer, 2)]))
    target = torch.nn.functional.normalize(restorer.embed(to_model_range(_crop(restorer, 3)[None])).float(), dim=-1)
    o = restorer.options(mode="full", steps=4, sampler="euler", sigma_start=1.0, guidance_scale=0.0,
                         reference_guidance=2000.0)  # the tiny random model needs a hard push
    plain = restorer.restore_faces(faces, o)
    zero = restorer.restore_faces(faces, o, reference=torch.zeros(2, target.shape[1]))
    assert torch.equal(plain.restored, zero.restored) and zero.id_vs_reference.isnan().all()
    guided = restorer.restore_faces(faces, o, reference=torch.cat([target, torch.zeros_like(target)]))
    assert torch.equal(guided.restored[1], plain.restored[1])  # the face without a reference is untouched
    assert guided.sampling.as_dict()["reference_guidance"] == 2000.0 and "reference_guidance" not in \
        plain.sampling.as_dict()
    before = torch.nn.functional.cosine_similarity(restorer.embed(plain.restored[0, :1]).float(), target).item()
    after = guided.id_vs_reference[0, 0].item()
    assert after > before + 0.01, (before, after)
    assert torch.equal(guided.id_vs_target[1], guided.id_vs_irn[1])
    with pytest.raises(ClrfaceError, match="mode full"):
        restorer.restore_faces(faces, restorer.options(mode="irn"), reference=zero.id_vs_reference)


def test_a_face_guided_by_a_reference_does_not_take_the_irns_detail(restorer):
    faces = to_model_range(np.stack([_crop(restorer, 1), _crop(restorer, 2)]))
    target = torch.nn.functional.normalize(restorer.embed(to_model_range(_crop(restorer, 3)[None])).float(), dim=-1)
    ref = torch.cat([target, torch.zeros_like(target)])  # face 0 guided by the reference, face 1 by its IRN output
    o = restorer.options(mode="full", steps=2, sampler="euler", sigma_start=1.0, guidance_scale=0.0,
                         reference_guidance=50.0, irn_detail=1.0)
    with_detail = restorer.restore_faces(faces, o, reference=ref).restored
    without = restorer.restore_faces(faces, replace(o, irn_detail=0.0), reference=ref).restored
    unguided = restorer.restore_faces(faces, o).restored
    assert torch.equal(with_detail[0], without[0])  # the reference's face: its decoded detail
    assert torch.equal(with_detail[1], unguided[1])  # the other face: the IRN's octave as without a reference
    assert (with_detail[1] - without[1]).abs().max() > 0.01


def test_restore_photo_reports_the_reference_per_face(restorer):
    ref = load_reference(restorer, [_crop(restorer, 3)], aligned=True)
    assert ref.count == 1 and abs(ref.embedding.norm().item() - 1) < 1e-5
    photo = _crop(restorer, 1)
    o = restorer.options(mode="full", steps=2, sampler="euler")
    forced = restore_photo(restorer, photo, o, aligned=True, reference=ref,
                           reference_policy=ReferencePolicy(threshold=1.01, force=True))
    entry = forced.faces[0].reference
    assert entry["used"] and entry["photos"] == 1 and len(entry["id_vs_reference"]) == 1
    assert "--force-reference" in forced.warnings[0]
    refused = restore_photo(restorer, photo, o, aligned=True, reference=ref,
                            reference_policy=ReferencePolicy(threshold=1.01))
    assert not refused.faces[0].reference["used"] and "restored without it" in refused.warnings[0]
    assert entry["cos_input_vs_reference"] == refused.faces[0].reference["cos_input_vs_reference"]
    with pytest.raises(ClrfaceError, match="mode full"):
        restore_photo(restorer, photo, restorer.options(mode="irn"), aligned=True, reference=ref)
    with pytest.raises(ClrfaceError, match="no face found"):
        load_reference(restorer, [np.zeros((64, 64, 3), np.uint8)])


def test_api_takes_reference_photos_and_runs_mode_full(restorer, tmp_path):
    Image.fromarray(_crop(restorer, 3)).save(tmp_path / "ref.png")
    res = restorer.restore(_crop(restorer, 1), aligned=True, reference=[tmp_path / "ref.png"], steps=2,
                           force_reference=True)
    assert res.sampling["nfe"] > 0 and res.faces[0].reference["used"]
    folder = load_reference(restorer, [tmp_path], aligned=True)  # a folder: every photo in it
    assert isinstance(folder, Reference) and folder.sources == (str(tmp_path / "ref.png"),)
    again = restorer.restore(_crop(restorer, 1), aligned=True, reference=folder, steps=2, force_reference=True)
    assert np.array_equal(again.image, res.image)
    with pytest.raises(ClrfaceError, match="a reference guides the identity of mode full; mode 'irn' has no "):
        restorer.restore(tmp_path / "missing.png", reference=tmp_path / "missing-too.png", mode="irn")  # none read


def test_cli_reference_flags(tmp_path, model_dir, capsys):
    Image.fromarray(demo_image()).resize((64, 64)).save(tmp_path / "in.png")
    Image.fromarray(demo_image()).resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "out"
    rc = main(["restore", str(tmp_path / "in.png"), "-o", str(out), "--model", str(model_dir), "--aligned",
               "--steps", "2", "--reference", str(tmp_path / "ref.png")])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    face = report["images"][0]["faces"][0]["reference"]
    assert face["used"] and face["cos_input_vs_reference"] > 0.99  # the same picture
    assert report["options"]["mode"] == "full" and report["reference"]["photos"] == [str(tmp_path / "ref.png")]
    capsys.readouterr()
    assert main(["restore", str(tmp_path / "in.png"), "-o", str(tmp_path / "o2"), "--model", str(model_dir),
                 "--aligned", "--mode", "irn", "--reference", str(tmp_path / "ref.png")]) == 1
    assert "mode full" in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "in.png"), "-o", str(tmp_path / "o3"), "--model", str(model_dir),
                 "--reference-all"]) == 1
    assert "need --reference" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not a photo")
    assert main(["restore", str(tmp_path / "in.png"), "-o", str(tmp_path / "o4"), "--model", str(model_dir),
                 "--aligned", "--reference", str(tmp_path / "notes.png")]) == 1
    assert capsys.readouterr().err.strip() == (f"clrface: error: reference {tmp_path / 'notes.png'}: not an image "
                                               "(unrecognised file format)")
