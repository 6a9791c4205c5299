"""The real job scripts of slurm/ on the local SLURM cluster (tests/slurm/cluster.sh), on CPU.

slurm/pretrain_cc3m.sh runs as written; only data changes: sbatch options shrink the allocation to one node with
two tasks and no GPU (command-line options override the #SBATCH lines), configs/smoke/clip_cc3m_cpu.yaml (given as
an override after the script) turns the run into a tiny CLIP on CPU with gloo, and the shards are tiny CC3M-format
img2dataset output indexed with `clbd data img2dataset`. Checked: a whole run, a preemption (SIGUSR1 -> Lightning's
hpc checkpoint -> requeue -> resume), a requeue without that checkpoint (resume from checkpoints/), a finished run
never started over, bad input ending the job before anything starts, and slurm/evaluate.sh on the finished run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from clbd import data as data_cli
from datamodules.shards import ShardSink
from tests.slurm.fixtures import JobResult, SlurmCluster, job_log

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO_ROOT / "slurm"
SMOKE_CONFIG = REPO_ROOT / "configs" / "smoke" / "clip_cc3m_cpu.yaml"
MAX_STEPS = yaml.safe_load(SMOKE_CONFIG.read_text())["trainer"]["max_steps"]
# One node, two tasks (ranks), no GPU: overrides the scripts' production #SBATCH lines.
CPU_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
CPU_ONE_TASK = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
PAUSE = "--trainer.callbacks+=tests.slurm.callbacks.PauseForPreemption"
# Variables a developer's shell may hold that would change what the scripts do.
SCRIPT_VARIABLES = ("CC3M_TRAIN", "CC3M_VAL", "CLBD_RUN_DIR", "CLBD_RUNS", "CLBD_STRATEGY", "CIFAR10_SHARDS")

SHARDS, PER_SHARD = 4, 16  # 64 pairs: 8 steps per epoch at the smoke config's global batch of 8


def write_img2dataset_output(folder: Path) -> None:
    """What img2dataset writes for CC3M (--output_format webdataset): NNNNN.tar with key.jpg / key.txt / key.json,
    and NNNNN_stats.json beside each tar."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard in range(SHARDS):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(PER_SHARD):
                key = f"{shard:05d}{i:04d}"
                pixels = rng.integers(0, 256, size=(40 + i, 48, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
                meta = {"url": f"https://example.org/{key}.jpg", "key": key, "status": "success", "caption": ""}
                caption = f"a photo of thing {i} in collection {shard}"
                sink.write({"__key__": key, "jpg": buffer.getvalue(), "txt": caption, "json": json.dumps(meta)})
        stats = {"count": PER_SHARD, "successes": PER_SHARD, "failed_to_download": 0, "failed_to_resize": 0}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))


@pytest.fixture(scope="module")
def cc3m_shards(tmp_path_factory) -> Path:
    """Tiny CC3M in img2dataset's layout, indexed in place by `clbd data img2dataset` (the CC3M preparation path)."""
    folder = tmp_path_factory.mktemp("cc3m") / "cc3m"
    write_img2dataset_output(folder)
    assert data_cli.main(["img2dataset", "--src", str(folder), "--quiet"]) == 0
    index = folder / "train.index.json"
    assert json.loads(index.read_text())["total"] == SHARDS * PER_SHARD
    return index


@dataclass
class Job:
    job_id: int
    run_dir: Path
    log_path: Path

    def log(self) -> str:
        return job_log(self.log_path)


def submit_script(
    cluster: SlurmCluster,
    out: Path,
    script: str,
    *args: str,
    layout: list[str],
    env: dict[str, str | None] | None = None,
    job_name: str | None = None,
) -> Job:
    """sbatch the real slurm/<script> from `out`, runs in out/runs, the log in out/<job name>-<job id>.out."""
    out.mkdir(parents=True, exist_ok=True)
    job_env: dict[str, str | None] = {name: None for name in SCRIPT_VARIABLES}
    job_env.update({"CLBD_ROOT": str(REPO_ROOT), "CLBD_PYTHON": sys.executable, "CLBD_RUNS": str(out / "runs")})
    job_env.update(env or {})
    name = job_name or script.removesuffix(".sh").replace("_", "-")
    job_id = cluster.submit(
        SLURM_DIR / script,
        *args,
        env=job_env,
        sbatch_args=[*layout, f"--job-name={name}", f"--output={out}/%x-%j.out"],
        cwd=out,
    )
    return Job(job_id, out / "runs" / f"{name}-{job_id}", out / f"{name}-{job_id}.out")


