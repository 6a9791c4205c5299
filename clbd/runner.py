"""LightningCLI's fit / validate / test as clbd runs them (``clbd fit|validate|test|predict``, and every step of
``clbd demo`` and ``clbd experiment``).

A run lives in one directory, ``trainer.default_root_dir``: ``config.yaml`` (everything the run used),
``metrics.csv``, ``checkpoints/``, ``poison_manifest.jsonl``, ``data_report.json``, ``metrics.json``.
A run directory is never reused silently: a new run where one exists is refused; ``--ckpt_path last`` resumes it,
and only with the same model and data config.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import inspect
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from datamodules import ShardDataModule
from lightning_modules.base import ContrastiveModule
from lightning_modules.deepspeed_setup import prepare_deepspeed
from lightning_modules.safe_checkpoint import check_checkpoint

from .logs import configure_logging
from .run_dir import check_run_dir, consolidate_deepspeed, resolve_checkpoint, write_finished_marker

log = logging.getLogger("clbd.runner")

# Lightning warnings that mislead in what clbd runs, by subcommand; clbd says what is true instead where it matters.
MISLEADING_WARNINGS = {
    # ``--ckpt_path last`` is how a requeued job or an experiment step resumes; on its first start there is nothing
    # yet, and Lightning's hint to set save_last=True is wrong here (clbd sets it). before_fit says so itself.
    "fit": [r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint available'],
    # An evaluation restores the checkpoint's ModelCheckpoint state, which names the training run's folder, and
    # writes no checkpoint: that the evaluation's folder differs says nothing.
    **{command: ["The dirpath has changed from"] for command in ("validate", "test", "predict")},
}


class RunConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` into the run directory; the CLI checked beforehand that this overwrites nothing
    a user made (a new run in a fresh directory, or a resume of the same config)."""


class ContinuedExperimentWriter(ExperimentWriter):
    """Keeps the ``metrics.csv`` it finds: a run's logs are in the run directory itself, and Lightning's writer
    deletes that file when it starts, so a resumed run would lose every row logged before its checkpoint."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def drop_rows_from(self, step: int) -> None:
        """Removes the saved rows of steps ``>= step``: a run resumed at ``step`` logs them again."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [row for row in rows if row.get("step") and int(row["step"]) < step]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)


class RunCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` continues across resumes (``ContinuedExperimentWriter``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuedExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class ContinueMetrics(Callback):
    """At the start of training (after a checkpoint was restored), drops the rows a resumed run will log again."""

    def on_train_start(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger) and trainer.is_global_zero:
                logger.experiment.drop_rows_from(trainer.global_step)


class FinalCheckpoint(Callback):
    """``last.ckpt`` holds the end of training. ModelCheckpoint writes it every ``every_n_train_steps`` only (at
    the end only when it never wrote one), so a run whose length is not a multiple of that interval would end with
    a ``last.ckpt`` up to interval - 1 steps short of the model ``fit_finished.json`` reports."""

    def on_train_end(self, trainer, pl_module) -> None:
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint) or not callback.save_last or callback.dirpath is None:
            return
        # Runs before ModelCheckpoint's own on_train_end, which saves last.ckpt when it never wrote one.
        if callback._last_checkpoint_saved and callback._last_global_step_saved != trainer.global_step:
            trainer.save_checkpoint(
                Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            )


class ClbdCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            ContrastiveModule,
            ShardDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the config the user gave. Lightning would merge the checkpoint's hyper-parameters over it,
        silently; clbd compares the two instead and refuses a resume whose config differs (``check_run_dir``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "{epoch}-{step}",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                # A resume overwrites last.ckpt rather than writing last-v1.ckpt beside a stale last.ckpt.
                "checkpoint.enable_version_counter": False,
                "trainer.default_root_dir": "runs/default",
            }
        )

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            # Training metrics land in the run directory itself (metrics.csv), not lightning_logs/version_N;
            # an evaluation's go to a folder of their own (test/, validate/) and never touch the training log.
            name = "" if self.subcommand == "fit" else str(self.subcommand)
            kwargs["logger"] = RunCSVLogger(save_dir=config["default_root_dir"], name=name, version="")
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        # The model keeps the config that built it, so a checkpoint can be checked against a resume's config.
        if self.subcommand is not None:
            section = self.config[self.subcommand]
            self.model.run_config = {
                "model": _plain(section.get("model")),
                "data": _plain(section.get("data")),
            }

    def _run_subcommand(self, subcommand: str) -> None:
        with warnings.catch_warnings():
            for message in MISLEADING_WARNINGS.get(subcommand, []):
                warnings.filterwarnings("ignore", message=message)
            super()._run_subcommand(subcommand)

    def before_fit(self) -> None:
        run_dir = Path(self.trainer.default_root_dir)
        ckpt_path = self.config["fit"].get("ckpt_path")
        resolved = resolve_checkpoint(ckpt_path, run_dir)
        check_run_dir(run_dir, resolved, ckpt_path, self.model.run_config)
        if ckpt_path == "last" and resolved is None and self.trainer.is_global_zero:
            log.info("--ckpt_path last: no checkpoint in %s yet; a new run starts", run_dir / "checkpoints")
        self.trainer.callbacks[:0] = [ContinueMetrics(), FinalCheckpoint()]
        prepare_deepspeed(self.trainer, self.datamodule, resolved)

    def before_validate(self) -> None:
        self._check_eval_checkpoint("validate")

    def before_test(self) -> None:
        self._check_eval_checkpoint("test")

    def _check_eval_checkpoint(self, subcommand: str) -> None:
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).exists():
            check_checkpoint(ckpt_path)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning unpickles ``ckpt_path`` with ``weights_only=True`` whatever the config says (the checks above
        vetted the file already; this keeps Lightning's own load safe too, e.g. for ``ckpt_path: last``)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in inspect.signature(getattr(self.trainer, subcommand)).parameters:
            kwargs["weights_only"] = True
        return kwargs

    def after_fit(self) -> None:
        consolidate_deepspeed(self.trainer)
        self.model.finish_fit(self.trainer)
        if self.trainer.is_global_zero:
            write_finished_marker(Path(self.trainer.default_root_dir), self.trainer)


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or anything) as plain YAML-able data."""
    if value is None:
        return None
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return yaml.safe_load(yaml.safe_dump(json.loads(json.dumps(value, default=str))))


def deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to the stdout of the moment it is first imported (a warning on a CPU machine):
    importing it here with stdout sent to stderr keeps ``--print_config``'s YAML alone on stdout."""
    if "deepspeed" not in sys.modules and importlib.util.find_spec("deepspeed") is not None:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401


def run(argv: list[str]) -> int:
    """One LightningCLI command (``fit``, ``validate``, ``test``, ``predict`` and its options); 0 on success, 2 on a
    configuration error (one clear line; CLBD_DEBUG=1 shows the traceback)."""
    configure_logging()
    if any(arg.startswith("--print_config") for arg in argv):
        deepspeed_logs_to_stderr()
    command = argv[0] if argv else ""
    # ``clbd fit ...`` hands LightningCLI its own command line as ``args``; LightningCLI warns whenever ``args`` and
    # ``sys.argv`` are both set, which here would be noise on every command.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    try:
        ClbdCLI(args=argv)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Configuration problems (found before compute starts): one clear line; CLBD_DEBUG=1 shows the traceback.
        if os.environ.get("CLBD_DEBUG"):
            raise
        print(f"clbd {command}: error: {exc}", file=sys.stderr)
        return 2
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Every rank leaves the process group together at the end of a command.

    Left to interpreter exit, the group's threads can abort a process ("terminate called without an active
    exception", SIGABRT; seen at the end of a 2-rank gloo run). Lightning's launcher SIGKILLs rank 0 as soon as it
    sees a rank it launched end with a nonzero status, so such an abort while rank 0 was still writing after fit
    (data report, finished marker, consolidation) would kill rank 0, the more likely the slower the machine. The
    barrier holds every rank until rank 0 is done too; the group is then closed, not left to exit.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
