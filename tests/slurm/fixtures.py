"""A real single-node SLURM cluster for tests: the session fixture ``slurm_cluster`` and job helpers.

Import the fixture into a test module (``from tests.slurm.fixtures import slurm_cluster``) or a conftest.
When ``sinfo`` does not answer, the fixture runs ``tests/slurm/cluster.sh install start`` (root only) and skips
with the reason when that cannot be done here. Without slurmdbd there is no ``sacct``: job states come from
``scontrol show job`` (the cluster keeps finished jobs for MinJobAge = 1 day) and, for jobs slurmctld has
forgotten, from the job completion log.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).with_name("cluster.sh")
COMMON_SH = Path(__file__).resolve().parents[2] / "slurm" / "_common.sh"
JOBS_DIR = Path(__file__).with_name("jobs")

# States a job does not leave by itself (a job being requeued shows PENDING/REQUEUED/COMPLETING instead).
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
# Held jobs wait for a person: waiting longer would only time out.
HELD_STATES = frozenset({"REQUEUE_HOLD", "SPECIAL_EXIT"})
HELD_REASONS = frozenset({"JobHeldUser", "JobHeldAdmin"})
# Pending for a reason only a new slurm.conf cures (the job asks for more than the partition's nodes have).
UNRUNNABLE_REASONS = frozenset({"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints"})
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/:.]*)=")


@dataclass(frozen=True)
class JobResult:
    """How a job ended. ``exit_code`` is SLURM's "status:signal", e.g. "0:0" or "1:0"."""

    job_id: int
    state: str
    exit_code: str
    restarts: int
    reason: str

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == "0:0"


def parse_key_values(line: str) -> dict[str, str]:
    """Parses one line of ``scontrol show -o`` / the job completion log into a dict (values may hold spaces)."""
    matches = list(_KEY.finditer(line))
    fields = {}
    for match, following in zip(matches, matches[1:] + [None]):
        end = following.start() if following else len(line)
        fields[match.group(1)] = line[match.end() : end].strip()
    return fields


