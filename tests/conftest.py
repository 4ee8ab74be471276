"""Fixtures of the whole suite: a tiny random restore model, and the shared data found through CLRFACE_DATA."""

from __future__ import annotations

import importlib.util
import io
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from clrface.checkpoint import save_checkpoint
from clrface.data.io import DATA_ENV, data_root
from clrface.demo import demo_image
from clrface.diffusion.prior import LatentPrior, PriorConfig
from clrface.diffusion.schedule import ScheduleConfig
from clrface.diffusion.unet import UNetConfig
from clrface.identity.guidance import LatentMask, MaskConfig
from clrface.identity.irn import IRN, IRNConfig
from clrface.restorer import Restorer
from clrface.vqgan.model import VQGAN, VQGANConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_S = 32  # tiny model resolution; latents are 3 x 8 x 8
TINY_VQ = VQGANConfig(resolution=TINY_S, base_channels=8, channel_mult=(1, 1, 2), num_res_blocks=1, codebook_size=64)
TINY_UNET = UNetConfig(resolution=TINY_S // 4, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(), head_channels=8, norm_groups=4)


def build_tiny_model(folder: Path, *, irn: bool = True, mask: bool = True) -> Path:
    """Random tiny vqgan/ prior/ irn/ mask/ checkpoints in ``folder`` (weights perturbed away from zero-init layers,
    so every stage changes its input); the same weights on every call."""
    torch.manual_seed(0)
    vq = VQGAN(TINY_VQ)
    save_checkpoint(folder / "vqgan", vq, TINY_VQ, "vqgan")
    p_cfg = PriorConfig(unet=TINY_UNET, sigma_data=1.0, latent_mean=(0.1, -0.2, 0.0), latent_std=(0.5, 1.0, 2.0),
                        schedule=ScheduleConfig(steps=4))
    prior = LatentPrior(p_cfg)
    torch.nn.init.normal_(prior.precond.net.conv_out.weight, std=0.1)  # zero-init: would make F = 0
    save_checkpoint(folder / "prior", prior, p_cfg, "prior")
    if irn:
        i_cfg = IRNConfig(channels=(8, 16), blocks=(1, 1))
        net = IRN(i_cfg)
        torch.nn.init.normal_(net.tail.weight, std=0.05)
        save_checkpoint(folder / "irn", net, i_cfg, "irn")
    if mask:
        m_cfg = MaskConfig(hidden_channels=8, num_layers=2)
        save_checkpoint(folder / "mask", LatentMask(m_cfg), m_cfg, "mask")
    return folder


@pytest.fixture(scope="session")
def tiny_model_builder() -> Callable[..., Path]:
    """:func:`build_tiny_model`, for tests that need their own copy or variant (no irn/, no mask/)."""
    return build_tiny_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """One tiny model folder for the session; tests must not write into it."""
    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def restorer(model_dir) -> Restorer:
    torch.set_num_threads(1)
    return Restorer.from_pretrained(model_dir)


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (registered in sys.modules: its dataclasses resolve their
    annotations through it)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], ModuleType]:
    """``benchmark_script("real_world")``: a benchmark script loaded as a module."""
    return load_benchmark


@pytest.fixture(scope="session")
def demo_upload() -> bytes:
    """The demo portrait degraded as a phone would: 512 -> 256 px bicubic, JPEG q30 (dlib still finds the face)."""
    buf = io.BytesIO()
    Image.fromarray(demo_image()).resize((256, 256), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=30)
    return buf.getvalue()


def shared_path(*parts: str) -> Path:
    """A path under the shared data folder (``clrface.data.io.data_root``)."""
    return data_root().joinpath(*parts)


def missing_data_reason(path: Path) -> str:
    return f"shared data {path} not found (set {DATA_ENV} to the data folder; default ../shared/data)"


@pytest.fixture(scope="session")
def shared_data() -> Callable[..., Path]:
    """``shared_data("faces128", "val")``: the path under the shared data folder, or a skip naming it."""

    def get(*parts: str) -> Path:
        path = shared_path(*parts)
        if not path.exists():
            pytest.skip(missing_data_reason(path))
        return path

    return get
