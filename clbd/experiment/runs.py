"""Running an arm here, and the records that let its results travel: the command that made it (to reuse a run, or
accept an exported one, only for the plan's own command) and its provenance (code, device, versions, wall time)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from ..steps import run_step
from .arms import FINISHED, Arm
from .plan import flatten

COMMAND_RECORD = "experiment_command.json"  # the clbd fit arguments a run was made with, to reuse it only for those
PROVENANCE = "provenance.json"
CHECKOUT = Path(__file__).resolve().parents[2]


# ---- the command record -----------------------------------------------------------------------------------------
def comparable(argv: list[str]) -> list[str]:
    """``argv`` with every existing file named by it (``path`` or ``--key=path``) made absolute, so the same command
    given with relative or absolute paths (the demo's plan, the test bed's) compares equal."""

    def resolved(value: str) -> str:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    return [_map_value(arg, resolved) for arg in argv]


def portable(argv: list[str], out: Path) -> list[str]:
    """``argv`` as it reads on any machine: paths under ``--out`` as ``{out}/...``, paths under the working directory
    relative to it, so an arm exported from a GPU machine compares with the plan where the table is assembled.
    Symbolic links are kept (``data/cifar10`` linked to a scratch disk still reads ``data/cifar10``)."""
    out, here = Path(os.path.abspath(out)), Path(os.path.abspath(Path.cwd()))

    def moved(value: str) -> str:
        if not value:
            return value
        path = Path(os.path.abspath(value))
        if path.is_relative_to(out) and path != out:  # also before it exists (an arm's checkpoint when assembling)
            return "{out}/" + path.relative_to(out).as_posix()
        if value.startswith("/") or Path(value).exists():
            return path.relative_to(here).as_posix() if path.is_relative_to(here) else value
        return value

    return [_map_value(arg, moved) for arg in argv]


def _map_value(arg: str, change) -> str:
    key, sep, value = arg.partition("=")
    return f"{key}={change(value)}" if sep and arg.startswith("--") else change(arg)


# Settings that change how fast a run goes, not what it computes (the samples, their order and views, the updates up
# to float rounding): an arm made with other values of these is the same arm, so a GPU config that gains a speed
# setting keeps the arms made before it, and an arm may run with the fastest setting a GPU call measured.
SPEED_SETTINGS = frozenset(
    {
        "benchmark",
        "channels_last",
        "num_workers",
        "pin_memory",
        "resident",
        "cache_eval_batches",
        "views_on_device",
        "images_on_device",
        "optimizer_impl",
        "compile",
        "compile_mode",
        "batchnorm_fp32",
        "enable_progress_bar",
        "enable_model_summary",
        "log_every_n_steps",
        "eval_batch_size",
    }
)


def without_speed_settings(argv: list[str]) -> list[str]:
    return [arg for arg in argv if arg.partition("=")[0].rsplit(".", 1)[-1] not in SPEED_SETTINGS]


def config_digests(argv: list[str], name=lambda path: str(Path(path).resolve()), content=None) -> dict[str, str]:
    """SHA-256 of every config file the command names: the same arguments with an edited attack config (another
    rate, another trigger) make another model. ``content``: what of a file is hashed (default its bytes)."""
    content = content or (lambda path: Path(path).read_bytes())
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    return {name(p): hashlib.sha256(content(p)).hexdigest() for p in paths if Path(p).is_file()}


def what_it_computes(path: str) -> bytes:
    """A config file's settings without its speed settings and its comments or layout, as canonical bytes."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in SPEED_SETTINGS}
        return [strip(v) for v in value] if isinstance(value, list) else value

    loaded = yaml.safe_load(Path(path).read_text())
    return json.dumps(strip(loaded), sort_keys=True, default=str).encode()


def command_record(argv: list[str], out: Path, key: str = "clbd_fit") -> dict[str, Any]:
    """What makes a step's results comparable: its arguments as given here and in portable form, and the digests of
    the config files they name (every byte, and what they compute)."""
    return {
        key: comparable(argv),
        "config_digests": config_digests(argv),
        "portable": portable(argv, out),
        "portable_digests": config_digests(argv, name=lambda p: portable([p], out)[0]),
        "semantic_digests": config_digests(argv, content=what_it_computes),
        "portable_semantic_digests": config_digests(
            argv, name=lambda p: portable([p], out)[0], content=what_it_computes
        ),
    }


def record_command(run_dir: Path, argv: list[str], out: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / COMMAND_RECORD).write_text(json.dumps(command_record(argv, out), indent=1) + "\n")


def record_evaluation(run_dir: Path, name: str, argv: list[str], out: Path) -> None:
    """The ``clbd test`` arguments an evaluation file was made with, kept in the run's command record beside the fit's
    (so it travels with an export): a clean model's ASR under one attack's trigger never stands for another's."""
    path = run_dir / COMMAND_RECORD
    record = json.loads(path.read_text()) if path.exists() else {}
    record.setdefault("evaluations", {})[name] = command_record(argv, out, key="clbd_test")
    path.write_text(json.dumps(record, indent=1) + "\n")


