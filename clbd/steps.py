"""One ``clbd`` command run in-process as a step of a longer job (``clbd experiment``, ``clbd demo``), printed first
so a user can rerun or change it by hand."""

from __future__ import annotations

import shlex

from .poison import main as poison_command
from .runner import run as trainer_command

TRAINER_STEPS = ("fit", "validate", "test", "predict")


def run_step(argv: list[str]) -> None:
    """``clbd fit|validate|test|predict ...`` or ``clbd poison ...``; a failing step stops the job."""
    if argv[0] not in (*TRAINER_STEPS, "poison"):
        raise ValueError(f"a step runs {', '.join(TRAINER_STEPS)} or poison, not {argv[0]!r}")
    print("\n$ clbd " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = poison_command(argv[1:]) if argv[0] == "poison" else trainer_command(argv)
    if code:
        raise SystemExit(f"clbd: the step above failed (exit {code})")