def submit_cc3m(cluster: SlurmCluster, out: Path, shards: Path, *overrides: str, **env: str | None) -> Job:
    """slurm/pretrain_cc3m.sh on 2 CPU tasks with the smoke config, CC3M_TRAIN=shards unless env says otherwise."""
    job_env: dict[str, str | None] = {"CC3M_TRAIN": str(shards), **env}
    return submit_script(
        cluster,
        out,
        "pretrain_cc3m.sh",
        "--config",
        str(SMOKE_CONFIG),
        *overrides,
        layout=CPU_TASKS,
        env=job_env,
        job_name="clip-cc3m",
    )


def assert_completed(result: JobResult, job: Job, restarts: int) -> None:
    assert result.completed and result.restarts == restarts, (result, job.log()[-6000:])


def assert_failed(result: JobResult, job: Job) -> str:
    log = job.log()
    assert (result.state, result.exit_code) == ("FAILED", "1:0"), (result, log[-6000:])
    return log


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def logged_steps(run_dir: Path) -> list[int]:
    """Steps of metrics.csv's per-step training rows, in file order."""
    with open(run_dir / "metrics.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss_step")]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under folder (links not followed): content hash and mtime."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(folder))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mtime_ns,
            )
    return found


def requeue(job_id: int) -> None:
    """What a node failure or an admin does: `scontrol requeue` (SIGTERM to the job; no SIGUSR1 first)."""
    proc = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def reference(slurm_cluster: SlurmCluster, cc3m_shards: Path, tmp_path_factory) -> Callable[[], Job]:
    """An uninterrupted run, submitted at once (it runs beside the next tests' jobs); calling it waits for it."""
    job = submit_cc3m(slurm_cluster, tmp_path_factory.mktemp("reference"), cc3m_shards)
    done: list[Job] = []

    def finished() -> Job:
        if not done:
            assert_completed(slurm_cluster.wait(job.job_id, timeout=300), job, restarts=0)
            done.append(job)
        return job

    return finished


def assert_same_final_model(run_dir: Path, reference_dir: Path) -> None:
    ours, theirs = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (run_dir, reference_dir))
    assert ours["global_step"] == theirs["global_step"] == MAX_STEPS
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for name, tensor in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], tensor), f"{name} differs from the uninterrupted run"
    assert ours["clbd_counters"] == theirs["clbd_counters"]


def test_cc3m_script_trains_on_two_gloo_tasks(reference: Callable[[], Job]) -> None:
    job = reference()
    log, run_dir = job.log(), job.run_dir
    assert f"clbd: job {job.job_id} (clip-cc3m) restart 0 on " in log and "1 node(s), 2 task(s)" in log
    assert "--trainer.num_nodes=1 --trainer.devices=2" in log
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["default_root_dir"] == str(run_dir), "runs/<job name>-<job id>"
    assert (config["trainer"]["num_nodes"], str(config["trainer"]["devices"])) == (1, "2")  # "2": a CLI string
    assert (config["trainer"]["accelerator"], config["trainer"]["strategy"]) == ("cpu", "ddp")
    assert config["model"]["init_args"]["model_name"] == "clip-tiny-vit"
    assert config["data"]["init_args"]["train_shards"].endswith("cc3m/train.index.json")
    assert json.loads((run_dir / "fit_finished.json").read_text())["global_step"] == MAX_STEPS
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == MAX_STEPS
    assert logged_steps(run_dir) == list(range(MAX_STEPS))
    assert (run_dir / f"slurm-{job.job_id}.out").resolve() == job.log_path.resolve()
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_from_its_hpc_checkpoint(
    slurm_cluster: SlurmCluster, cc3m_shards: Path, reference: Callable[[], Job], tmp_path: Path
) -> None:
    """SIGUSR1 to the tasks (what --signal=USR1@90 sends before the time limit, or a preemption): Lightning saves
    hpc_ckpt_1.ckpt and requeues; the same job id restarts, the script resumes from that file."""
    pause_at = 10  # mid-epoch (8 steps per epoch), after the step-6 checkpoint: the hpc file is the newest
    job = submit_cc3m(slurm_cluster, tmp_path, cc3m_shards, PAUSE, f"--trainer.callbacks.step={pause_at}")
    slurm_cluster.wait_for_file(job.run_dir / f"paused_r0_step{pause_at}", job.job_id, timeout=240)
    slurm_cluster.signal(job.job_id, "USR1")
    result = slurm_cluster.wait(job.job_id, timeout=300)
    assert_completed(result, job, restarts=1)

    log, run_dir = job.log(), job.run_dir
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert load_checkpoint(hpc)["global_step"] == pause_at
    assert f"Requeued SLURM job: {job.job_id}" in log
    first, second = log.split(f"clbd: job {job.job_id} (clip-cc3m) restart 1 on ")  # --open-mode=append
    assert "Restoring states" not in first
    assert f"clbd: resuming from {hpc} (the newest checkpoint" in first + second
    assert f"Restored all states from the checkpoint at {hpc}" in second
    assert sorted(p.name for p in run_dir.glob("started_*")) == ["started_r0_step0", f"started_r1_step{pause_at}"]
    assert json.loads((run_dir / "fit_finished.json").read_text())["global_step"] == MAX_STEPS
    assert_same_final_model(run_dir, reference().run_dir)
    # metrics.csv continues across the requeue: every step once, in order. Lightning writes a step's row after
    # on_train_batch_end, where the pause (like a signal) came, so the row of the interrupted step may be lost.
    steps = logged_steps(run_dir)
    assert steps == sorted(set(steps)) and set(range(MAX_STEPS)) - set(steps) <= {pause_at - 1}, steps


