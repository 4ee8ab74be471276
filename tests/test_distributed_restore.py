"""Sharded, resumable folder restore (`accelerate launch -m clrface restore ...`)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clrface.batch import DONE_DIR, restore_files


def _crops(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"face{i:02d}.png")
    return sorted(folder.glob("*.png"))


def _outputs(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))


def test_two_shards_write_each_output_once_and_rank0_reports_all(tmp_path, restorer):
    inputs = _crops(tmp_path / "in", 5)
    out = tmp_path / "out"
    o = restorer.options(steps=1, mode="prior")
    quiet = dict(aligned=True, progress=False, log=lambda s: None)
    r1 = restore_files(inputs, out, restorer, o, rank=1, world=2, **quiet)  # rank 1 first: rank 0 merges after it
    assert [Path(r["input"]).name for r in r1["images"]] == ["face01.png", "face03.png"]
    assert not (out / "report.json").exists()  # only rank 0 writes the report
    r0 = restore_files(inputs, out, restorer, o, rank=0, world=2, **quiet)
    assert [Path(r["input"]).name for r in r0["images"]] == [p.name for p in inputs]
    assert json.loads((out / "report.json").read_text())["processes"] == 2
    assert _outputs(out) == sorted(f"{d}/face{i:02d}{s}.png" for i in range(5)
                                   for d, s in (("final", ""), ("cropped_faces", "_0"), ("restored_faces", "_0"),
                                                ("cmp", "_0")))


def test_rerun_skips_finished_inputs_unless_options_change(tmp_path, restorer):
    inputs = _crops(tmp_path / "in", 4)
    out = tmp_path / "out"
    o = restorer.options(steps=1, mode="prior")
    quiet = dict(aligned=True, progress=False, log=lambda s: None)
    first = restore_files(inputs, out, restorer, o, **quiet)
    assert first["skipped"] == 0 and len(first["images"]) == 4
    (out / DONE_DIR / "face02.done.json").unlink()  # as if killed while face02 was being written
    t = (out / "final" / "face00.png").stat().st_mtime_ns
    again = restore_files(inputs, out, restorer, o, **quiet)
    assert again["skipped"] == 3 and len(again["images"]) == 4
    assert (out / "final" / "face00.png").stat().st_mtime_ns == t  # untouched
    other = restore_files(inputs, out, restorer, restorer.options(steps=2, mode="prior"), **quiet)
    assert other["skipped"] == 0  # different options: earlier results are not reused
    forced = restore_files(inputs, out, restorer, restorer.options(steps=2, mode="prior"), overwrite=True, **quiet)
    assert forced["skipped"] == 0 and len(forced["images"]) == 4


def _descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (Linux /proc): torchrun starts its workers in sessions of their own, so a
    signal to the launcher's process group does not reach them."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def _settled_count(done: Path, quiet_s: float = 3.0, limit_s: float = 120.0) -> int:
    """Completion records in ``done`` once none has been added for ``quiet_s`` (a killed process may still be
    finishing the write of its last record)."""
    n, t_last, t_end = -1, time.time(), time.time() + limit_s
    while time.time() < t_end:
        m = len(list(done.glob("*.done.json")))
        if m != n:
            n, t_last = m, time.time()
        elif time.time() - t_last >= quiet_s:
            break
        time.sleep(0.2)
    return n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model_dir: Path, src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --multi_gpu selects the torchrun launcher; without GPUs it runs CPU processes (gloo), one per shard. A free
    # port of its own: the default 29500 may still be held by the previous multi-process test's rendezvous.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no",
           "-m", "clrface", "restore", str(src), "-o", str(out), "--aligned", "--model", str(model_dir),
           "--mode", "prior", "--steps", "100"]  # ~0.3 s per crop: the kill lands mid-run
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_every_output_exactly_once(tmp_path, model_dir):
    inputs = _crops(tmp_path / "in", 24)
    out = tmp_path / "out"
    proc = _launch(model_dir, tmp_path / "in", out)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list((out / DONE_DIR).glob("*.done.json"))) < 3:
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.fail(f"the first run ended (rc {proc.returncode}) before it could be killed, so resuming was not "
                    f"tested:\n{proc.communicate()[0][-3000:]}")
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and its workers, as a crash or `kill -9` would
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    n_first = _settled_count(out / DONE_DIR)
    proc = _launch(model_dir, tmp_path / "in", out)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and len(report["images"]) == 24 and not report["failures"]
    assert 0 < report["skipped"] == n_first < 24, log
    names = [Path(r["input"]).name for r in report["images"]]
    assert names == [p.name for p in inputs]
    assert len(list((out / "final").glob("*.png"))) == 24 and len(list((out / "restored_faces").glob("*.png"))) == 24
    assert "by 2 processes" in log
