"""The torch thread count: CPUs this process may use, less the share other processes keep busy, or --threads."""

import os

import pytest
import torch

from clrface import device
from clrface.cli import build_parser
from clrface.device import auto_threads, available_cpus, set_threads
from clrface.errors import ClrfaceError


@pytest.mark.parametrize(("cpus", "load", "machine", "expected"), [
    (8, 0.0, 8, 8),     # idle machine: every core
    (8, 1.0, 8, 7),     # one core busy elsewhere
    (2, 2.3, 2, 1),     # 2 cores, two trainings: one thread, never zero
    (2, 50.0, 64, 1),   # container of 2 on a 64-core host at load 50: 2 * (1 - 50/64) = 0.44
    (16, 10.0, 64, 14),  # 16 of 64 host cores at load 10: 16 * (1 - 10/64) = 13.5 -> 14
    (4, 0.4, 4, 4),     # light noise does not cost a thread: 3.6 -> 4
])
def test_auto_threads_subtracts_the_busy_share(cpus, load, machine, expected):
    assert auto_threads(cpus, load, machine) == expected


def no_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(device.available_cpus, "__defaults__", (tmp_path / "no-cpu.max",))


def test_auto_threads_reads_affinity_and_load(monkeypatch, tmp_path):
    no_cgroup_quota(monkeypatch, tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    assert auto_threads() == 2  # 4 CPUs, 2 of them busy
    monkeypatch.delattr(os, "getloadavg")  # Windows: no load average, all CPUs
    assert auto_threads() == 4


def test_available_cpus_honours_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # docker --cpus=1.5
    assert available_cpus(cpu_max) == 2
    cpu_max.write_text("max 100000\n")
    assert available_cpus(cpu_max) == 8
    assert available_cpus(tmp_path / "absent") == 8


def test_set_threads_forced_and_auto(monkeypatch, tmp_path):
    no_cgroup_quota(monkeypatch, tmp_path)
    before = torch.get_num_threads()
    try:
        assert set_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 2.5, 3.4))
        assert set_threads() == 1 and torch.get_num_threads() == 1
        with pytest.raises(ClrfaceError, match="--threads must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_cli_threads_flag():
    parser = build_parser()
    assert parser.parse_args(["restore", "in", "-o", "out", "--threads", "2"]).threads == 2
    assert parser.parse_args(["restore", "in", "-o", "out"]).threads is None  # auto
    assert parser.parse_args(["serve", "--threads", "1"]).threads == 1
