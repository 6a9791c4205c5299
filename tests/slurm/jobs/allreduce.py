"""One srun task of allreduce.sbatch: joins a gloo group from SLURM's variables and all-reduces a tensor."""

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

rank = int(os.environ["SLURM_PROCID"])
world_size = int(os.environ["SLURM_NTASKS"])
dist.init_process_group(
    "gloo",
    init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    rank=rank,
    world_size=world_size,
    timeout=timedelta(seconds=60),
)
# Rank r contributes [r + 1, 10**r]: the sum tells which ranks took part.
tensor = torch.tensor([rank + 1.0, 10.0**rank])
dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
pids = [None] * world_size
dist.all_gather_object(pids, os.getpid())
record = {
    "rank": rank,
    "world_size": dist.get_world_size(),
    "local_rank": int(os.environ["SLURM_LOCALID"]),
    "sum": tensor.tolist(),
    "pids": pids,
    "host": socket.gethostname(),
    "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
}
Path(os.environ["OUT_DIR"], f"allreduce_rank{rank}.json").write_text(json.dumps(record))
dist.destroy_process_group()
