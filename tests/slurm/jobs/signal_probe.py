"""One srun task of signal_probe.sbatch: counts the SIGUSR1 it receives, ends 2 s after OUT_DIR/stop appears."""

import os
import signal
import time
from pathlib import Path

out = Path(os.environ["OUT_DIR"])
rank = int(os.environ["SLURM_PROCID"])
received = 0


def on_usr1(signum, frame):
    global received
    received += 1
    (out / f"task{rank}.usr1").write_text(str(received))
    (out / "stop").touch()


signal.signal(signal.SIGUSR1, on_usr1)
(out / f"task{rank}.ready").touch()
deadline = time.monotonic() + float(os.environ.get("PROBE_SECONDS", "100"))
stop_seen = None
while time.monotonic() < deadline:
    if stop_seen is None and (out / "stop").exists():
        stop_seen = time.monotonic()
    if stop_seen is not None and time.monotonic() - stop_seen > 2:
        break
    time.sleep(0.1)
