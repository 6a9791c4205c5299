"""CleanCLIP (Bansal et al., ICCV 2023): fine-tune a poisoned CLIP with its multimodal loss plus unimodal ones.

L = lambda_clip * L_CLIP(image, text) + lambda_unimodal * L_uni, with

    L_uni = (L_in(image, image_aug) + L_in(text, text_aug)) / 2

L_CLIP is open_clip's symmetric ``ClipLoss``; each in-modal term is one-directional, as in the authors' code
(``criterion(logits_image_per_augmented_image, target)``): every original view picks its own augmented view among
the augmented views of the global batch (cross-entropy over the rows of ``scale * x @ x_aug.T`` only). Features of
all ranks are gathered with gradient, at the model's own logit scale. The halving follows the authors' code, so
lambda values compare with the paper's ablation. Augmented views come from ``datamodules.CleanCLIPDataModule``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from datamodules.multimodal import CleanCLIPDataModule
from lightning_modules.clip import CLIP
from lightning_modules.losses import distributed_rank_and_world, gather_with_grad, gather_without_grad

from .base import DefenseMixin


def inmodal_loss(
    original: torch.Tensor, augmented: torch.Tensor, scale: torch.Tensor, with_grad: bool = True
) -> torch.Tensor:
    """CleanCLIP's one-directional in-modal InfoNCE for this rank's rows.

    ``original`` and ``augmented`` are this rank's ``[n, d]`` normalised features of the same samples; each original
    row is scored against the augmented views of the global batch (gathered with gradient) and must pick its own:
    ``mean_i CE(scale * o_i @ A.T, own index of i)``. Not the transposed direction (augmented picks original).
    With DDP's gradient average the update equals one process on the global batch (``with_grad=False``: the
    authors' gather, which drops the gradient through the other ranks' copies).
    """
    rank, _ = distributed_rank_and_world()
    columns = (gather_with_grad if with_grad else gather_without_grad)(augmented)
    logits = scale * original @ columns.T
    labels = torch.arange(original.shape[0], device=original.device) + rank * original.shape[0]
    return F.cross_entropy(logits, labels)


class CleanCLIP(DefenseMixin, CLIP):
    """CleanCLIP fine-tuning of a poisoned clbd CLIP checkpoint; before / after CA and ASR in defense_metrics.json.

    Args:
        checkpoint: the poisoned run's checkpoint (``RUN/checkpoints/last.ckpt``); it is only read.
        lambda_clip: weight of the multimodal CLIP loss (paper: 1).
        lambda_unimodal: weight of the unimodal image / text loss (paper: 1; ablation 0.5 ... 8).
        model_name: must be the poisoned run's model.
        zero_shot_templates: prompt templates of the zero-shot evaluation (the authors': ImageNet's).
        lr, weight_decay, betas, eps, warmup_steps, warmup_fraction: CleanCLIP's own defaults, the paper's
            fine-tuning: AdamW (``CLIP``'s), lr 1e-5, weight decay 0.1, betas (0.9, 0.999) and eps 1e-8 of the
            authors' code, 50 warm-up steps as in their README (so no warm-up fraction).
        **kwargs: ``lightning_modules.CLIP``'s other arguments (``grad_checkpointing``, ``local_loss``, ...) and
            optimiser settings (``optimizer``, ``momentum``, ``min_lr_ratio``, ``compile``), with their defaults.
    """

    defense_name = "cleanclip"
    repairs = ("CLIP",)
    datamodule_class: type = CleanCLIPDataModule

    def __init__(
        self,
        checkpoint: str | None = None,
        lambda_clip: float = 1.0,
        lambda_unimodal: float = 1.0,
        model_name: str = "RN50",
        zero_shot_templates: str = "openai_imagenet",
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 50,
        warmup_fraction: float = 0.0,
        **kwargs: Any,
    ):
        if checkpoint is None:
            raise ValueError(
                "model.checkpoint: not set; give the poisoned run's checkpoint, e.g. "
                "--model.init_args.checkpoint runs/RUN/checkpoints/last.ckpt"
            )
        for name, value in (("lambda_clip", lambda_clip), ("lambda_unimodal", lambda_unimodal)):
            if value < 0:
                raise ValueError(f"model.{name} must be >= 0, got {value}")
        # A checkpoint's hparams carry CLIP's pretrained=None; any file would contradict ``checkpoint``.
        if kwargs.pop("pretrained", None) is not None:
            raise ValueError("model.pretrained: CleanCLIP starts from model.checkpoint, not from a pretrained file")
        super().__init__(
            model_name=model_name,
            pretrained=None,
            zero_shot_templates=zero_shot_templates,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            warmup_steps=warmup_steps,
            warmup_fraction=warmup_fraction,
            **kwargs,
        )
        self.init_defense(checkpoint)

    # ---- checks before any compute ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_data(self.trainer.datamodule)
        super().setup(stage)

    def check_data(self, datamodule: Any) -> None:
        """The data module this defense needs and the same model (the attack: ``DefenseMixin.check_attack``)."""
        wanted = self.datamodule_class
        if not isinstance(datamodule, wanted):
            raise ValueError(
                f"data: {self.defense_name} needs {wanted.__module__.split('.')[0]}.{wanted.__name__} (augmented "
                f"views per sample), got {type(datamodule).__name__}"
            )
        if datamodule.model_name != self.hparams.model_name:
            raise ValueError(
                f"data.model_name={datamodule.model_name!r} differs from model.model_name={self.hparams.model_name!r}"
            )

    # ---- training -----------------------------------------------------------------------------------------------
    def encode_views(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Features of the images, their augmented views, the captions and their augmented captions (one pass
        per modality, as the authors' code)."""
        n = batch["image"].shape[0]
        images = self.encode_image(torch.cat([batch["image"], batch["image_aug"]]))
        texts = self.encode_text(torch.cat([batch["text"], batch["text_aug"]]))
        return {"image": images[:n], "image_aug": images[n:], "text": texts[:n], "text_aug": texts[n:]}

    def cleanclip_losses(self, features: dict[str, torch.Tensor], scale: torch.Tensor) -> dict[str, torch.Tensor]:
        clip = self.loss(features["image"], features["text"], scale)
        with_grad = self.hparams.gather_with_grad
        unimodal = 0.5 * (
            inmodal_loss(features["image"], features["image_aug"], scale, with_grad)
            + inmodal_loss(features["text"], features["text_aug"], scale, with_grad)
        )
        return {"clip": clip, "unimodal": unimodal}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        features = self.encode_views(batch)
        scale = self.model.logit_scale.exp()
        losses = self.cleanclip_losses(features, scale)
        loss = self.hparams.lambda_clip * losses["clip"] + self.hparams.lambda_unimodal * losses["unimodal"]
        loss = loss + self.extra_loss(batch, features, scale, losses)
        self.log_losses(loss, losses, scale, batch["image"].shape[0])
        return loss

    def extra_loss(
        self,
        batch: dict[str, Any],
        features: dict[str, torch.Tensor],
        scale: torch.Tensor,
        losses: dict[str, torch.Tensor],
    ) -> torch.Tensor | float:
        """Further weighted terms of a subclass (TA-Cleaner); add their unweighted values to ``losses``."""
        return 0.0

    def log_losses(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], scale: torch.Tensor, size: int) -> None:
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value.detach(), on_step=True, on_epoch=True, batch_size=size)
        self.log("train/logit_scale", scale.detach(), on_step=True, on_epoch=False)

    def defense_report(self) -> dict[str, Any]:
        hp = self.hparams
        return {"lambda_clip": hp.lambda_clip, "lambda_unimodal": hp.lambda_unimodal}
