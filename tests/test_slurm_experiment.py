"""slurm/experiment.sh on the local SLURM cluster: a smoke plan's pending arms as job arrays (the pretrainings, then
the defense after its poisoned model), and the job that assembles the table; a second submission sends only what is
left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.slurm.fixtures import SlurmCluster, job_log
from tests.test_experiment import clip_overrides, write_attack

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[1]
SBATCH = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def smoke_plan(tmp_path: Path, shards: Path) -> Path:
    attack = write_attack(tmp_path / "attack.yaml", "poisoning.BadNet", target_class="class1", rate=0.3, trigger_size=6)
    common = clip_overrides(shards)
    plan = {
        "seeds": [0],
        "common": common,
        "pretrain": {"configs": ["configs/smoke/clip_shapes.yaml", attack]},
        "clean_reference": True,
        "defense_budget": {"steps": 1, "batch_size": 16},
        "defenses": {
            "finetune": {
                "configs": ["configs/defense/cleanclip.yaml"],
                "overrides": ["--model.init_args.lambda_unimodal=0.0"],
            }
        },
    }
    path = tmp_path / "smoke_plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def submit(plan: Path, out: Path) -> tuple[list[int], int, str]:
    done = subprocess.run(
        [
            "bash",
            str(REPO_ROOT / "slurm" / "experiment.sh"),
            str(plan),
            str(out),
            *SBATCH,
            f"--output={out}/%x-%A_%a.out",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CLBD_PYTHON": sys.executable},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    arrays = [int(j) for j in re.findall(r"submitted job array (\d+)", done.stdout)]
    table_job = int(re.search(r"submitted job (\d+): the table", done.stdout).group(1))
    return arrays, table_job, done.stdout


def test_experiment_arms_run_as_job_arrays_and_the_table_is_assembled(
    slurm_cluster: SlurmCluster, tmp_path, make_shards
):
    shards = make_shards(n=64, per_shard=32, captions=True)
    plan = smoke_plan(tmp_path, shards)
    out = tmp_path / "out"
    arrays, table_job, printed = submit(plan, out)
    assert len(arrays) == 2, printed  # the pretrainings, then the defense after its poisoned model
    assert "2 arm(s) of stage-0" in printed and "seed0/clean seed0/poisoned" in printed
    assert "1 arm(s) of stage-1" in printed and "seed0/finetune" in printed
    result = slurm_cluster.wait(table_job, timeout=600)
    logs = "\n".join(job_log(p) for p in sorted(out.glob("*.out")))
    assert result.completed, (result, logs[-6000:])
    table = json.loads((out / "table.json").read_text())
    assert [row["name"] for row in table["rows"]] == ["clean reference", "poisoned (no defense)", "finetune"]
    assert all(row["seeds"] == [0] for row in table["rows"]) and table["missing"] == []
    assert f"arm seed0/finetune of {plan} (task 0 of array {arrays[1]})" in logs
    for arm in ("clean", "poisoned", "finetune"):
        assert json.loads((out / "seed0" / arm / "provenance.json").read_text())["device"].startswith("cpu")
    # Everything is finished: a second submission sends no array, only the table.
    arrays, table_job, printed = submit(plan, out)
    assert arrays == [] and "every arm of" in printed
    assert slurm_cluster.wait(table_job, timeout=300).completed
