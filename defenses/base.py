"""What every defense shares: start from a poisoned clbd checkpoint, measure before and after, never touch the source.

A defense is a LightningModule subclass of the pretraining module it repairs (``CLIP``, or ``ImageSSLModule`` for
every image method) with ``DefenseMixin`` in front. ``clbd fit --config configs/defense/X.yaml --model.init_args.checkpoint RUN/last.ckpt``
fine-tunes it; at fit start the untouched poisoned model is evaluated on the data module's test split (with the
attack's test-time trigger), at fit end the defended one, with the same code as ``clbd test``. Both go to
``defense_metrics.json`` in the defense's own run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from lightning_modules.checkpoints import consolidate
from lightning_modules.safe_checkpoint import load_checkpoint

from .recorded_classes import recorded_class

DEFENSE_METRICS = "defense_metrics.json"


def load_poisoned_checkpoint(path: str, expected: tuple[str, ...]) -> dict[str, Any]:
    """A clbd checkpoint of one of the ``expected`` module classes or a subclass of one, or a clear error naming the
    field."""
    checkpoint = Path(path)
    if not checkpoint.exists():
        raise FileNotFoundError(f"model.checkpoint: no checkpoint file at {checkpoint}")
    checkpoint = consolidate(checkpoint)  # a DeepSpeed folder: its fp32 copy
    state = load_checkpoint(checkpoint)  # weights_only: a crafted file is refused, never run
    if not isinstance(state, dict):
        raise ValueError(f"model.checkpoint: {checkpoint} is not a Lightning checkpoint (no dict at its top)")
    config = state.get("clbd_run_config") or {}
    class_path = (config.get("model") or {}).get("class_path")
    if not class_path:
        raise ValueError(
            f"model.checkpoint: {checkpoint} holds a non-clbd model (no recorded model.class_path); this defense "
            f"repairs {' or '.join(expected)} models"
        )
    # Looked up among clbd's own classes, never imported by name: the file does not choose what clbd imports.
    cls = recorded_class(class_path, checkpoint, "model.checkpoint")
    if not set(expected) & {base.__name__ for base in cls.__mro__}:
        raise ValueError(
            f"model.checkpoint: {checkpoint} holds a {cls.__name__} model; this defense repairs "
            f"{' or '.join(expected)} models"
        )
    return state


class DefenseMixin:
    """Before/after evaluation and the defense's results file. Put it before the module class in the bases."""

    defense_name: str = ""
    repairs: tuple[str, ...] = ()

    def init_defense(self, checkpoint: str) -> dict[str, Any]:
        """Load the poisoned weights into this module (call at the end of ``__init__``); returns the checkpoint."""
        state = load_poisoned_checkpoint(checkpoint, self.repairs)
        weights = self.repaired_weights(state["state_dict"])
        missing, unexpected = self.load_state_dict(weights, strict=False)
        own = [k for k in missing if not self.is_defense_parameter(k)]
        if own or unexpected:
            raise ValueError(
                f"model.checkpoint: weights do not fit this model (missing {own[:3]}, unexpected {unexpected[:3]}); "
                "was it trained with another model_name / backbone?"
            )
        self.source_checkpoint = str(Path(checkpoint).resolve())
        self.source_run_config = state.get("clbd_run_config")
        self.before_results: dict[str, Any] | None = None
        return state

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.check_attack(self.trainer.datamodule)

    def check_attack(self, datamodule: Any) -> None:
        """Before any compute: the poisoned run's attack is composed (ASR is measured with its test trigger) and
        the eval set names its target class."""
        attack = datamodule.attack
        if attack is None:
            raise ValueError(
                "data.attack: not set; a defense measures ASR with the poisoned run's attack: compose the same "
                "configs/attack/*.yaml (e.g. --config configs/attack/badnet_clip.yaml)"
            )
        names = datamodule.class_names
        if not names:
            raise ValueError("data: the eval set has no class names (index 'classes' or data.class_names)")
        if datamodule.target_index is None:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            raise ValueError(
                f"data.attack.target_class={attack.target_class!r} is not one of the eval classes "
                f"({len(names)} classes: {shown}); ASR needs the target among the eval classes "
                "(data.val_shards / data.test_shards / data.class_names)"
            )
        self.check_attack_matches_source(attack, names)

    def check_attack_matches_source(self, attack: Any, class_names: list[str]) -> None:
        """The attack composed here must be the poisoned run's (its class and target), when that run recorded one.

        A target given once by name and once by index counts as the same when the eval classes map one to the other.
        """
        source = ((self.source_run_config or {}).get("data") or {}).get("init_args") or {}
        recorded = source.get("attack")
        if not isinstance(recorded, dict) or "class_path" not in recorded:
            return
        name = recorded_class(recorded["class_path"], self.source_checkpoint, "model.checkpoint").__name__
        target = (recorded.get("init_args") or {}).get("target_class")
        same_target = target is None or target == attack.target_class or _same_class(target, attack, class_names)
        if name != type(attack).__name__ or not same_target:
            raise ValueError(
                f"data.attack: {type(attack).__name__} with target {attack.target_class!r}, but the poisoned run "
                f"used {name} with target {target!r}; compose the attack config of that run"
            )

    def repaired_weights(self, weights: dict[str, Any]) -> dict[str, Any]:
        """The part of the poisoned state dict this defense loads (all of it by default)."""
        return weights

    def is_defense_parameter(self, name: str) -> bool:
        """Parameters a defense adds on top of the repaired model (not in the poisoned checkpoint)."""
        return False

    def eval_loaders(self):
        """What the repaired module's ``evaluate`` takes (CLIP: the test loader; image methods: [bank, test])."""
        loaders = self.trainer.datamodule.test_dataloader()
        return loaders

    def check_not_overwriting(self) -> None:
        run_dir = Path(self.trainer.default_root_dir).resolve()
        if Path(self.source_checkpoint).is_relative_to(run_dir):
            raise ValueError(
                f"trainer.default_root_dir {run_dir} holds the poisoned checkpoint {self.source_checkpoint}; "
                "a defense writes into its own run directory"
            )

    def on_fit_start(self) -> None:
        self.check_not_overwriting()
        if self.before_results is None:  # a resumed defense keeps the first measurement (from its checkpoint)
            self.before_results = self.evaluate(self.eval_loaders())

    def finish_fit(self, trainer) -> None:
        super().finish_fit(trainer)
        after = self.evaluate(self.eval_loaders())
        self.write_defense_metrics(after)

    @rank_zero_only
    def write_defense_metrics(self, after: dict[str, Any]) -> Path:
        report = {
            "defense": self.defense_name,
            "poisoned_checkpoint": self.source_checkpoint,
            "before": self.before_results,
            "after": after,
            "extra": self.defense_report(),
        }
        path = Path(self.trainer.default_root_dir) / DEFENSE_METRICS
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    def defense_report(self) -> dict[str, Any]:
        """Defense-specific findings (detection scores, inverted trigger paths, ...)."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["clbd_defense"] = {"source": self.source_checkpoint, "before": self.before_results}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.before_results = (checkpoint.get("clbd_defense") or {}).get("before")


def _same_class(recorded_target: int | str, attack: Any, class_names: list[str]) -> bool:
    """Whether the recorded target (index or name) and the attack's name the same eval class."""

    def index(target: int | str) -> int | None:
        if isinstance(target, int):
            return target if 0 <= target < len(class_names) else None
        return class_names.index(target) if target in class_names else None

    mine = index(attack.target_class)
    return mine is not None and mine == index(recorded_target)