@pytest.mark.slow
def test_requeue_without_hpc_checkpoint_resumes_from_the_newest_checkpoint(
    slurm_cluster: SlurmCluster, cc3m_shards: Path, reference: Callable[[], Job], tmp_path: Path
) -> None:
    """A requeue with no SIGUSR1 first (node failure, scontrol requeue): no hpc file, so the restarted job resumes
    from checkpoints/ (saved every 6 steps): step 12, one step before the run was ended."""
    job = submit_cc3m(slurm_cluster, tmp_path, cc3m_shards, PAUSE, "--trainer.callbacks.step=13")
    slurm_cluster.wait_for_file(job.run_dir / "paused_r0_step13", job.job_id, timeout=240)
    requeue(job.job_id)
    result = slurm_cluster.wait(job.job_id, timeout=300)
    assert_completed(result, job, restarts=1)

    log, run_dir = job.log(), job.run_dir
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))
    restored = [
        line.rsplit(" ", 1)[-1] for line in log.splitlines() if "Restored all states from the checkpoint" in line
    ]
    assert len(restored) == 1 and Path(restored[0]).parent == run_dir / "checkpoints", log[-4000:]
    assert f"clbd: resuming from {restored[0]}" in log
    assert sorted(p.name for p in run_dir.glob("started_*")) == ["started_r0_step0", "started_r1_step12"]
    assert_same_final_model(run_dir, reference().run_dir)
    assert logged_steps(run_dir) == list(range(MAX_STEPS)), "step 12 logged again, once"


def keys_seen(folder: Path) -> list[dict]:
    """tests.callbacks.RecordKeys' rows (step, epoch, keys) of every rank."""
    return [json.loads(line) for file in sorted(folder.glob("rank*.jsonl")) for line in file.read_text().splitlines()]


