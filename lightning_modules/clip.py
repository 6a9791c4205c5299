"""CLIP: any open_clip model by name, open_clip's contrastive loss across ranks, zero-shot CA and ASR."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import open_clip
import torch
from lightning.pytorch.utilities import move_data_to_device
from torchmetrics.classification import MulticlassAccuracy

from datamodules.openclip_configs import open_clip_config

from .base import ContrastiveModule, nan_if_none
from .checkpoints import consolidate
from .losses import clip_loss
from .metrics import AttackSuccessRate, BackdoorPredictions, asr_definition, backdoor_headlines
from .pretrained_weights import cache_dir, ensure_cached, hub_offline, is_tag, offline
from .safe_checkpoint import load_checkpoint
from .zero_shot import build_zero_shot_classifier, templates_by_name


class _RandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def without_random_init_warning():
    """open_clip warns "No pretrained weights loaded ... initialized randomly" whenever it builds a model without a
    tag's weights. Without a tag clbd asks for none on purpose (a clbd checkpoint is loaded next, a defense loads the
    poisoned one, or the run trains from scratch), so the warning, repeated at every step of a demo, misleads."""
    root, quiet = logging.getLogger(), _RandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def open_clip_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The open_clip model's weights in a clbd checkpoint (the module keeps it as ``model``)."""
    return {k[len("model.") :]: v for k, v in state["state_dict"].items() if k.startswith("model.")}


def clbd_clip_weights(path: str) -> dict[str, torch.Tensor] | None:
    """The open_clip weights inside a clbd checkpoint (a CLIP run's or a CLIP defense's), or None when ``path`` is
    not one (open_clip's own ``.pt`` / ``.bin`` / ``.safetensors`` files). Loaded with the safe unpickler."""
    if not (Path(path).is_dir() or Path(path).suffix == ".ckpt"):
        return None
    state = load_checkpoint(consolidate(Path(path)))  # a DeepSpeed folder: its fp32 copy
    if not (isinstance(state, dict) and "clbd_run_config" in state and "state_dict" in state):
        return None
    weights = open_clip_weights(state)
    if not weights:
        raise ValueError(f"model.pretrained: {path} is a clbd checkpoint without CLIP weights (an image-SSL run?)")
    return weights


def clip_towers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """An open_clip model's image tower and the transformer of its text tower (``transformer`` in ``CLIP``,
    ``text`` in ``CustomTextCLIP``): where nearly all of its compute is."""
    text = getattr(model, "text", None)
    text = getattr(model, "transformer", None) if text is None else text  # no truth test: a Module may define len
    return [model.visual] + ([text] if text is not None else [])


