"""The GPU call's experiment stage rehearsed on a CPU: the GPU plan shrunk, its highest-priority arms run (NA, then
MCLDef and the control on that model), each archived without checkpoints; unpacked as results they are skipped by
the next call and assemble into the plan's table."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "configs" / "experiment" / "na_cifar10_gpu.yaml"


def gpu_arms(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_arms.py"), "--plan", str(PLAN), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


@pytest.mark.slow
def test_gpu_call_runs_the_first_arms_of_the_plan_and_archives_them(tmp_path, make_shards):
    folder = tmp_path / "cifar"
    make_shards(n=200, per_shard=100, classes=10, prefix="train", folder=folder)
    make_shards(n=100, per_shard=100, classes=10, prefix="test", folder=folder)
    work, out, results = tmp_path / "work", tmp_path / "out", tmp_path / "results"
    common = ["--work", str(work), "--data", str(folder), "--results", str(results), "--shrink"]
    done = gpu_arms("--seconds", "900", "--out", str(out), "--max-arms", "3", "--epoch-s", "1", *common)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "seed0/simclr-na" in done.stdout.split("===")[0]  # the estimates come before anything runs
    archives = sorted(p.name for p in out.glob("*.tar.gz"))
    expected = ["arm-seed0_finetune.tar.gz", "arm-seed0_mcldef.tar.gz", "arm-seed0_simclr-na.tar.gz"]
    assert archives == expected, done.stdout[-6000:] + done.stderr[-3000:]
    for archive in out.glob("*.tar.gz"):
        with tarfile.open(archive) as opened:
            names = opened.getnames()
            assert not any(n.endswith(".ckpt") for n in names)
            opened.extractall(results)
    assert {"provenance.json", "eval.json", "experiment_command.json", "poison_summary.json"} <= {
        p.name for p in (results / "seed0" / "simclr-na").iterdir()
    }
    report = json.loads((results / "seed0" / "mcldef" / "defense_metrics.json").read_text())
    assert report["defense"] == "mcldef"
    assert json.loads((results / "seed0" / "finetune" / "defense_metrics.json").read_text())["defense"] == "finetune"
    # The next call skips what results/ holds and starts with the next arm of the priority list.
    again = gpu_arms("--seconds", "900", "--out", str(tmp_path / "out2"), "--schedule-only", *common)
    assert again.returncode == 0, again.stderr
    assert "3 already in" in again.stdout
    pending = [line.split()[0] for line in again.stdout.splitlines() if line.startswith("  seed")]
    assert pending[0] == "seed0/simclr-clean" and "seed0/simclr-na" not in pending
    # The shrunk plan's table, assembled from the unpacked archives alone.
    table_dir = tmp_path / "table"
    assembled = subprocess.run(
        [
            sys.executable,
            "-m",
            "clbd",
            "experiment",
            "--config",
            str(work / PLAN.name),
            "--out",
            str(table_dir),
            "--assemble",
            "--from",
            str(results),
        ],
        capture_output=True,
        text=True,
        cwd=work / "tree",
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert assembled.returncode == 0, assembled.stderr[-3000:]
    table = json.loads((table_dir / "table.json").read_text())
    rows = {row["name"]: row for row in table["rows"]}
    assert rows["simclr + na"]["seeds"] == [0] and rows["mcldef"]["seeds"] == [0] and rows["finetune"]["seeds"] == [0]
    assert rows["simclr + na"]["devices"][0].startswith("cpu")
    assert "seed0/simclr-clean" in table["missing"]