def _run(cmd: Sequence[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kwargs)


def sinfo_answers() -> bool:
    """True when a slurmctld answers and the default partition has a node that can take jobs."""
    if shutil.which("sinfo") is None:
        return False
    try:
        proc = _run(["sinfo", "--noheader", "--format=%T"], timeout=15)
    except subprocess.TimeoutExpired:
        return False
    states = proc.stdout.split()
    return proc.returncode == 0 and any(s.rstrip("*~#$@+-^!%") in ("idle", "mixed", "allocated") for s in states)


def ensure_cluster() -> str | None:
    """Starts the local cluster when needed. Returns None when it is up, else the reason it cannot be."""
    if sinfo_answers():
        return None
    if os.geteuid() != 0:
        return "no SLURM cluster answers and starting one (tests/slurm/cluster.sh) needs root"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "no SLURM cluster answers, SLURM is not installed and apt-get is not available"
    install = _run(["bash", str(CLUSTER_SH), "install"], timeout=1800)
    if install.returncode != 0:
        return f"cannot install SLURM with apt-get: {install.stderr.strip()[-2000:]}"
    start = _run(["bash", str(CLUSTER_SH), "start"], timeout=300)
    if start.returncode != 0:
        # Installed but not starting is a defect of the harness: fail loudly rather than skip.
        raise RuntimeError(f"tests/slurm/cluster.sh start failed:\n{start.stdout}\n{start.stderr}")
    return None


class SlurmCluster:
    """Submits jobs to the local cluster and follows them until they end."""

    def __init__(self) -> None:
        self.submitted: list[int] = []
        config = dict(
            (key.strip(), value.strip())
            for key, _, value in (
                line.partition("=") for line in _run(["scontrol", "show", "config"]).stdout.splitlines()
            )
        )
        self.jobcomp_log = config.get("JobCompLoc", "")
        self.node = _run(["sinfo", "--noheader", "--format=%n"]).stdout.split()[0]

    def submit(
        self,
        script: str | os.PathLike,
        *args: str,
        env: Mapping[str, str | None] | None = None,
        sbatch_args: Sequence[str] = (),
        cwd: str | os.PathLike | None = None,
    ) -> int:
        """``sbatch [sbatch_args] script args`` and returns the job id.

        ``env`` is added to this process's environment, which sbatch hands to the job (--export=ALL); a value
        of None removes that variable.
        ``cwd`` (default: the script's folder) is the job's working directory and where slurm-%j.out goes.
        """
        script = Path(script)
        if not script.is_file():
            raise FileNotFoundError(f"sbatch script not found: {script}")
        job_env = dict(os.environ)
        for name, value in (env or {}).items():
            if value is None:
                job_env.pop(name, None)
            else:
                job_env[name] = value
        proc = _run(
            ["sbatch", "--parsable", *sbatch_args, str(script), *args],
            env=job_env,
            cwd=str(cwd or script.parent),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed ({proc.returncode}): {proc.stderr.strip()}")
        job_id = int(proc.stdout.strip().split(";")[0])
        self.submitted.append(job_id)
        return job_id

    def job_info(self, job_id: int) -> dict[str, str] | None:
        """``scontrol show job`` as a dict, or the job completion log's last record once slurmctld forgot it."""
        proc = _run(["scontrol", "show", "job", "--oneliner", str(job_id)])
        if proc.returncode == 0 and proc.stdout.strip():
            return parse_key_values(proc.stdout.strip())
        return self._jobcomp_record(job_id)

    def _jobcomp_record(self, job_id: int) -> dict[str, str] | None:
        if not self.jobcomp_log or not os.path.exists(self.jobcomp_log):
            return None
        records = []
        with open(self.jobcomp_log) as lines:
            records = [parse_key_values(line) for line in lines if line.startswith(f"JobId={job_id} ")]
        if not records:
            return None
        # One record per end of a run: those before the last are the runs that were requeued.
        return {"Restarts": str(len(records) - 1), **records[-1]}

    def state(self, job_id: int) -> str:
        info = self.job_info(job_id)
        return info.get("JobState", "UNKNOWN") if info else "UNKNOWN"

    def wait(self, job_id: int, timeout: float, poll: float = 0.5) -> JobResult:
        """Waits until the job ends (or is held) and returns how. On timeout cancels it and raises TimeoutError."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] | None = None
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info:
                state, reason = info.get("JobState", ""), info.get("Reason", "")
                if state in TERMINAL_STATES or state in HELD_STATES or reason in HELD_REASONS:
                    return JobResult(
                        job_id=job_id,
                        state=state,
                        exit_code=info.get("ExitCode", "?"),
                        restarts=int(info.get("Restarts", "0") or 0),
                        reason=reason,
                    )
                if state == "PENDING" and reason in UNRUNNABLE_REASONS:
                    self.cancel(job_id)
                    node = _run(["scontrol", "show", "node", "-o", self.node]).stdout.strip()
                    raise AssertionError(
                        f"job {job_id} can never start here (pending: {reason}); cancelled it.\n"
                        f"job: {info}\nnode: {node}"
                    )
            time.sleep(poll)
        self.cancel(job_id)
        raise TimeoutError(f"job {job_id} did not end within {timeout} s; cancelled it. Last record: {info}")

    def wait_for_file(self, path: str | os.PathLike, job_id: int, timeout: float) -> Path:
        """Waits for a file a running job writes; fails early when the job ends without writing it."""
        path = Path(path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return path
            state = self.state(job_id)
            if state in TERMINAL_STATES:
                raise AssertionError(f"job {job_id} ended ({state}) without writing {path}")
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} did not write {path} within {timeout} s (state {self.state(job_id)})")

    def signal(self, job_id: int, sig: str = "USR1", *, batch: bool = False, full: bool = False) -> None:
        """``scancel --signal=SIG`` (job steps' tasks), with ``--batch`` (batch shell only) or ``--full`` (both)."""
        cmd = ["scancel", f"--signal={sig}"]
        if batch:
            cmd.append("--batch")
        if full:
            cmd.append("--full")
        proc = _run([*cmd, str(job_id)])
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} {job_id} failed: {proc.stderr.strip()}")

    def update(self, job_id: int, **fields: str) -> None:
        """``scontrol update JobId=<id> Key=Value ...``, e.g. ``update(job, TimeLimit="1")``."""
        settings = [f"{key}={value}" for key, value in fields.items()]
        proc = _run(["scontrol", "update", f"JobId={job_id}", *settings])
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol update JobId={job_id} {' '.join(settings)} failed: {proc.stderr.strip()}")

    def cancel(self, job_id: int) -> None:
        _run(["scancel", str(job_id)])

    def cancel_unfinished(self) -> None:
        """Cancels the jobs this harness submitted that still hold or wait for the shared cluster."""
        for job_id in self.submitted:
            if self.state(job_id) not in TERMINAL_STATES:
                self.cancel(job_id)


def job_log(path: str | os.PathLike, timeout: float = 5) -> str:
    """Text of a job's output file. slurmstepd writes it, possibly a moment after the job is reported done."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"job log not found: {path}")
        time.sleep(0.1)
    return path.read_text(errors="replace")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The local single-node SLURM cluster, started on first use; skips where it cannot run."""
    reason = ensure_cluster()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    yield cluster
    cluster.cancel_unfinished()
