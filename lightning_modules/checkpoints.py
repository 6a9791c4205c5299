"""Single-file checkpoints: the fp32 copy of a DeepSpeed checkpoint folder, which ``clbd test`` and the defenses
load without DeepSpeed."""

from __future__ import annotations

import os
from pathlib import Path

from .safe_checkpoint import check_checkpoint, load_checkpoint


def consolidated_path(checkpoint: Path) -> Path:
    """Where the fp32 copy of a DeepSpeed checkpoint folder lives: ``RUN/consolidated/<name>``."""
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run / "consolidated" / checkpoint.name


def consolidate(checkpoint: str | Path) -> Path:
    """A single-file checkpoint for ``checkpoint``: itself when it is a file; for a DeepSpeed folder (per-rank
    shards only DeepSpeed reads), its fp32 copy, written once with Lightning's converter, which keeps clbd's own
    keys (``clbd_run_config``) so ``clbd test`` and the defenses load it without DeepSpeed."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        return checkpoint
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    target = consolidated_path(checkpoint)
    # A save over the folder rewrites the files inside it and leaves the folder's own mtime as it was.
    newest = max((f.stat().st_mtime for f in checkpoint.rglob("*") if f.is_file()), default=checkpoint.stat().st_mtime)
    if target.is_file() and target.stat().st_mtime >= newest:
        return target
    check_checkpoint(checkpoint)  # the converter unpickles with weights_only=False
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as exc:  # pragma: no cover - depends on the deepspeed extra
        raise ValueError(f"{checkpoint} is a DeepSpeed checkpoint; pip install -e '.[deepspeed]' to read it") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    convert_zero_checkpoint_to_fp32_state_dict(checkpoint, partial)
    os.replace(partial, target)
    return target


def checkpoint_ranks(checkpoint: str | Path) -> int | None:
    """How many ranks wrote a clbd checkpoint: a DeepSpeed folder's per-rank ZeRO files, a file's per-rank stream
    states; None when it does not say (a checkpoint from elsewhere, one written outside a fit)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        from .deepspeed_setup import checkpoint_ranks as deepspeed_ranks

        return deepspeed_ranks(checkpoint)
    try:
        state = load_checkpoint(checkpoint, mmap=True)  # the tensors stay on disk: only the small entries are read
    except RuntimeError:  # not a zip checkpoint: no mmap
        state = load_checkpoint(checkpoint)
    per_rank = state.get("clbd_per_rank") if isinstance(state, dict) else None
    return len(per_rank) if per_rank else None
