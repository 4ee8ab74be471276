"""ONNX export (clrface.export) and the torch-free runtime (clrface.onnx_runtime) against the torch pipeline."""

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx
import onnxruntime as ort

from clrface import onnx_runtime as rt  # noqa: E402
from clrface.cli import main  # noqa: E402
from clrface.data.degradation import degrade, get_preset
from clrface.data.io import to_model_range
from clrface.data.io import to_uint8 as torch_to_uint8
from clrface.demo import DEMO_SEED, demo_image
from clrface.diffusion import sampler as torch_sampler  # noqa: E402
from clrface.diffusion.schedule import ScheduleConfig, karras_sigmas, sigmas_from  # noqa: E402
from clrface.errors import CheckpointError, ClrfaceError  # noqa: E402
from clrface.export import GRAPH_IO, export_graph, export_restorer, graph_modules, graph_opset  # noqa: E402
from clrface.faces import detail
from clrface.faces.align import align_faces
from clrface.onnx_runtime import OnnxRestorer, face_noise, to_uint8  # noqa: E402
from clrface.options import SAMPLER_NAMES, RestoreOptions
from clrface.restorer import Restorer  # noqa: E402
from clrface.restorer import face_noise as torch_face_noise  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped default, exported once through the CLI with the default (dynamo) exporter."""
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", "onnx", "--model", "default", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    torch.set_num_threads(1)
    return Restorer.from_pretrained()


@pytest.fixture(scope="module")
def runtime(exported) -> OnnxRestorer:
    return OnnxRestorer(exported, threads=1)


@pytest.fixture(scope="module")
def demo_faces() -> np.ndarray:
    """uint8 [2,128,128,3]: the demo portrait's face aligned at 128 px, and its bfr-degraded version."""

    crop = align_faces(demo_image(), 128, max_faces=1)[0][0]
    lq, _ = degrade(crop, get_preset("bfr", 128), DEMO_SEED)
    return np.stack([lq, crop])


def test_runtime_json_and_opset(exported, restorer):
    spec = json.loads((exported / "runtime.json").read_text())
    pc = restorer.prior.config
    assert spec["resolution"] == 128 and spec["latent_size"] == 32 and spec["latent_channels"] == 3
    assert spec["latent_mean"] == list(pc.latent_mean) and spec["latent_std"] == list(pc.latent_std)
    assert spec["schedule"] == {"sigma_min": 0.002, "sigma_max": 20.0, "rho": 7.0, "steps": 40}
    assert spec["defaults"] == restorer.defaults and spec["fidelity_map"] == dataclasses.asdict(restorer.fidelity_map)
    assert set(spec["graphs"]) == {"encoder", "decoder", "denoiser", "irn"}
    for name in spec["graphs"].values():
        m = onnx.load(str(exported / name), load_external_data=False)
        assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 18
        assert graph_opset(exported / name) == 18
    for opset in (16, onnx.defs.onnx_opset_version() + 1):  # refused before any graph is written
        with pytest.raises(ClrfaceError, match=f"between 17 and {onnx.defs.onnx_opset_version()}"):
            export_restorer(restorer, exported / f"opset{opset}", opset=opset)
        assert not (exported / f"opset{opset}").exists()


