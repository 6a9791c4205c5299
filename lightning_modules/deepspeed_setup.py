"""What a DeepSpeed run needs before Lightning's ``DeepSpeedStrategy`` sets it up (any way it was named).

- DeepSpeed's micro batch is clbd's per-rank batch. Lightning would read it from the train loader's batch sampler,
  which clbd's loaders (streams of ready batches) do not have: it would fail, after building the loader.
- DeepSpeed (0.19 at least) broadcasts rank 0's parameters as bytes, ``p.data.view(torch.uint8)``, which fails on a
  0-dim parameter ("self.dim() cannot be 0 to view Float as Byte"): CLIP's ``logit_scale`` is one. The engine's
  broadcast (ZeRO-1/2) sees such parameters as 1-element views of the same storage; ZeRO-3's conversion of a 0-dim
  parameter broadcasts a 1-element view itself, then partitions the parameter as DeepSpeed does.
- A checkpoint folder written by N data-parallel ranks loads on N ranks only (DeepSpeed refuses another world size:
  each rank's file holds its partition of the optimizer state). Resumed on M != N ranks, it goes through DeepSpeed's
  universal checkpoint: rank 0 converts it once (``ds_to_universal``) into ``RUN/universal/<name>``, beside the run's
  checkpoints (the user's folder is never written), and every rank loads that with ``load_universal``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A ZeRO optimizer-state file, one per data-parallel rank: [bf16_]zero_pp_rank_<dp rank>_mp_rank_<tp>_optim_states.pt
OPTIM_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
# Any per-rank file (ZeRO-3 writes model states per rank too).
RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")
STAMP = "converted_from.json"


def prepare_deepspeed(trainer: Any, datamodule: Any, checkpoint: Path | None = None) -> None:
    """Before fit: DeepSpeed's micro batch, the 0-dim parameter fixes, and for ``checkpoint`` (the one resumed,
    if any) written by another number of ranks than this run's, the resume through a universal checkpoint."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DeepSpeedStrategy):
        return
    if "train_micro_batch_size_per_gpu" not in strategy.config:
        strategy.config["train_micro_batch_size_per_gpu"] = max(datamodule.batch_size // trainer.world_size, 1)
    broadcast_scalar_parameters()
    partition_scalar_parameters()
    if checkpoint is not None and checkpoint.is_dir():
        # The processes are not started yet: this run's world size is its node count times devices per node.
        resume_on_other_ranks(strategy, checkpoint, trainer.num_nodes * trainer.num_devices)


def checkpoint_ranks(checkpoint: Path) -> int | None:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint folder (None when it holds no ZeRO files)."""
    tag = checkpoint / latest_tag(checkpoint)
    ranks = {int(found.group(1)) for file in tag.glob("*optim_states.pt") if (found := OPTIM_STATES.search(file.name))}
    return len(ranks) or None


def latest_tag(checkpoint: Path) -> str:
    """The tag folder inside a DeepSpeed checkpoint, or its universal copy (Lightning saves with tag ``checkpoint``)."""
    for name in ("latest", "latest_universal"):
        if (checkpoint / name).is_file():
            return (checkpoint / name).read_text().strip()
    return "checkpoint"


def universal_path(checkpoint: Path) -> Path:
    """Where the universal copy of a DeepSpeed checkpoint folder lives: ``RUN/universal/<name>``."""
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run / "universal" / checkpoint.name


def resume_on_other_ranks(strategy: Any, checkpoint: Path, world_size: int) -> None:
    """When ``checkpoint`` was written by another number of ranks: load it through its universal copy (made on
    rank 0 when the strategy loads it, the other ranks waiting) instead of the folder itself. This run's saves over
    a folder of the old layout (``last.ckpt``) drop the files of ranks it does not have: left there, they would
    make the folder a checkpoint of both layouts at once, which neither DeepSpeed nor the consolidation reads."""
    written_by = checkpoint_ranks(checkpoint)
    if written_by is None or written_by == world_size:
        return
    check_adam_state(checkpoint, written_by, world_size)
    strategy.config.setdefault("checkpoint", {})["load_universal"] = True
    target = universal_path(checkpoint)
    original = strategy.load_checkpoint

    def load_checkpoint(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).resolve() != checkpoint.resolve():
            return original(path, *args, **kwargs)
        if strategy.is_global_zero:
            log.info(
                "DeepSpeed checkpoint %s was written by %d data-parallel ranks and is resumed on %d: loading it "
                "through its universal checkpoint %s",
                checkpoint,
                written_by,
                world_size,
                target,
            )
            convert_to_universal(checkpoint, target)
        strategy.barrier("universal_checkpoint")
        client_state = original(target, *args, **kwargs)
        restore_buffers(strategy.deepspeed_engine.module, target)
        return client_state

    strategy.load_checkpoint = load_checkpoint
    original_save = strategy.save_checkpoint

    def save_checkpoint(checkpoint_state: Any, filepath: Any, *args: Any, **kwargs: Any) -> None:
        original_save(checkpoint_state, filepath, *args, **kwargs)
        if strategy.is_global_zero:
            drop_files_of_other_ranks(Path(filepath), world_size)

    strategy.save_checkpoint = save_checkpoint


def check_adam_state(checkpoint: Path, written_by: int, world_size: int) -> None:
    """DeepSpeed's universal checkpoint carries Adam's state only (ZeRO-1/2's converter and ZeRO-3's loader name
    ``exp_avg`` and ``exp_avg_sq``): another optimizer's state (SGD's or LARS's momentum) would be lost or fail
    halfway. Refused here, before any compute."""
    from .safe_checkpoint import load_checkpoint

    tag = checkpoint / latest_tag(checkpoint)
    first = next(f for f in sorted(tag.glob("*optim_states.pt")) if (m := OPTIM_STATES.search(f.name)) and m[1] == "0")
    saved = load_checkpoint(first, mmap=True)["optimizer_state_dict"]
    inner = saved.get("base_optimizer_state") or saved.get("optimizer_state_dict") or {}
    keys = {key for state in (inner.get("state") or {}).values() for key in state}
    if not keys or not {"exp_avg", "exp_avg_sq"} <= keys or keys - {"exp_avg", "exp_avg_sq", "step"}:
        held = ", ".join(sorted(keys)) or "no optimizer state yet"
        raise ValueError(
            f"--ckpt_path {checkpoint}: written by {written_by} DeepSpeed ranks, resumed on {world_size}; that goes "
            f"through DeepSpeed's universal checkpoint, which carries Adam's state (exp_avg, exp_avg_sq) only, and "
            f"this checkpoint's optimizer holds {held}. Resume it on {written_by} ranks, or train with "
            "model.optimizer adam or adamw"
        )


def drop_files_of_other_ranks(checkpoint: Path, world_size: int) -> None:
    """Removes the per-rank files of ranks ``>= world_size`` from a DeepSpeed checkpoint folder just saved."""
    tag = checkpoint / latest_tag(checkpoint)
    for file in tag.glob("*_states.pt") if tag.is_dir() else []:
        found = RANK_FILE.search(file.name)
        if found and int(found.group(1)) >= world_size:
            file.unlink()


def restore_buffers(module: Any, universal: Path) -> None:
    """The module's buffers (batch-norm statistics) from a universal checkpoint's model states: DeepSpeed restores
    the parameters from its ``zero/`` folder and skips the module's state dict, buffers included."""
    import torch

    from .safe_checkpoint import load_checkpoint

    found = sorted((universal / latest_tag(universal)).glob("*mp_rank_00_model_states.pt"))
    saved = load_checkpoint(found[0])["module"] if found else {}
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


def convert_to_universal(checkpoint: Path, target: Path) -> Path:
    """``target``: the universal copy of the DeepSpeed checkpoint folder ``checkpoint`` (same tag, plus the
    ``latest_universal`` file DeepSpeed reads), converted once per version of ``checkpoint``.

    Lightning writes no ``universal_checkpoint_info`` (the model-parallel layout), so it is injected as DeepSpeed's
    ``--inject_missing_state`` does: a plain data-parallel model needs nothing more. The files are read from a
    checkpoint the run vetted before (``check_run_dir``); the conversion unpickles them itself.
    """
    from deepspeed.checkpoint import ds_to_universal

    tag = latest_tag(checkpoint)
    source = checkpoint / tag
    stamp = {"source": str(checkpoint.resolve()), "files": _file_versions(source)}
    if (target / STAMP).is_file() and json.loads((target / STAMP).read_text()) == stamp:
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(partial / tag),  # DeepSpeed writes latest_universal beside it, naming the tag
        num_extract_workers=1,  # in this process: no process pool inside a training rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines are logs, not the command's output
        ds_to_universal.main(args)
    (partial / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def _file_versions(folder: Path) -> dict[str, list[int]]:
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()}


def broadcast_scalar_parameters() -> None:
    """Wrap ``DeepSpeedEngine._broadcast_model`` (once) so that 0-dim parameters are broadcast as 1-element views."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model
    if getattr(original, "clbd_scalars", False) or "view(torch.uint8)" not in inspect.getsource(original):
        return

    @functools.wraps(original)
    def broadcast(engine) -> None:
        scalars = [p for p in engine.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)  # same storage: what rank 0 sends lands in the parameter itself
        try:
            original(engine)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    broadcast.clbd_scalars = True
    DeepSpeedEngine._broadcast_model = broadcast


def partition_scalar_parameters() -> None:
    """Wrap ZeRO-3's ``Init._zero_init_param`` (once) for 0-dim parameters: the same steps, a 1-element broadcast."""
    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.partition_parameters import Init

    original = Init._zero_init_param
    source = inspect.getsource(original)
    expected = ("_convert_to_deepspeed_param(param)", "get_partition_dp_group(param)", "param.partition()")
    if getattr(original, "clbd_scalars", False) or not all(step in source for step in expected):
        return  # already wrapped, or another DeepSpeed whose steps this does not know: left as it is

    @functools.wraps(original)
    def zero_init_param(init, param) -> None:
        if param.dim() != 0:
            return original(init, param)
        init._convert_to_deepspeed_param(param)
        group = init.get_partition_dp_group(param)
        source_rank = 0 if dist.get_world_group() == group else dist.get_global_rank(group, 0)
        dist.broadcast(param.data.reshape(1).view(torch.uint8), source_rank, group)
        param.partition()

    zero_init_param.clbd_scalars = True
    Init._zero_init_param = zero_init_param
