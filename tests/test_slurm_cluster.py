"""Real jobs on the local single-node SLURM cluster (tests/slurm/cluster.sh): ranks, gloo, signals, requeue,
and the helpers of slurm/_common.sh."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.slurm import fixtures
from tests.slurm.fixtures import COMMON_SH, JOBS_DIR, SlurmCluster, job_log

slurm_cluster = fixtures.slurm_cluster  # the session fixture (starts the cluster when needed)

pytestmark = pytest.mark.slurm

REPO_ROOT = COMMON_SH.parents[1]


def job_env(out_dir: Path, **extra: str) -> dict[str, str]:
    return {"CLBD_ROOT": str(REPO_ROOT), "PYTHON": sys.executable, "OUT_DIR": str(out_dir), **extra}


def output_args(out_dir: Path) -> list[str]:
    return [f"--output={out_dir}/job-%j.out"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_two_srun_tasks_get_ranks_0_and_1(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.submit(JOBS_DIR / "ntasks.sbatch", env=job_env(tmp_path), sbatch_args=output_args(tmp_path))
    result = slurm_cluster.wait(job, timeout=60)
    log = job_log(tmp_path / f"job-{job}.out")
    assert result.completed, (result, log)

    bash_lines = sorted(line for line in log.splitlines() if line.startswith("bash "))
    assert bash_lines == ["bash procid=0 ntasks=2 localid=0", "bash procid=1 ntasks=2 localid=1"], log
    python_lines = sorted(line for line in log.splitlines() if line.startswith("python "))
    assert [line.rsplit(" pid=", 1)[0] for line in python_lines] == [
        "python procid=0 ntasks=2 localid=0 nodeid=0",
        "python procid=1 ntasks=2 localid=1 nodeid=0",
    ], log
    assert len({line.rsplit(" pid=", 1)[1] for line in python_lines}) == 2, "the tasks must be two processes"


def test_gloo_all_reduce_across_srun_tasks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.submit(JOBS_DIR / "allreduce.sbatch", env=job_env(tmp_path), sbatch_args=output_args(tmp_path))
    result = slurm_cluster.wait(job, timeout=120)
    log = job_log(tmp_path / f"job-{job}.out")
    assert result.completed, (result, log)

    records = [read_json(tmp_path / f"allreduce_rank{rank}.json") for rank in (0, 1)]
    expected_port = 15000 + int(str(job)[-4:])
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["local_rank"] == rank
        assert record["world_size"] == 2
        assert record["sum"] == [1.0 + 2.0, 1.0 + 10.0], "rank r adds [r + 1, 10**r]"
        assert record["master"] == f"{slurm_cluster.node}:{expected_port}"
    assert records[0]["pids"] == records[1]["pids"] and len(set(records[0]["pids"])) == 2


# Which processes get SIGUSR1 from "scancel --signal=USR1 [option]" on SLURM 22.05 with proctrack/linuxproc:
# the default signals every process of the job steps (the srun tasks, what Lightning's handler needs, and their
# children, e.g. DataLoader workers), --batch the batch shell only, --full both; each process gets it once.
PROBES = ("batch", "task0", "task1", "task0child", "task1child")
SCANCEL_DELIVERY = {
    "": {"batch": None, "task0": 1, "task1": 1, "task0child": 1, "task1child": 1},
    "--batch": {"batch": 1, "task0": None, "task1": None, "task0child": None, "task1child": None},
    "--full": {"batch": 1, "task0": 1, "task1": 1, "task0child": 1, "task1child": 1},
}


def _received(out_dir: Path) -> dict[str, int | None]:
    counts = {}
    for name in PROBES:
        path = out_dir / f"{name}.usr1"
        counts[name] = int(path.read_text()) if path.exists() else None
    return counts


def test_scancel_signal_options_reach_expected_processes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    jobs = {}
    for option in SCANCEL_DELIVERY:
        out_dir = tmp_path / (option.strip("-") or "default")
        out_dir.mkdir()
        jobs[option] = (
            slurm_cluster.submit(
                JOBS_DIR / "signal_probe.sbatch", env=job_env(out_dir), sbatch_args=output_args(out_dir)
            ),
            out_dir,
        )
    for option, (job, out_dir) in jobs.items():
        for name in PROBES[1:]:
            slurm_cluster.wait_for_file(out_dir / f"{name}.ready", job, timeout=60)
        slurm_cluster.signal(job, "USR1", batch=option == "--batch", full=option == "--full")
    for option, (job, out_dir) in jobs.items():
        result = slurm_cluster.wait(job, timeout=60)
        assert result.completed, (option, result, job_log(out_dir / f"job-{job}.out"))
        assert _received(out_dir) == SCANCEL_DELIVERY[option], f"scancel --signal=USR1 {option}"


def _records(run_dir: Path, name: str) -> dict[tuple[int, int], dict]:
    """{(restart, rank): record} of the files preemptible.py wrote."""
    found = {}
    for path in run_dir.glob(f"{name}_r*_rank*.json"):
        record = read_json(path)
        found[(record["restart"], record["rank"])] = record
    return found


# How the two preemption variants get SIGUSR1: sbatch script -> scancel --batch?
REQUEUE_VARIANTS = {"requeue_tasks.sbatch": False, "requeue_batch.sbatch": True}


def test_usr1_requeues_job_which_resumes_in_same_run_dir(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Both variants at once (each waits cred_expire + 1 = 11 s before its restart):
    requeue_tasks: SIGUSR1 to the srun tasks (scancel default / --signal=USR1@90), rank 0 checkpoints, requeues;
    requeue_batch: SIGUSR1 to the batch shell (scancel --batch / --signal=B:USR1@90), its trap requeues."""
    jobs = {}
    for script in REQUEUE_VARIANTS:
        out_dir = tmp_path / script.removesuffix(".sbatch")
        out_dir.mkdir()
        job = slurm_cluster.submit(JOBS_DIR / script, env=job_env(out_dir), sbatch_args=output_args(out_dir))
        job_name = "clbd-" + script.removesuffix(".sbatch").replace("_", "-")
        jobs[script] = (job, out_dir, out_dir / "runs" / f"{job_name}-{job}")
    for script, (job, _, run_dir) in jobs.items():
        for rank in (0, 1):
            slurm_cluster.wait_for_file(run_dir / f"ready_r0_rank{rank}", job, timeout=60)
        slurm_cluster.signal(job, "USR1", batch=REQUEUE_VARIANTS[script])

    for script, (job, out_dir, run_dir) in jobs.items():
        result = slurm_cluster.wait(job, timeout=90)
        log = job_log(out_dir / f"job-{job}.out")
        assert result.completed and result.restarts == 1, (script, result, log)

        starts = _records(run_dir, "start")
        assert sorted(starts) == [(0, 0), (0, 1), (1, 0), (1, 1)], "both ranks ran in both runs"
        assert {r["job_id"] for r in starts.values()} == {str(job)}, "a requeued job keeps its id"
        assert {r["run_dir"] for r in starts.values()} == {str(run_dir)}, "and so its run directory"
        if REQUEUE_VARIANTS[script]:
            assert (run_dir / "usr1_batch_r0.json").exists()
            assert _records(run_dir, "usr1") == {}, "with --batch the tasks never see SIGUSR1"
            assert starts[(1, 0)]["latest_ckpt"] == ""
        else:
            assert sorted(_records(run_dir, "usr1")) == [(0, 0), (0, 1)], "every task got SIGUSR1, in run 0 only"
            assert _records(run_dir, "requeue")[(0, 0)]["returncode"] == 0
            assert sorted(_records(run_dir, "sigterm")) == [(0, 0), (0, 1)], "the requeue ends the tasks (SIGTERM)"
            assert starts[(0, 0)]["latest_ckpt"] == ""
            assert starts[(1, 0)]["latest_ckpt"] == str(run_dir / "hpc_ckpt_1.ckpt"), "resumes from run 0's ckpt"
        assert "restart 0" in log and "restart 1" in log, "--open-mode=append keeps both runs' logs"


