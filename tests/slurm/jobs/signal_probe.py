"""One srun task of signal_probe.sbatch: counts the SIGUSR1 it receives, and so does a child it forks (as a
DataLoader worker would be). Each ends 2 s after OUT_DIR/stop appears."""

import os
import signal
import time
from pathlib import Path

out = Path(os.environ["OUT_DIR"])
rank = int(os.environ["SLURM_PROCID"])
who = f"task{rank}"
received = 0


def on_usr1(signum, frame):
    global received
    received += 1
    (out / f"{who}.usr1").write_text(str(received))
    (out / "stop").touch()


def wait_for_stop() -> None:
    deadline = time.monotonic() + float(os.environ.get("PROBE_SECONDS", "100"))
    stop_seen = None
    while time.monotonic() < deadline:
        if stop_seen is None and (out / "stop").exists():
            stop_seen = time.monotonic()
        if stop_seen is not None and time.monotonic() - stop_seen > 2:
            break
        time.sleep(0.1)


signal.signal(signal.SIGUSR1, on_usr1)
child = os.fork()
if child == 0:
    who = f"task{rank}child"  # the handler is inherited, as in a forked DataLoader worker
(out / f"{who}.ready").touch()
wait_for_stop()
if child == 0:
    os._exit(0)
os.waitpid(child, 0)
