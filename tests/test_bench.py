"""The shared benchmark tooling (clrface.bench): timer, tables, row specs."""

import math

import pytest
import torch
from PIL import Image

from clrface.bench import command_line, header, load_faces, markdown_table, time_ms


def test_time_ms_is_the_median_after_the_warm_up():
    calls = []
    # clock readings: each timed run reads the clock before and after; the warm-up run is not timed
    ticks = iter([0.0, 0.030, 1.0, 1.001, 2.0, 2.002])

    ms = time_ms(lambda: calls.append(1), 3, clock=lambda: next(ticks))
    assert len(calls) == 4  # one warm-up + three timed runs
    assert ms == pytest.approx(2.0)  # runs of 30, 1 and 2 ms: median 2 ms


def test_markdown_table_formats_floats_and_nan():
    table = markdown_table(["row", "a", "b"], [("x", 1.25, float("nan")), ("y", 2, "z")], fmt=".1f")
    assert table.splitlines() == ["| row | a | b |", "|---|---:|---:|", "| x | 1.2 | — |", "| y | 2 | z |"]


def test_header_names_machine_and_command():
    h = header("cpu", 3, command_line(["--x", "a b"], "benchmarks/s.py"))
    assert "torch threads 3" in h and f"torch {torch.__version__}" in h
    assert h.endswith("command: `python benchmarks/s.py --x 'a b'`")


def test_load_faces_is_in_model_range(tmp_path):
    for i, v in enumerate((0, 255)):
        Image.new("RGB", (8, 8), (v, v, v)).save(tmp_path / f"{i}.png")
    x = load_faces(tmp_path)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert math.isclose(float(x[0].max()), -1.0) and math.isclose(float(x[1].min()), 1.0)
