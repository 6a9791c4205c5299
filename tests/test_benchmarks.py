"""Every benchmark's quick mode runs in CI, so a benchmark that no longer runs is seen the day it breaks.

Each runs as a user runs it (a subprocess), on generated images (``--data`` / ``--coco`` point nowhere) with sizes cut
below its own quick mode so that all of them together take about a minute on 2 cores. Checked: exit 0 and the lines
that carry its result (verdicts, ratios); never its timings. ``gpu_throughput.py``'s CPU rehearsal is
``tests/test_gpu_check.py`` (it runs ``gpu_check.sh``, which runs it with ``--device cpu --quick``); its real run
needs CUDA (``gpu``). ``linear_probe.py`` needs a trained checkpoint and has no quick mode.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NO_DATA = ["--data", "/nonexistent/cifar10-jpg.tar.gz", "--coco", "/nonexistent/coco-mini.tar.gz"]

# benchmark -> (arguments beyond --quick, result lines that must appear)
QUICK_MODES = {
    "data_pipeline": (
        ["--repeats", "1", "--samples", "256", "--workers", "0", "--skip", "clip-vit-b-32", "rss"],
        [
            r"^verdict SimCLR 32 px, 2 views, 0 workers: clbd/bare = [\d.]+ wall, [\d.]+ CPU .* -> cpu \w+ / wall \w+$",
            r"^verdict CLIP clip-tiny-vit 32 px, 0 workers: clbd/bare = ",
            r"^tar reads in one pass of one clbd stream \(no workers\): (\d+) raw samples read to deliver (\d+) of",
        ],
    ),
    "poisoning": (
        ["--repeats", "1", "--samples", "256", "--workers", "0", "--skip", "clip-vit-b-32"],
        [
            r"^verdict SimCLR 32 px, NA 1%, 0 workers: poisoned/clean = [\d.]+ CPU, [\d.]+ wall .* -> cpu \w+ / wall",
            r"^verdict CLIP clip-tiny-vit 32 px, BadNet 100%, 0 workers: poisoned/clean = ",
        ],
    ),
    "device_views": (
        ["--repeats", "1", "--images", "256", "--photos", "16"],
        [r"^  SimCLR 32 px, 256 CIFAR-10 images, 2 views: device/per-sample [\d.]+ ", r"^  CLIP 224 px, 16 photos"],
    ),
    "resident_data": (
        ["--repeats", "1", "--images", "512"],
        [r"^\| train, views in the loader +\| cpu +\| .*\| [\d.]+ \([\d.]+\.\.[\d.]+\) +\|$", r"^\| evaluation "],
    ),
    "training_step": (
        ["--repeats", "1", "--steps", "2", "--warmup", "1"],
        [r"^verdict .*: lightning/plain = [\d.]+ CPU, [\d.]+ wall .* -> "],
    ),
}


def run_benchmark(name: str, args: list[str], tmp_path: Path) -> str:
    command = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLBD_BENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUICK_MODES))
def test_quick_mode_runs_and_reports(name, tmp_path):
    args, expected = QUICK_MODES[name]
    out = run_benchmark(name, [*NO_DATA, "--cache", str(tmp_path / "cache"), *args], tmp_path)
    for pattern in expected:
        assert re.search(pattern, out, re.MULTILINE), f"{name}: no line matching {pattern!r} in:\n{out[-3000:]}"
    if name == "data_pipeline":  # the stream's own read count: one pass reads each sample once
        read, delivered = map(int, re.search(expected[-1], out, re.MULTILINE).groups())
        assert read == delivered == 256


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_throughput_quick_mode_on_cuda(tmp_path):
    out = run_benchmark("gpu_throughput", NO_DATA, tmp_path)
    assert re.search(r"(?i)steps?/s|samples/s|images/s", out), out[-3000:]