class CLIP(ContrastiveModule):
    """Contrastive image-text pretraining / fine-tuning with open_clip models.

    Args:
        model_name: an open_clip model (``RN50``, ``ViT-B-32``, ...) or clbd's tiny ``clip-tiny-vit`` /
            ``clip-tiny-rn`` for CPU runs and tests.
        pretrained: where to start from: an open_clip pretrained tag of ``model_name`` (``openai``,
            ``laion2b_s34b_b79k``, ...; open_clip's download and cache, the cache alone under ``HF_HUB_OFFLINE=1``:
            ``pretrained_weights``), a local open_clip weights file, or a clbd CLIP run's checkpoint (its
            ``last.ckpt``, or a DeepSpeed folder through its consolidated copy) to fine-tune a model clbd trained;
            None trains from scratch.
        grad_checkpointing: recompute activations in backward (less memory, ~30% more compute).
        local_loss: each rank scores its own rows against the gathered batch (open_clip's ``--local-loss``).
        gather_with_grad: gather features across ranks keeping the gradient (exact global-batch gradient).
        max_logit_scale: the learned temperature is clamped to ``ln(max_logit_scale)`` after every step.
        zero_shot_templates: prompt templates of the zero-shot monitor (``cifar10``, ``openai_imagenet``, ...).
        asr_exclude_target: count only triggered images whose true class is not the target (see ``metrics``).
        optimizer, lr, weight_decay, betas, eps, warmup_fraction: CLIP's own defaults, open_clip's: AdamW, lr 5e-4,
            weight decay 0.2 (not on norms, biases, logit scale), betas (0.9, 0.98), eps 1e-6, warm-up over 5% of the
            steps.
        **optim: the other optimiser settings (``ContrastiveModule``'s, with its defaults: momentum, warmup_steps,
            min_lr_ratio, optimizer_impl, compile). ``compile`` compiles the image tower and the text tower's
            transformer (``clip_towers``), whatever calls them.
    """

    def __init__(
        self,
        model_name: str = "clip-tiny-vit",
        pretrained: str | None = None,
        grad_checkpointing: bool = False,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        max_logit_scale: float = 100.0,
        zero_shot_templates: str = "cifar10",
        asr_exclude_target: bool = True,
        optimizer: str = "adamw",
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_fraction: float = 0.05,
        **optim: Any,
    ):
        super().__init__(
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            warmup_fraction=warmup_fraction,
            **optim,
        )
        open_clip_config(model_name)  # a clear error for an unknown name, before anything is built
        templates_by_name(zero_shot_templates)
        tag = pretrained is not None and is_tag(model_name, pretrained)
        if tag:
            ensure_cached(model_name, pretrained)  # downloaded (online) or found in the cache, or a clear error
        elif pretrained is not None and not Path(pretrained).exists():
            raise FileNotFoundError(
                f"model.pretrained: no checkpoint file at {pretrained} (a local file, or an open_clip pretrained tag "
                f"of {model_name} such as 'openai')"
            )
        self.save_hyperparameters()
        clbd_weights = clbd_clip_weights(pretrained) if pretrained is not None and not tag else None
        quiet = contextlib.nullcontext() if tag else without_random_init_warning()
        with hub_offline(offline()), quiet:  # a tag: open_clip finds it in the cache just filled (its checks too)
            model = open_clip.create_model(
                model_name, pretrained=None if clbd_weights is not None else pretrained, cache_dir=cache_dir()
            )
        if clbd_weights is not None:
            try:
                model.load_state_dict(clbd_weights)
            except RuntimeError as exc:  # missing, unexpected or mis-shaped weights
                first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
                raise ValueError(
                    f"model.pretrained: {pretrained} does not fit {model_name} ({first}); was it trained with "
                    "another model_name?"
                ) from None
        # The towers, not the model: training, evaluation and the defenses call encode_image / encode_text, which
        # never go through the model's forward (compiling the model alone compiled nothing).
        for tower in clip_towers(model):
            self.maybe_compile(tower)
        self.model = model
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.loss = clip_loss(local_loss=local_loss, gather_with_grad=gather_with_grad)
        self._classifier: torch.Tensor | None = None
        self._metrics: dict[str, Any] = {}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)

    def clip_outputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(batch["image"]), self.encode_text(batch["text"]), self.model.logit_scale.exp()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image_features, text_features, scale = self.clip_outputs(batch)
        loss = self.loss(image_features, text_features, scale)
        size = batch["image"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train/logit_scale", scale.detach(), on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # open_clip's rule: clamp the learned temperature after each step
            self.model.logit_scale.clamp_(0, math.log(self.hparams.max_logit_scale))

    # ---- zero-shot evaluation -----------------------------------------------------------------------------
    def zero_shot_classifier(self) -> torch.Tensor:
        names = self.trainer.datamodule.class_names
        if not names:
            raise ValueError("data: the eval set has no class names (index 'classes' or data.class_names)")
        templates = templates_by_name(self.hparams.zero_shot_templates)
        with torch.no_grad():
            return build_zero_shot_classifier(self.model, self.tokenizer, names, templates, self.device)

    def _start_eval(self) -> None:
        datamodule = self.trainer.datamodule
        num_classes = len(datamodule.class_names or [])
        self._classifier = self.zero_shot_classifier()
        target = datamodule.target_index
        exclude = self.hparams.asr_exclude_target
        self._metrics = {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
        if target is not None:
            self._metrics["asr_top1"] = AttackSuccessRate(target, top_k=1, exclude_target_class=exclude)
            self._metrics["asr_top10"] = AttackSuccessRate(
                target, top_k=min(10, num_classes), exclude_target_class=exclude
            )
            self._metrics["backdoor"] = BackdoorPredictions(target, num_classes)
        self._metrics = {k: m.to(self.device) for k, m in self._metrics.items()}
        self._n_images = 0

    def _eval_step(self, batch: dict[str, Any]) -> None:
        logits = self.encode_image(batch["image"]) @ self._classifier
        labels = batch["label"]
        self._metrics["top1"].update(logits, labels)
        self._metrics["top5"].update(logits, labels)
        if "asr_top1" in self._metrics and "image_triggered" in batch:
            triggered = self.encode_image(batch["image_triggered"]) @ self._classifier
            self._metrics["asr_top1"].update(triggered, labels)
            self._metrics["asr_top10"].update(triggered, labels)
            control = (
                (self.encode_image(batch["image_control"]) @ self._classifier).argmax(1)
                if "image_control" in batch
                else None
            )
            self._metrics["backdoor"].update(labels, logits.argmax(1), triggered.argmax(1), control)
        self._n_images += labels.numel()

    def _finish_eval(self) -> dict[str, Any]:
        results: dict[str, Any] = {
            "method": "clip",
            "model_name": self.hparams.model_name,
            "zero_shot_templates": self.hparams.zero_shot_templates,
            "clean_accuracy_top1": self._metrics["top1"].compute().item(),
            "clean_accuracy_top5": self._metrics["top5"].compute().item(),
            "n_images": int(self.all_ranks_sum(self._n_images)),
        }
        if "asr_top1" in self._metrics:
            datamodule = self.trainer.datamodule
            top1, top10 = self._metrics["asr_top1"].summary(), self._metrics["asr_top10"].summary()
            results["attack"] = {
                "name": datamodule.attack.name,
                "target": datamodule.target_index,
                "target_name": datamodule.class_names[datamodule.target_index],
            }
            results["asr_top1"] = top1["asr"]
            results["asr_top10"] = top10["asr"]
            results["asr_images"] = top1["total"]
            results["asr_definition"] = asr_definition(top1)
            if self._metrics["backdoor"].update_count:
                results["backdoor"] = self._metrics["backdoor"].compute()
        for metric in self._metrics.values():
            metric.reset()
        return results

    def log_results(self, stage: str, results: dict[str, Any]) -> None:
        self.log(f"{stage}/zs_top1", results["clean_accuracy_top1"], sync_dist=False)
        self.log(f"{stage}/zs_top5", results["clean_accuracy_top5"], sync_dist=False)
        for key in ("asr_top1", "asr_top10"):
            if key in results:
                self.log(f"{stage}/{key}", nan_if_none(results[key]), sync_dist=False)
        for key, value in backdoor_headlines(results.get("backdoor")).items():
            self.log(f"{stage}/{key}", nan_if_none(value), sync_dist=False)

    def evaluate(self, loader) -> dict[str, Any]:
        """Zero-shot CA and ASR on ``loader``, outside Lightning's loops (a defense's before / after)."""
        was_training = self.training
        self.eval()
        self._start_eval()
        with torch.no_grad():
            for batch in loader:
                self._eval_step(move_data_to_device(batch, self.device))
        results = self._finish_eval()
        self.train(was_training)
        return results

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self.log_results("val", self._finish_eval())

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._finish_eval()
        self.log_results("test", self.test_results)
        self.write_metrics(self.test_results)