def _set_mtime(path: Path, age_s: float) -> None:
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_common_helpers_inside_a_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpts"
    (ckpt_dir / "checkpoints").mkdir(parents=True)
    older = ckpt_dir / "checkpoints" / "epoch=0-step=10.ckpt"
    newer = ckpt_dir / "hpc_ckpt_1.ckpt"
    deepspeed_dir = ckpt_dir / "checkpoints" / "epoch=1-step=20.ckpt"
    (deepspeed_dir / "checkpoint").mkdir(parents=True)
    inner = deepspeed_dir / "checkpoint" / "mp_rank_00_model_states.ckpt"
    for path in (older, newer, inner):
        path.write_bytes(b"\0")
    _set_mtime(older, 300)
    _set_mtime(newer, 100)
    _set_mtime(deepspeed_dir, 200)
    _set_mtime(inner, 10)  # newer than all, but inside a DeepSpeed checkpoint: not a checkpoint of its own
    for copies in ("consolidated", "universal"):  # clbd's fp32 / universal copies: nothing to resume from
        (ckpt_dir / copies / "last.ckpt" / "checkpoint").mkdir(parents=True)
        _set_mtime(ckpt_dir / copies / "last.ckpt", 5)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()

    job = slurm_cluster.submit(
        JOBS_DIR / "common_helpers.sbatch",
        env=job_env(tmp_path, CKPT_DIR=str(ckpt_dir), EMPTY_DIR=str(empty_dir)),
        sbatch_args=[*output_args(tmp_path), "--job-name=clbd common/helpers"],
    )
    result = slurm_cluster.wait(job, timeout=120)
    log = job_log(tmp_path / f"job-{job}.out")
    assert result.completed, (result, log)

    found = dict(line.split("=", 1) for line in (tmp_path / "common.env").read_text().splitlines())
    lightning = dict(line.split("=", 1) for line in (tmp_path / "lightning.env").read_text().splitlines())
    assert found["MASTER_ADDR"] == slurm_cluster.node
    assert found["MASTER_PORT"] == str(15000 + int(str(job)[-4:]))
    assert (found["MASTER_ADDR"], found["MASTER_PORT"]) == (lightning["MASTER_ADDR"], lightning["MASTER_PORT"])
    assert found["CLBD_RUN_DIR"] == str(tmp_path / "runs" / f"clbd_common_helpers-{job}")
    assert Path(found["CLBD_RUN_DIR"]).is_dir()
    assert found["LATEST"] == str(newer)
    assert found["LATEST_EMPTY"] == ""
    assert f"clbd: job {job} (clbd common/helpers) restart 0" in log


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, "clbd: ERROR: required variable CLBD_CONFIG is not set"),
        ("/nonexistent/pretrain.yaml", "clbd: ERROR: config file not found: /nonexistent/pretrain.yaml"),
    ],
    ids=["unset", "missing-file"],
)
def test_common_helpers_fail_the_job_with_a_clear_message(
    slurm_cluster: SlurmCluster, tmp_path: Path, config: str | None, message: str
) -> None:
    env = job_env(tmp_path)
    env["CLBD_CONFIG"] = config  # None: removed from the job's environment
    job = slurm_cluster.submit(JOBS_DIR / "requires_config.sbatch", env=env, sbatch_args=output_args(tmp_path))
    result = slurm_cluster.wait(job, timeout=60)
    log = job_log(tmp_path / f"job-{job}.out")
    assert (result.state, result.exit_code) == ("FAILED", "1:0"), (result, log)
    assert message in log
    assert "config found" not in log