def same_command_or_error(run_dir: Path, argv: list[str], out: Path, exported: bool = False) -> None:
    """A run is reused, resumed or (``exported``) taken into the table only for the same ``clbd fit`` arguments and
    the same contents of the config files they name: a shared ``base.dir``, an edited plan or an edited attack config
    would otherwise stand for a model made another way. Runs from before the record existed are taken as they are;
    an exported arm compares in its portable form (paths relative to ``--out`` and to the checkout)."""
    record = run_dir / COMMAND_RECORD
    if not record.exists():
        if exported:
            raise ValueError(f"{run_dir} has no {COMMAND_RECORD}: nothing says which command made it")
        return
    differs = difference(json.loads(record.read_text()), "clbd_fit", argv, out, exported)
    if differs:
        raise ValueError(
            f"{run_dir} was made {differs}; remove that folder to redo it, or use another --out / base.dir"
        )


def same_evaluation_or_error(run_dir: Path, name: str, argv: list[str], out: Path, exported: bool = False) -> None:
    """An evaluation file is reused or taken into the table only for the plan's ``clbd test`` arguments (evaluations
    from before their record existed are taken as they are)."""
    record = run_dir / COMMAND_RECORD
    saved = (json.loads(record.read_text()) if record.exists() else {}).get("evaluations", {}).get(name)
    differs = saved and difference(saved, "clbd_test", argv, out, exported)
    if differs:
        raise ValueError(f"{run_dir / name} was evaluated {differs}; remove that file to evaluate again")


def same_commands_or_error(arm: Arm, folder: Path, out: Path, exported: bool = False) -> None:
    """The arm's fit and every evaluation file it has in ``folder`` were made by the plan's commands."""
    if arm.fit is not None:
        same_command_or_error(folder, arm.fit, out, exported=exported)
    for name, argv in arm.evaluations.items():
        if (folder / name).exists():
            same_evaluation_or_error(folder, name, argv, out, exported=exported)


def difference(saved: dict[str, Any], key: str, argv: list[str], out: Path, exported: bool) -> str | None:
    """How the command recorded under ``key`` in ``saved`` differs from ``argv`` (None: it does not), compared
    without speed settings, in portable form where it came from another machine."""
    semantic = "semantic_digests" in saved  # records from before compare every byte of the config files
    content = what_it_computes if semantic else None
    same_args = without_speed_settings(saved.get(key) or []) == without_speed_settings(comparable(argv))
    if exported or "portable" in saved and not same_args:
        earlier, now = saved.get("portable"), portable(argv, out)
        digests = saved.get("portable_semantic_digests" if semantic else "portable_digests")
        current = config_digests(argv, name=lambda p: portable([p], out)[0], content=content)
    else:
        earlier, now = saved.get(key), comparable(argv)
        digests = saved.get("semantic_digests" if semantic else "config_digests")
        current = config_digests(argv, content=content)
    earlier, now = without_speed_settings(earlier or []), without_speed_settings(now)
    if earlier != now:
        changed = sorted(set(now).symmetric_difference(earlier or []))
        return f"by another command than this plan's (arguments that differ: {' '.join(changed)})"
    if digests is not None:  # records from before digests were kept compare by arguments only
        edited = sorted(path for path, digest in current.items() if digests.get(path) != digest)
        if edited:
            return f"with other contents of {', '.join(edited)} (edited since)"
    return None


# ---- running ------------------------------------------------------------------------------------------------------
def is_done(arm: Arm, folder: Path) -> bool:
    return all((folder / name).exists() for name in arm.done_files())


def run_arm(arm: Arm, by_id: dict[str, Arm], out: Path) -> None:
    """Runs what the arm still lacks here (an interrupted fit resumes from its ``last.ckpt``) and writes its
    provenance; its needs must be done here, since it starts from their checkpoints."""
    missing = [need for need in arm.needs if not is_done(by_id[need], by_id[need].run_dir)]
    if missing:
        raise ValueError(
            f"arm {arm.id} starts from {', '.join(missing)}, not finished in {out}: run "
            f"{'that arm' if len(missing) == 1 else 'those arms'} first, here (the checkpoint must be on this machine)"
        )
    same_commands_or_error(arm, arm.run_dir, out)
    if is_done(arm, arm.run_dir) and all(Path(step["creates"]).exists() for step in arm.then):
        return
    seconds: dict[str, float] = {}
    finished_marker = arm.run_dir / (FINISHED if arm.kind != "defense" else arm.done_files()[0])
    if arm.fit is not None and not finished_marker.exists():
        record_command(arm.run_dir, arm.fit, out)
        started = time.time()
        run_step(
            ["fit", *arm.fit, f"--trainer.default_root_dir={arm.run_dir}", f"--ckpt_path={resume_from(arm.run_dir)}"]
        )
        seconds["fit"] = time.time() - started
    for name, argv in arm.evaluations.items():
        if not (arm.run_dir / name).exists():
            started = time.time()
            evaluate(arm, name, argv)
            record_evaluation(arm.run_dir, name, argv, out)
            seconds[name] = time.time() - started
    checkpoint = arm.model_checkpoint()
    for step in arm.then:  # e.g. BadCLIP's patch, optimised against the clean base
        if not Path(step["creates"]).exists():
            run_step([arg.replace("{base}", checkpoint) for arg in flatten(step["command"])])
            if not Path(step["creates"]).exists():
                raise ValueError(f"base.then: the command ran but did not write {step['creates']}")
    if seconds:
        write_provenance(arm, seconds)


