"""One srun task of requeue_*.sbatch: a stand-in for a training process that SLURM preempts.

Mode "tasks" acts like Lightning's SLURMEnvironment(auto_requeue=True): on SIGUSR1 each rank records it, rank 0
writes the checkpoint hpc_ckpt_<restart + 1>.ckpt into the run directory and runs "scontrol requeue"; SIGTERM
(sent by the requeue) ends the loop instead of killing the process. Mode "plain" leaves SIGUSR1 to the batch
shell. Every start is recorded as start_r<restart>_rank<rank>.json; the first run waits up to 60 s for the signal
(exit 3 when none comes), a restarted run finishes at once.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

mode = sys.argv[1]
rank = int(os.environ["SLURM_PROCID"])
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
run_dir = Path(os.environ["CLBD_RUN_DIR"])
terminated = False


def record(name: str, **extra) -> None:
    data = {"rank": rank, "restart": restart, "job_id": os.environ["SLURM_JOB_ID"], "pid": os.getpid(), **extra}
    (run_dir / f"{name}_r{restart}_rank{rank}.json").write_text(json.dumps(data))


def on_usr1(signum, frame):
    record("usr1")
    if rank == 0:
        (run_dir / f"hpc_ckpt_{restart + 1}.ckpt").write_text(json.dumps({"restart": restart}))
        record("requeue", returncode=subprocess.call(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]]))


def on_term(signum, frame):
    global terminated
    terminated = True


record(
    "start",
    run_dir=str(run_dir),
    latest_ckpt=os.environ.get("CLBD_LATEST_CKPT", ""),
    master=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
)
if restart > 0:
    sys.exit(0)
if mode == "tasks":
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_term)
(run_dir / f"ready_r{restart}_rank{rank}").touch()
deadline = time.monotonic() + 60
while not terminated and time.monotonic() < deadline:
    time.sleep(0.1)
if terminated:
    record("sigterm")
    sys.exit(0)
print(f"rank {rank}: no SIGUSR1 within 60 s", file=sys.stderr)
sys.exit(3)