@pytest.mark.slow
def test_time_limit_signal_reaches_tasks_or_batch_shell(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """sbatch --signal=USR1@N reaches the srun tasks (and their children) only, --signal=B:USR1@N the batch
    shell only.

    Jobs start with a 10 min limit and N = 60 s; once every probe is ready the limit drops to 1 min, so the
    signal is due at once (earlier it could beat the handlers: "up to 60 s early", says the man page).
    slurmctld checks time limits every 30 s, so it arrives within about 30 s.
    """
    expected = {
        "USR1@60": {"batch": None, "task0": 1, "task1": 1, "task0child": 1, "task1child": 1},
        "B:USR1@60": {"batch": 1, "task0": None, "task1": None, "task0child": None, "task1child": None},
    }
    jobs = {}
    for option in expected:
        out_dir = tmp_path / option.replace(":", "_").replace("@", "_")
        out_dir.mkdir()
        jobs[option] = (
            slurm_cluster.submit(
                JOBS_DIR / "signal_probe.sbatch",
                env=job_env(out_dir),
                sbatch_args=[*output_args(out_dir), "--time=10", f"--signal={option}"],
            ),
            out_dir,
        )
    for job, out_dir in jobs.values():
        for name in PROBES[1:]:
            slurm_cluster.wait_for_file(out_dir / f"{name}.ready", job, timeout=60)
        slurm_cluster.update(job, TimeLimit="1")
    for option, (job, out_dir) in jobs.items():
        result = slurm_cluster.wait(job, timeout=100)
        assert result.completed, (option, result, job_log(out_dir / f"job-{job}.out"))
        assert _received(out_dir) == expected[option], f"sbatch --signal={option}"


def _saves(run_dir: Path) -> list[dict]:
    path = run_dir / "saves.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_saves(run_dir: Path, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saves = [s for s in _saves(run_dir) if s["restart"] == 0]
        if len(saves) >= count:
            return saves
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {count} checkpoint saves in {run_dir} after {timeout} s: {_saves(run_dir)}")


@pytest.mark.slow
def test_lightning_auto_requeue_resumes_from_hpc_checkpoint(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Lightning's SLURMEnvironment(auto_requeue=True) on this cluster, 2-rank DDP with a DataLoader worker each.

    "guarded": workers reset the signal handlers they inherit (what clbd's data loaders must do); the job saves
    hpc_ckpt_1.ckpt from the training processes only, requeues itself and resumes at the step it saved.
    "inherited": Lightning 2.6 as is; SLURM's SIGUSR1 reaches the workers too and they run Lightning's handler,
    saving their stale model copy (global step 0) to the same hpc_ckpt_1.ckpt as the real save. Which write
    lands last is a race: in 1 of about 15 runs here the worker's won, the job resumed at step 0 and then hung.
    So that variant is cancelled once the saves are recorded.
    """
    import torch

    variants = {"guarded": {}, "inherited": {"KEEP_WORKER_HANDLERS": "1"}}
    jobs = {}
    for variant, extra_env in variants.items():
        out_dir = tmp_path / variant
        out_dir.mkdir()
        job = slurm_cluster.submit(
            JOBS_DIR / "lightning_requeue.sbatch",
            env=job_env(out_dir, NUM_WORKERS="1", **extra_env),
            sbatch_args=output_args(out_dir),
        )
        jobs[variant] = (job, out_dir, out_dir / "runs" / f"clbd-lightning-requeue-{job}")
    for job, _, run_dir in jobs.values():
        # Training (and its DataLoader worker) is under way: rank 0 finished step 3.
        slurm_cluster.wait_for_file(run_dir / "step3_r0", job, timeout=120)
        slurm_cluster.signal(job, "USR1")

    job, out_dir, run_dir = jobs["inherited"]
    saves = _wait_for_saves(run_dir, count=4, timeout=60)
    slurm_cluster.cancel(job)
    slurm_cluster.wait(job, timeout=60)
    assert sorted((s["main"], s["rank"]) for s in saves) == [(False, 0), (False, 1), (True, 0), (True, 1)], saves
    assert all(s["global_step"] == 0 for s in saves if not s["main"]), "workers save their stale copy"
    assert all(s["global_step"] > 0 for s in saves if s["main"])

    job, out_dir, run_dir = jobs["guarded"]
    result = slurm_cluster.wait(job, timeout=180)
    log = job_log(out_dir / f"job-{job}.out")
    assert result.completed and result.restarts == 1, (result, log)
    assert f"Requeued SLURM job: {job}" in log
    saves = [s for s in _saves(run_dir) if s["restart"] == 0]
    assert sorted((s["main"], s["rank"]) for s in saves) == [(True, 0), (True, 1)], "no worker saves"
    saved_step = saves[0]["global_step"]
    assert saved_step >= 3 and all(s["global_step"] == saved_step for s in saves)
    checkpoint = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == saved_step
    start = read_json(run_dir / "fit_start_r1.json")
    assert start["ckpt_path"] == str(run_dir / "hpc_ckpt_1.ckpt")
    assert start["global_step"] == saved_step, "resumed where the preempted run stopped"
    assert read_json(run_dir / "fit_end_r1.json")["global_step"] == 60