def resume_from(run_dir: Path) -> str:
    """``hpc`` when SLURM's preemption checkpoint (``hpc_ckpt_N.ckpt``) is newer than ``last.ckpt``, else ``last``
    (nothing to resume from yet: Lightning starts at step 0)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    preempted = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    if preempted and (not last.exists() or max(p.stat().st_mtime for p in preempted) > last.stat().st_mtime):
        return "hpc"
    return "last"


def evaluate(arm: Arm, name: str, argv: list[str]) -> None:
    """``clbd test`` of the arm's checkpoint, its results kept as ``run_dir/name``."""
    checkpoint = arm.model_checkpoint()
    arm.run_dir.mkdir(parents=True, exist_ok=True)
    run_step(["test", *argv, f"--trainer.default_root_dir={arm.run_dir}", f"--ckpt_path={checkpoint}"])
    metrics = arm.run_dir / "checkpoints" / "metrics.json"
    if arm.checkpoint:  # a given checkpoint: clbd test writes beside it
        metrics = Path(checkpoint).parent / "metrics.json"
    results = json.loads(metrics.read_text())[Path(checkpoint).name]
    (arm.run_dir / name).write_text(json.dumps(results, indent=1) + "\n")
    metrics.unlink()  # the next evaluation of this checkpoint (another attack) writes its own


# ---- provenance ---------------------------------------------------------------------------------------------------
def write_provenance(arm: Arm, seconds: dict[str, float]) -> None:
    """Code, device, library versions, precision and wall times of an arm, beside its results (merged with what an
    earlier call of an interrupted arm wrote)."""
    path = arm.run_dir / PROVENANCE
    record = json.loads(path.read_text()) if path.exists() else {}
    config = yaml.safe_load((arm.run_dir / "config.yaml").read_text()) if (arm.run_dir / "config.yaml").exists() else {}
    trainer = (config or {}).get("trainer") or {}
    wall = record.get("wall_s", {})
    for name, value in seconds.items():
        wall[name] = wall.get(name, 0.0) + value  # an interrupted fit adds each call's part
    record.update(
        {
            "arm": arm.id,
            "code": code_version(),
            "device": device_name(trainer.get("accelerator")),
            "precision": trainer.get("precision"),
            "versions": library_versions(),
            "wall_s": wall,
            "fit_calls": record.get("fit_calls", 0) + ("fit" in seconds),
        }
    )
    record.update(epoch_times(arm.run_dir, wall.get("fit")))
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def code_version() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def device_name(accelerator: str | None) -> str:
    import torch

    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)"


def library_versions() -> dict[str, Any]:
    import lightning
    import open_clip
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "lightning": lightning.__version__,
        "open_clip": open_clip.__version__,
    }


def epoch_times(run_dir: Path, fit_seconds: float | None) -> dict[str, Any]:
    """Per epoch: the median of ``time/train_epoch_s`` and ``time/val_s`` when an epoch timer logged them, else the
    fit's wall time over its epochs (start-up and evaluations included)."""
    finished = run_dir / FINISHED
    epochs = json.loads(finished.read_text()).get("epochs") if finished.exists() else None
    timed: dict[str, list[float]] = {"time/train_epoch_s": [], "time/val_s": []}
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                for key, values in timed.items():
                    if row.get(key):
                        values.append(float(row[key]))
    out: dict[str, Any] = {"epochs": epochs}
    if timed["time/train_epoch_s"]:
        out["epoch_s"] = statistics.median(timed["time/train_epoch_s"])
        out["epoch_s_source"] = "median of time/train_epoch_s (training only)"
        if timed["time/val_s"]:
            out["validation_s"] = statistics.median(timed["time/val_s"])
    elif fit_seconds and epochs:
        out["epoch_s"] = fit_seconds / epochs
        out["epoch_s_source"] = "fit wall time / epochs (start-up and validation included)"
    return out