@pytest.mark.slow
def test_run_resumed_on_another_task_count_takes_each_sample_once(
    slurm_cluster: SlurmCluster, cc3m_shards: Path, tmp_path: Path
) -> None:
    """A job on 2 tasks ended mid-epoch (scancel while held after step 7; checkpoints at step 6) and resumed on an
    allocation of 1 task (a new job with CLBD_RUN_DIR, as after losing half the GPUs): the script says the
    checkpoint was written by 2 ranks, the rest of epoch 0 goes to the one rank, and over that epoch every pair is
    trained on exactly once; epoch 1 is a fresh one-rank epoch and the run ends at the configured step."""

    def record(folder: str) -> list[str]:
        return ["--trainer.callbacks+=tests.callbacks.RecordKeys", f"--trainer.callbacks.folder={tmp_path / folder}"]

    first = submit_cc3m(
        slurm_cluster, tmp_path / "two", cc3m_shards, PAUSE, "--trainer.callbacks.step=7", *record("k2")
    )
    slurm_cluster.wait_for_file(first.run_dir / "paused_r0_step7", first.job_id, timeout=240)
    slurm_cluster.cancel(first.job_id)
    slurm_cluster.wait(first.job_id, timeout=60)
    assert not list(first.run_dir.glob("hpc_ckpt_*.ckpt")) and not (first.run_dir / "fit_finished.json").exists()

    env = {"CC3M_TRAIN": str(cc3m_shards), "CLBD_RUN_DIR": str(first.run_dir)}
    overrides = ["--config", str(SMOKE_CONFIG), *record("k1")]
    second = submit_script(
        slurm_cluster, tmp_path / "one", "pretrain_cc3m.sh", *overrides, layout=CPU_ONE_TASK, env=env
    )
    assert_completed(slurm_cluster.wait(second.job_id, timeout=300), second, restarts=0)
    log = second.log()
    assert "1 node(s), 1 task(s)" in log
    assert "was written by 2 rank(s); this job has 1 task(s)" in log and "resuming on another number of ranks" in log
    assert "resuming on another number of ranks (checkpoint: 2)" in log, log[-4000:]  # clbd's own line

    before = [row for row in keys_seen(tmp_path / "k2") if row["step"] <= 6]  # the checkpoint is step 6's
    after = keys_seen(tmp_path / "k1")
    epoch0 = Counter(k for row in before + [r for r in after if r["epoch"] == 0] for k in row["keys"])
    epoch1 = Counter(k for row in after if row["epoch"] == 1 for k in row["keys"])
    assert len(epoch0) == SHARDS * PER_SHARD and set(epoch0.values()) == {1}, "each pair once, none lost"
    assert set(epoch1) == set(epoch0) and set(epoch1.values()) == {1}
    assert min(r["step"] for r in after) == 7 and max(r["step"] for r in after) == MAX_STEPS
    assert json.loads((first.run_dir / "fit_finished.json").read_text())["global_step"] == MAX_STEPS


def test_finished_run_is_never_started_over(
    slurm_cluster: SlurmCluster, cc3m_shards: Path, reference: Callable[[], Job], tmp_path: Path
) -> None:
    """Requeueing the finished job (same run directory), and a new job pointed at that run with CLBD_RUN_DIR, both
    fail before anything starts; every file of the run keeps its bytes and mtime."""
    job = reference()
    before = snapshot(job.run_dir)
    requeue(job.job_id)
    by_hand = submit_cc3m(slurm_cluster, tmp_path, cc3m_shards, CLBD_RUN_DIR=str(job.run_dir))
    for failed, restarts in ((job, 1), (by_hand, 0)):
        result = slurm_cluster.wait(failed.job_id, timeout=120)
        log = assert_failed(result, failed)
        assert result.restarts == restarts
        assert f"clbd: ERROR: {job.run_dir} already holds a finished run" in log
        assert "nothing was started and nothing was overwritten" in log
    assert "clbd: srun" not in by_hand.log()
    assert snapshot(job.run_dir) == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        ([], {"CC3M_TRAIN": None}, "clbd: ERROR: CC3M_TRAIN is not set: give CC3M's img2dataset"),
        (
            [],
            {"CC3M_TRAIN": "/nonexistent/cc3m/train.index.json"},
            "clbd: ERROR: CC3M_TRAIN=/nonexistent/cc3m/train.index.json: /nonexistent/cc3m/train.index.json does "
            "not exist",
        ),
        (
            [],
            {"CC3M_VAL": "no-such-imagenet-val"},
            f"clbd: ERROR: CC3M_VAL=no-such-imagenet-val: {REPO_ROOT}/no-such-imagenet-val does not exist",
        ),
        (
            ["--trainer.devices=1"],
            {},
            "clbd: ERROR: --trainer.devices=1 does not match the allocation: --ntasks-per-node=2",
        ),
        (
            ["--trainer.num_nodes", "2"],
            {},
            "clbd: ERROR: --trainer.num_nodes=2 does not match the allocation: --nodes=1",
        ),
        (
            ["--trainer.default_root_dir=/tmp/elsewhere"],
            {},
            "clbd: ERROR: --trainer.default_root_dir is set by this script",
        ),
    ],
    ids=["train-unset", "train-missing", "val-missing", "devices", "num-nodes", "run-dir-override"],
)
def test_bad_input_fails_the_job_before_anything_starts(
    slurm_cluster: SlurmCluster,
    cc3m_shards: Path,
    tmp_path: Path,
    overrides: list[str],
    env: dict[str, str | None],
    message: str,
) -> None:
    job = submit_cc3m(slurm_cluster, tmp_path, cc3m_shards, *overrides, **env)
    log = assert_failed(slurm_cluster.wait(job.job_id, timeout=120), job)
    assert message in log, log
    assert "clbd: srun" not in log
    assert not (tmp_path / "runs").exists(), "no run directory is made for a job that cannot run"


