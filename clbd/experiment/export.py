"""Results apart from checkpoints: a finished arm exported as a small folder (``DIR/<arm id>/``) that another
machine's ``clbd experiment --from DIR`` assembles into the same table; and the README's tables regenerated from
such folders."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .arms import Arm
from .runs import COMMAND_RECORD, PROVENANCE, is_done

# Everything a table, a reader or a reviewer needs of an arm; never a checkpoint.
EXPORTED = (
    "config.yaml",
    COMMAND_RECORD,
    PROVENANCE,
    "fit_finished.json",
    "metrics.csv",
    "poison_summary.json",
    "data_report.json",
    "defense_metrics.json",
)


def export(arms: list[Arm], target: Path) -> list[str]:
    """Copies each arm finished here into ``target/<arm id>/``; returns the ids exported. An arm already exported
    with other contents is refused (results are never overwritten silently)."""
    done = []
    for arm in arms:
        if arm.kind == "base" or not is_done(arm, arm.run_dir):
            continue
        names = [*EXPORTED, *(name for name in arm.evaluations)]
        destination = target / arm.id
        for name in names:
            source = arm.run_dir / name
            if not source.is_file():
                continue
            copy = destination / name
            if copy.exists() and copy.read_bytes() != source.read_bytes():
                raise ValueError(f"{copy} exists with other contents; export to another folder or remove it")
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
        done.append(arm.id)
    return done


def replace_block(document: Path, name: str, text: str) -> None:
    """Puts ``text`` between ``<!-- clbd-table: NAME -->`` and ``<!-- /clbd-table: NAME -->`` in ``document``."""
    start, end = f"<!-- clbd-table: {name} -->", f"<!-- /clbd-table: {name} -->"
    content = document.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(content):
        raise ValueError(f"--readme: {document} has no block {start} ... {end}")
    document.write_text(pattern.sub(lambda _: f"{start}\n{text.rstrip()}\n{end}", content))
