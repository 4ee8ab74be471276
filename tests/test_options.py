"""The torch-free option names stay in step with the torch modules that implement them."""

import subprocess
import sys

import pytest

from clrface.device import DTYPES
from clrface.diffusion.sampler import SAMPLERS
from clrface.options import DTYPE_NAMES, SAMPLER_NAMES, FidelityMap, RestoreOptions, resolve_sampling


def test_names_match_the_implementations():
    assert SAMPLER_NAMES == tuple(SAMPLERS)
    assert DTYPE_NAMES == tuple(DTYPES)


def test_resolve_sampling_is_the_options_resolve():
    fm = FidelityMap(sigma_start_at_0=8.0, sigma_start_at_1=0.5, guidance_at_0=1.0, guidance_at_1=3.0)
    assert resolve_sampling(fm, 0.5, None, None) == RestoreOptions(fidelity=0.5).resolve(fm)
    assert resolve_sampling(fm, 0.5, None, None) == pytest.approx((2.0, 2.0))
    assert resolve_sampling(fm, 0.5, 0.1, 0.0) == (0.1, 0.0)


def test_options_and_restorer_imports():
    """options imports without torch; the restorer imports neither the training code nor accelerate."""
    code = ("import sys, clrface.options; assert 'torch' not in sys.modules; import clrface.restorer, clrface.batch; "
            "bad = [m for m in sys.modules if m.startswith(('clrface.train', 'accelerate'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
