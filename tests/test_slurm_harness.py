"""The local SLURM cluster's harness itself, without a cluster: what tests/slurm/cluster.sh would configure."""

from __future__ import annotations

import os
import subprocess

from tests.slurm.fixtures import CLUSTER_SH, parse_key_values


def rendered_node(env: dict[str, str]) -> dict[str, str]:
    conf = subprocess.run(["bash", str(CLUSTER_SH), "conf"], capture_output=True, text=True, env=env, check=True)
    (node_line,) = [line for line in conf.stdout.splitlines() if line.startswith("NodeName=")]
    return parse_key_values(node_line)


def test_node_announces_every_usable_core_whatever_openmp_is_told() -> None:
    # The suite runs with OMP_NUM_THREADS=1, and GNU nproc obeys it: a node of one CPU left every two-task job
    # pending (reason PartitionConfig) until it timed out.
    env = {key: value for key, value in os.environ.items() if key != "CLBD_SLURM_CPUS"}
    env.update(OMP_NUM_THREADS="1", OMP_THREAD_LIMIT="1")
    node = rendered_node(env)
    assert int(node["CPUs"]) == len(os.sched_getaffinity(0))
    assert int(node["RealMemory"]) > 256


def test_node_cpus_follow_clbd_slurm_cpus() -> None:
    assert rendered_node({**os.environ, "CLBD_SLURM_CPUS": "8"})["CPUs"] == "8"
