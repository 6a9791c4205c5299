"""Run directories: never start a second run over a first, resume only what the same config began."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import yaml

from lightning_modules.checkpoints import consolidate, consolidated_path
from lightning_modules.safe_checkpoint import check_checkpoint, load_checkpoint

FINISHED_MARKER = "fit_finished.json"
CONFIG_NAME = "config.yaml"
# Keys that may change between a run and its resume without changing a sample or an update: evaluation settings,
# and how the loaders work (another number of workers deals the rest of the interrupted epoch anew, each sample once).
# Trainer settings (progress bar, logging cadence, devices) are not compared at all.
RESUME_MAY_DIFFER = {
    ("data", "eval_batch_size"),
    ("data", "max_val_samples"),
    ("data", "num_workers"),
    ("data", "pin_memory"),
    ("data", "resident"),
    ("data", "cache_eval_batches"),
    # the same arithmetic by another implementation (a checkpoint from before these settings existed resumes too)
    ("model", "optimizer_impl"),
    ("model", "compile"),
    ("model", "compile_mode"),
}


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says what to do instead."""


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """``last`` / ``hpc`` / a path -> an existing checkpoint file (or None when there is none yet)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        candidate = run_dir / "checkpoints" / "last.ckpt"
        return candidate if candidate.exists() else None
    if ckpt_path == "hpc":
        found = sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
        return found[-1] if found else None
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt_path: checkpoint not found: {path}")
    return path


def check_run_dir(run_dir: Path, checkpoint: Path | None, ckpt_path: str | None, run_config: dict[str, Any]) -> None:
    """Refuse a fit that would overwrite a user's run; refuse a resume from a different config."""
    finished = run_dir / FINISHED_MARKER
    if finished.exists():
        raise RunDirError(
            f"{run_dir} already holds a finished run ({finished.name}); choose another trainer.default_root_dir "
            "(nothing was overwritten)"
        )
    has_run = (run_dir / CONFIG_NAME).exists() or (run_dir / "checkpoints").exists()
    if has_run and ckpt_path is None:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --ckpt_path last to resume it, or choose another "
            "trainer.default_root_dir (nothing was overwritten)"
        )
    if checkpoint is not None:
        check_checkpoint(checkpoint)  # before Lightning or DeepSpeed unpickle it
        saved = saved_run_config(checkpoint)
        if saved is not None:
            differences = config_differences(saved, run_config)
            if differences:
                shown = "; ".join(differences[:8])
                raise RunDirError(f"--ckpt_path {checkpoint} was trained with a different config: {shown}")


def saved_run_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config a checkpoint was trained with (a DeepSpeed folder keeps it in its model-states file)."""
    if checkpoint.is_dir():
        found = sorted(checkpoint.rglob("*mp_rank_00_model_states.pt"))  # ZeRO-3: zero_pp_rank_0_mp_rank_00_...
        if not found:
            return None
        checkpoint = found[0]
    state = load_checkpoint(checkpoint)
    return state.get("clbd_run_config") if isinstance(state, dict) else None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for section in ("model", "data"):
        a, b = _flatten(saved.get(section)), _flatten(current.get(section))
        for key in sorted(set(a) | set(b)):
            if (section, key) in RESUME_MAY_DIFFER:
                continue
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            # init_args is jsonargparse's wrapper: leave it out of the names users read
            name = prefix if key == "init_args" else (f"{prefix}.{key}" if prefix else str(key))
            out.update(_flatten(inner, name))
        return out
    return {prefix: value}


def write_finished_marker(run_dir: Path, trainer) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "global_step": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "interrupted": bool(trainer.interrupted),
    }
    if not trainer.interrupted:
        (run_dir / FINISHED_MARKER).write_text(json.dumps(info, indent=1) + "\n")


def load_run_config(run_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((run_dir / CONFIG_NAME).read_text())


def consolidate_deepspeed(trainer) -> Path | None:
    """After a DeepSpeed fit: the fp32 copy of the last checkpoint (rank 0 writes it, every rank waits)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(trainer.strategy, DeepSpeedStrategy):
        return None
    callback = trainer.checkpoint_callback
    source = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
    trainer.strategy.barrier("consolidate_deepspeed")
    if not source:
        return None
    if trainer.is_global_zero:
        consolidate(source)
    trainer.strategy.barrier("consolidated")
    return consolidated_path(Path(source))
