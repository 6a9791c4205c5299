"""Checkpoints from elsewhere cannot run code: every checkpoint clbd opens is unpickled with ``weights_only=True``.

A checkpoint is a pickle, and unpickling a crafted one runs whatever it names. torch's ``weights_only`` unpickler
builds only tensors, containers, numbers and strings (plus the types allow-listed here), and refuses anything else
before constructing it. clbd's own checkpoints hold nothing more; DeepSpeed's per-rank optimizer files hold three
DeepSpeed types of its own, allowed for those files only. DeepSpeed itself unpickles its files with
``weights_only=False``, so clbd loads each of them once with the safe unpickler first (``check_checkpoint``).
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch

# Beyond torch's defaults, clbd's own checkpoints need no type: keep it that way (a type added here can run its
# __setstate__ / __reduce__ arguments from any file).
CLBD_SAFE_GLOBALS: tuple[Any, ...] = ()
# What DeepSpeed's ZeRO files (zero_pp_rank_*_optim_states.pt, ...) store beside tensors: "module:name".
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds a type clbd does not store; it was not unpickled."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` with the safe unpickler; a refusal names the file and the types it would have built."""
    path = Path(path)
    allowed = list(CLBD_SAFE_GLOBALS) + (_deepspeed_globals() if _is_deepspeed_file(path) else [])
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(_refusal(path, exc, allowed)) from None


def check_checkpoint(path: str | Path) -> None:
    """Unpickle ``path`` safely (a file, or every ``*.pt`` in a DeepSpeed checkpoint folder) and drop the result:
    for loaders that are not clbd's own (Lightning's resume, DeepSpeed's), which then read files already vetted."""
    path = Path(path)
    files = sorted(path.rglob("*.pt")) if path.is_dir() else [path]
    for file in files:
        load_checkpoint(file, mmap=_is_zip(file))


def _refusal(path: Path, exc: Exception, allowed: list[Any]) -> str:
    try:
        with torch.serialization.safe_globals(allowed):
            offending = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint: torch's own message names the global
        offending = []
    found = ", ".join(offending) if offending else str(exc).strip().splitlines()[0]
    return (
        f"checkpoint {path} refused: it holds {found}, which clbd checkpoints never contain; unpickling it could run "
        "code, so it was not loaded (a model from elsewhere: save its state_dict of tensors and load that)"
    )


def _is_deepspeed_file(path: Path) -> bool:
    return path.suffix == ".pt" and path.name.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_", "mp_rank_"))


def _deepspeed_globals() -> list[Any]:
    found = []
    for spec in DEEPSPEED_SAFE_GLOBALS:
        module, name = spec.split(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: its files name what it has
            continue
    return found


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"PK\x03\x04"