@pytest.mark.parametrize(
    ("script", "args", "env", "message"),
    [
        (
            "defend.sh",
            ["configs/pretrain/clip_cc3m.yaml", "/nonexistent/poisoned.ckpt"],
            {},
            "clbd: ERROR: poisoned checkpoint (second argument) not found: /nonexistent/poisoned.ckpt",
        ),
        ("defend.sh", ["configs/pretrain/clip_cc3m.yaml"], {}, "clbd: ERROR: usage: sbatch slurm/defend.sh CONFIG"),
        (
            "pretrain_simclr_cifar10.sh",
            [],
            {"CIFAR10_SHARDS": "/nonexistent/cifar10"},
            "clbd: ERROR: CIFAR10_TRAIN=/nonexistent/cifar10/train.index.json: /nonexistent/cifar10/train.index.json "
            "does not exist (CIFAR10_SHARDS=/nonexistent/cifar10 must hold train.index.json",
        ),
        (
            "evaluate.sh",
            ["/nonexistent/run"],
            {},
            "clbd: ERROR: run configuration (is RUN_DIR a clbd run directory?) not found: /nonexistent/run/config.yaml",
        ),
    ],
    ids=["defend-checkpoint", "defend-usage", "simclr-shards", "evaluate-run-dir"],
)
def test_other_scripts_name_what_is_missing(
    slurm_cluster: SlurmCluster, tmp_path: Path, script: str, args: list[str], env: dict[str, str], message: str
) -> None:
    job = submit_script(slurm_cluster, tmp_path, script, *args, layout=CPU_ONE_TASK, env=env)
    log = assert_failed(slurm_cluster.wait(job.job_id, timeout=120), job)
    assert message in log, log
    assert "clbd: srun" not in log


def write_labelled_test_shards(folder: Path, classes: list[str], per_class: int) -> Path:
    rng = np.random.default_rng(1)
    with ShardSink(folder, "test", maxcount=16, classes=classes) as sink:
        for i in range(per_class * len(classes)):
            label = i % len(classes)
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(36, 36, 3), dtype=np.uint8)).save(buffer, "PNG")
            sink.write(
                f"test{i:04d}", {"png": buffer.getvalue(), "cls": label, "txt": f"a photo of a {classes[label]}"}
            )
    return folder / "test.index.json"


def test_evaluate_script_tests_the_finished_run(
    slurm_cluster: SlurmCluster, reference: Callable[[], Job], tmp_path: Path
) -> None:
    """slurm/evaluate.sh RUN_DIR: `clbd test` with the run's own config on its last checkpoint; results beside the
    checkpoint and in RUN_DIR/test/, the training files untouched."""
    test_shards = write_labelled_test_shards(tmp_path / "eval", ["cat", "dog", "bird", "ship"], per_class=8)
    run = reference()
    before = snapshot(run.run_dir)
    job = submit_script(
        slurm_cluster,
        tmp_path,
        "evaluate.sh",
        str(run.run_dir),
        f"--data.init_args.test_shards={test_shards}",
        layout=CPU_ONE_TASK,
    )
    result = slurm_cluster.wait(job.job_id, timeout=240)
    assert_completed(result, job, restarts=0)
    log = job.log()
    assert f"--ckpt_path {run.run_dir}/checkpoints/last.ckpt" in log
    results = json.loads((run.run_dir / "checkpoints" / "metrics.json").read_text())["last.ckpt"]
    assert results["n_images"] == 32 and 0.0 <= results["clean_accuracy_top1"] <= 1.0
    assert (run.run_dir / "test" / "metrics.csv").exists()
    after = snapshot(run.run_dir)
    assert {name: after[name] for name in before} == before, "evaluation changes no training file"
    assert set(after) - set(before) <= {
        "checkpoints/metrics.json",
        "test/metrics.csv",
        "test/hparams.yaml",
        "test/config.yaml",
    }