def test_each_graph_matches_torch_at_batch_1(exported, restorer, runtime, demo_faces):
    """Batch 1 (exported at 2: the batch axis is dynamic); fp32 max abs difference measured ~1e-6."""
    mods = graph_modules(restorer.vqgan, restorer.prior, restorer.irn)
    for name, (module, args) in mods.items():
        a1 = tuple(a[1:] for a in args)
        with torch.no_grad():
            ref = module(*a1).numpy()
        out = runtime.sessions[name].run(None, {n: a.numpy() for n, a in zip(GRAPH_IO[name][0], a1)})[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4, name
    # on real latents, against the Restorer's own steps (the decoder picks the same codes)
    x = to_model_range(demo_faces)
    with torch.no_grad():
        z = restorer.encode(x)
        np.testing.assert_allclose(runtime.encode(x.numpy()), z.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(runtime.decode(z.numpy()), restorer.decode(z).numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(runtime.run_irn(x.numpy()), restorer.run_irn(x).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("faces,kw", [
    (2, {"mode": "irn"}),
    (1, {"mode": "prior", "sampler": "heun", "steps": 10, "sigma_start": 2.0}),
    (1, {"mode": "full", "sampler": "dpmpp_2m", "steps": 3, "fidelity": 0.2, "guidance_scale": 0.0, "irn_tone": 0,
         "samples": 2}),
    (2, {"mode": "full", "sampler": "euler", "steps": 1, "guidance_scale": 0.0, "irn_detail": 0.5,
         "irn_detail_octaves": 2}),  # the model's irn_tone 8 as well
], ids=["irn", "prior-heun10", "full-noguid-dpmpp3-2samples", "full-noguid-tone8-detail"])
def test_whole_restore_of_demo_faces_matches_torch(restorer, runtime, demo_faces, faces, kw):
    """The degraded demo face (and the clean one as a second face of the batch) with torch's start noise:
    max abs diff <= 1e-3 (measured ~1e-6) except at code near-ties of the quantizer."""
    x = to_model_range(demo_faces[:faces])
    o = restorer.options(**kw)
    ref = restorer.restore_faces(x, o)
    noise = torch.stack([torch_face_noise((faces, 3, 32, 32), o.seed, k) for k in range(o.samples)], 1).numpy()
    out = runtime.restore_faces(x.numpy(), runtime.options(**kw), noise=noise)
    assert out["restored"].shape == tuple(ref.restored.shape) == (faces, o.samples, 3, 128, 128)
    # the same codes except where a latent sits on a near-tie between two codes: float32 rounding in ONNX Runtime
    # can pick the other one, which changes a few decoded patches slightly (seen: 2 % of the pixels, at most 0.03)
    diff = np.abs(out["restored"] - ref.restored.numpy())
    assert (diff > 1e-3).mean() <= 0.05 and diff.max() <= 0.05
    assert np.abs(out["x_id"] - ref.x_id.numpy()).max() <= 1e-3
    assert (out["nfe"], out["sigma_start"]) == (ref.sampling.nfe, pytest.approx(ref.sampling.sigma_start))
    # and as the uint8 the pipeline writes: one grey level apart where a value sits on a rounding edge, a few where
    # a code tie flipped
    u8 = np.abs(to_uint8(out["restored"]).astype(int) - torch_to_uint8(ref.restored.flatten(0, 1)).numpy().reshape(
        faces, o.samples, 128, 128, 3).astype(int))
    assert (u8 > 1).mean() <= 0.05 and u8.max() <= 6


def test_restore_crops_is_independent_of_batch_size(runtime, demo_faces):
    crops = np.concatenate([demo_faces, demo_faces[:1]])
    o = runtime.options(mode="prior", steps=1, sigma_start=1.0)
    one = runtime.restore_crops(crops, RestoreOptions(**{**o.__dict__, "batch_size": 1}))
    three = runtime.restore_crops(crops, RestoreOptions(**{**o.__dict__, "batch_size": 3}))
    assert one.shape == (3, 1, 128, 128, 3) and one.dtype == np.uint8
    assert np.abs(one.astype(int) - three.astype(int)).max() <= 1
    assert not np.array_equal(one[0], one[2])  # face 0 and face 2 (same pixels) draw different noise
    assert runtime.restore_crops(crops[:0], o).shape == (0, 1, 128, 128, 3)  # no faces: no results


def test_guidance_is_torch_only_and_options_are_checked(runtime, demo_faces):
    x = to_model_range(demo_faces[:1]).numpy()
    with pytest.raises(ClrfaceError, match="torch only"):
        runtime.restore_faces(x, runtime.options(mode="full", fidelity=0.5))  # guided: torch only
    with pytest.raises(ClrfaceError, match="below the model's resolution 128 px"):
        runtime.options(irn_tone=128)
    with pytest.raises(ClrfaceError, match="below the model's resolution 128 px"):
        runtime.restore_faces(x, RestoreOptions(mode="full", guidance_scale=0.0, irn_tone=128))
    with pytest.raises(ClrfaceError, match="needs faces"):
        runtime.restore_faces(x[:, :, :64], runtime.options(mode="irn"))
    with pytest.raises(ClrfaceError, match=r"restore_crops needs uint8 \[F,128,128,3\] \(this model's resolution"):
        runtime.restore_crops(demo_faces[:1, :64, :64], runtime.options(mode="irn"))


@pytest.mark.parametrize("n_in,n_out", [(128, 8), (8, 128), (128, 64), (64, 128), (37, 5), (5, 37)])
def test_resize_matrix_is_torchs_bicubic(n_in, n_out):
    """One axis of F.interpolate(bicubic, antialiased when shrinking) as a matrix: equal in fp64 to ~1e-15."""
    x = torch.randn(1, 1, n_in, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(n_in + n_out))
    m = rt.resize_matrix(n_in, n_out)
    np.testing.assert_allclose(m @ x[0, 0].numpy() @ m.T, detail.resize(x, n_out)[0, 0].numpy(), atol=1e-12, rtol=0)


def test_tone_and_detail_match_torch():
    g = torch.Generator().manual_seed(0)
    x, src = (torch.rand(2, 3, 128, 128, generator=g) * 2 - 1 for _ in range(2))
    for t in (4, 8, 16):
        np.testing.assert_allclose(rt.lower_band_from(x.numpy(), src.numpy(), t),
                                   detail.lower_band_from(x, src, t).numpy(), atol=1e-5, rtol=0)
    for k in (1, 2, 3):
        np.testing.assert_allclose(rt.upper_band_from(x.numpy(), src.numpy(), 0.7, k),
                                   detail.upper_band_from(x, src, 0.7, k).numpy(), atol=1e-5, rtol=0)


def test_export_to_a_file_is_refused_before_exporting(tmp_path, capsys):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    assert main(["export", "onnx", "-o", str(tmp_path / "clip.mp4")]) == 1
    assert capsys.readouterr().err.strip().endswith("clip.mp4: exists and is not a folder; --output must be a folder")
    assert (tmp_path / "clip.mp4").read_bytes() == b"x"


def test_missing_runtime_json_raises(tmp_path):
    with pytest.raises(CheckpointError, match="runtime.json"):
        OnnxRestorer(tmp_path)


def test_samplers_and_schedule_match_torch_ports():
    """The numpy ports agree with clrface.diffusion on the closed-form Gaussian denoiser, in fp32."""
    sd = 0.5

    def ideal_t(x, s):
        return x * sd**2 / (sd**2 + s.view(-1, 1, 1, 1) ** 2)

    def ideal_n(x, s):
        return x * np.float32(sd**2) / (np.float32(sd**2) + s.reshape(-1, 1, 1, 1) ** 2)

    cfg = ScheduleConfig(sigma_min=0.002, sigma_max=20.0, rho=7.0)
    sched = {"sigma_min": 0.002, "sigma_max": 20.0, "rho": 7.0}
    for start, steps in ((20.0, 10), (2.0, 5), (0.001, 3), (0.0, 3), (35.0, 1)):
        np.testing.assert_allclose(rt.sigmas_from(sched, start, steps), sigmas_from(cfg, start, steps).numpy(),
                                   rtol=1e-6)
    np.testing.assert_allclose(rt.karras_sigmas(40, 0.002, 80.0), karras_sigmas(40, 0.002, 80.0).numpy(), rtol=1e-6)
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 5
    sig = karras_sigmas(6, 0.002, 5.0)
    for name in SAMPLER_NAMES:
        ref = torch_sampler.SAMPLERS[name](ideal_t, x, sig)
        out = rt.SAMPLER_FNS[name](ideal_n, x.numpy(), sig.numpy())
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)
        assert rt.nfe(name, 6) == torch_sampler.nfe(name, 6)


def test_options_and_noise_follow_the_pipeline(runtime):
    assert runtime.options(steps=3, upscale=None) == RestoreOptions(**{**runtime.defaults, "steps": 3})
    with pytest.raises(ClrfaceError):
        runtime.options(sampler="ddim")
    # per-face generators: face 3 of a batch of 4 is face 0 of a batch starting at index 3
    a, b = face_noise((4, 3, 8, 8), 7, 1), face_noise((1, 3, 8, 8), 7, 1, first_index=3)
    np.testing.assert_array_equal(a[3], b[0])
    assert a.dtype == np.float32 and abs(float(a.std()) - 1) < 0.1 and not math.isclose(a[0, 0, 0, 0], a[1, 0, 0, 0])


def test_onnx_runtime_imports_without_torch():
    code = "import clrface.onnx_runtime, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_legacy_torchscript_exporter_agrees(tmp_path, restorer):
    mods = graph_modules(restorer.vqgan, restorer.prior, restorer.irn)
    for name, (module, args) in mods.items():
        path = export_graph(module, args, tmp_path / f"{name}.onnx", *GRAPH_IO[name], dynamo=False)
        a3 = tuple(torch.cat([a, a[:1]]) for a in args)
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {n: a.numpy() for n, a in zip(GRAPH_IO[name][0], a3)})[0]
        with torch.no_grad():
            assert np.abs(out - module(*a3).numpy()).max() <= 1e-4, name
