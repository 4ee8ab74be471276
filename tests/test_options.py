"""The torch-free option names stay in step with the torch modules that implement them."""

import argparse
import subprocess
import sys

import pytest

from clrface.device import DTYPES
from clrface.diffusion.sampler import SAMPLERS
from clrface.errors import ClrfaceError
from clrface.options import DTYPE_NAMES, SAMPLER_NAMES, FidelityMap, RestoreOptions, unit_float, unused_options


def test_names_match_the_implementations():
    assert SAMPLER_NAMES == tuple(SAMPLERS)
    assert DTYPE_NAMES == tuple(DTYPES)


def test_resolve_takes_explicit_values_else_the_fidelity_map():
    fm = FidelityMap(sigma_start_at_0=8.0, sigma_start_at_1=0.5, guidance_at_0=1.0, guidance_at_1=3.0)
    assert RestoreOptions(fidelity=0.5).resolve(fm) == pytest.approx((2.0, 2.0))  # sqrt(8 * 0.5), (1 + 3) / 2
    assert RestoreOptions(fidelity=0.5, sigma_start=0.1, guidance_scale=0.0).resolve(fm) == (0.1, 0.0)


def test_options_and_restorer_imports():
    """options imports without torch; the restorer imports neither the training code nor accelerate."""
    code = ("import sys, clrface.options; assert 'torch' not in sys.modules; import clrface.restorer, clrface.batch; "
            "bad = [m for m in sys.modules if m.startswith(('clrface.train', 'accelerate'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_for_model_merges_defaults_and_checks_against_the_resolution():
    o = RestoreOptions.for_model({"mode": "irn", "irn_tone": 8, "steps": 3}, 128, steps=None, irn_tone=16)
    assert (o.mode, o.steps, o.irn_tone) == ("irn", 3, 16)  # None leaves the default, a value replaces it
    assert RestoreOptions(irn_tone=127).check_for(128).irn_tone == 127
    with pytest.raises(ClrfaceError, match="irn_tone 32 px must be below the model's resolution 32 px"):
        RestoreOptions.for_model({}, 32, irn_tone=32)


def test_several_samples_need_a_mode_that_samples():
    assert RestoreOptions(samples=3, mode="prior").samples == 3
    for mode in ("irn", "direct"):
        with pytest.raises(ClrfaceError, match=f"samples 2: mode {mode} gives one result per face"):
            RestoreOptions(samples=2, mode=mode)
    with pytest.raises(ClrfaceError, match="^batch_size must be >= 1, got 0$"):
        RestoreOptions(batch_size=0)


def test_unused_options_name_the_modes_that_read_them():
    assert unused_options("irn", ["fidelity", "irn_detail", "upscale"]) == (
        "mode irn does not use fidelity (read in modes full and prior); irn_detail (read in mode full): without "
        "effect here")
    assert unused_options("prior", ["seed", "guidance_scale"]) == (
        "mode prior does not use guidance_scale (read in mode full): without effect here")
    assert unused_options("prior", ["seed"]) is None and unused_options("full", ["fidelity", "irn_tone"]) is None
    assert unused_options("direct", ["max_faces"]) is None


def test_unit_float_is_a_share():
    assert unit_float("0") == 0.0 and unit_float("1") == 1.0 and unit_float("0.25") == 0.25
    for bad in ("1.01", "-0.1", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            unit_float(bad)
