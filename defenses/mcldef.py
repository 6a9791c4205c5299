"""MCLDef (Yue et al., arXiv 2205.04411): invert the trigger, then purify by model-contrastive learning.

Stage 1 (``on_fit_start``, right after the before-measurement): Neural-Cleanse inversion of the target class's
trigger on the small clean training set, through the frozen backdoored model ``f`` (image methods: encoder + a linear
probe trained on the clean set's labels; CLIP: the zero-shot head of the eval classes). It runs once: the result
travels in every checkpoint, so a resumed run skips it.

Stage 2 (the training loop): with ``x'`` the clean image stamped with the inverted trigger,

    z = f_theta(x'),  z+ = f_bd(x),  z- = f_bd(x')
    L = -log( e^{cos(z, z+)/tau} / (e^{cos(z, z+)/tau} + e^{cos(z, z-)/tau}) ),  tau = 0.5

``f_bd`` is a frozen copy of the backdoored encoder. As in the authors' code (Zhihao151/MCL, ``train_step``), this is
the whole loss: no clean-pair or classification term is added.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.views import CLIPPreprocess
from lightning_modules.clip import CLIP
from lightning_modules.image_ssl import ImageSSLModule
from lightning_modules.probes import fit_linear_probe

from .base import DefenseMixin
from .trigger_inversion import (
    Classifier,
    InversionConfig,
    InvertedTrigger,
    PixelNormalizer,
    compare_with_attack_trigger,
    invert_trigger,
    save_trigger_pngs,
    trigger_success,
)

log = logging.getLogger("clbd.defenses")


class FrozenCopy:
    """A frozen, eval-mode deep copy of a module, kept OUTSIDE the LightningModule's module tree.

    It is not in ``state_dict()`` or ``parameters()``, DDP does not wrap it, the optimiser never sees it and
    ``train()`` does not flip it. It is made in ``__init__`` right after the poisoned weights are loaded, so a run
    resumed from a defense checkpoint rebuilds the same backdoored copy from ``model.checkpoint``.
    """

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def __call__(self, inputs: Tensor) -> Tensor:
        first = next(self.module.parameters(), None)
        if first is not None and first.device != inputs.device:
            self.module.to(inputs.device)
        with torch.no_grad():
            return self.module(inputs)


@contextmanager
def frozen(module: nn.Module):
    """Eval mode and no parameter gradients inside the block (gradients still reach the inputs)."""
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def model_contrastive_loss(z: Tensor, positive: Tensor, negative: Tensor, temperature: float) -> Tensor:
    """MCLDef's loss: each row's positive (index 0) against its one negative, cosine similarities over tau."""
    logits = torch.stack([F.cosine_similarity(z, positive, dim=-1), F.cosine_similarity(z, negative, dim=-1)], 1)
    return F.cross_entropy(logits / temperature, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


class MCLDefMixin(DefenseMixin):
    """The two MCLDef stages; subclasses say what the encoder, the clean image and the inversion head are."""

    defense_name = "mcldef"
    trained_part: str = ""  # what stage 2 trains, for the report

    # ---- what each repaired module supplies ------------------------------------------------------------------
    def backdoored_source(self) -> nn.Module:
        """The encoder whose frozen copy is f_bd (taken right after the poisoned weights are loaded)."""
        raise NotImplementedError

    def purified_features(self, images: Tensor) -> Tensor:
        """f_theta: features of the encoder being purified."""
        raise NotImplementedError

    def clean_images(self, batch: dict[str, Any]) -> Tensor:
        """The normalised clean images of a training batch."""
        raise NotImplementedError

    def pixel_normalizer(self) -> PixelNormalizer:
        raise NotImplementedError

    def inversion_classifier(self, images: Tensor, labels: Tensor) -> tuple[Classifier, dict[str, Any]]:
        """The frozen backdoored classifier f for stage 1, and a description of it for the report."""
        raise NotImplementedError

    # ---- set-up ----------------------------------------------------------------------------------------------
    def init_mcldef(
        self,
        checkpoint: str | None,
        temperature: float,
        inversion: InversionConfig,
        inversion_samples: int,
    ) -> None:
        if checkpoint is None:
            raise ValueError(
                "model.checkpoint: give the poisoned checkpoint to repair (--model.init_args.checkpoint RUN/last.ckpt)"
            )
        if not temperature > 0:
            raise ValueError(f"model.mcl_temperature must be > 0, got {temperature}")
        if inversion_samples < 1:
            raise ValueError(f"model.inversion_samples must be >= 1, got {inversion_samples}")
        inversion.validate()
        self.init_defense(checkpoint)
        self.mcl_temperature = temperature
        self.inversion_config = inversion
        self.inversion_samples = inversion_samples
        self.backdoored = FrozenCopy(self.backdoored_source())
        self.inverted: InvertedTrigger | None = None
        self.inversion_report: dict[str, Any] = {}
        self._stamp_cache: tuple[Tensor, Tensor] | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        if datamodule.poison_train:
            log.warning("MCLDef: data.poison_train is true, so the purification set is poisoned (the paper's is clean)")

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the before-measurement
        if self.inverted is None:  # a resumed run has it from its checkpoint
            self.inverted, self.inversion_report = self.run_inversion()

    # ---- stage 1 ---------------------------------------------------------------------------------------------
    def run_inversion(self) -> tuple[InvertedTrigger, dict[str, Any]]:
        """Stage 1 on rank 0's share of the clean set; every rank gets rank 0's trigger."""
        datamodule = self.trainer.datamodule
        target = datamodule.target_index
        # Fixed seeds inside, and the global generator left as it was (the loader's worker seeds draw from it).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            images, labels, keys = self._collect_clean_set(datamodule.train_batches(self.device))
            was_training = self.training
            self.eval()
            try:
                classify, head = self.inversion_classifier(images, labels)
                normalizer = self.pixel_normalizer()
                # success over non-target images only (target-class images are "target" without a trigger)
                trigger = invert_trigger(classify, images, target, normalizer, self.inversion_config, labels)
                success = trigger_success(classify, images, labels, target, normalizer, trigger)
            finally:
                self.train(was_training)
        report: dict[str, Any] = {
            "target": target,
            "target_name": datamodule.class_names[target],
            "classifier": head,
            "images": int(images.shape[0]),
            "non_target_images": int((labels != target).sum()),  # what the inversion draws and its success counts
            "inversion_success": trigger.success,
            "success_on_clean_set": success["rate"],
            "success_images": success["images"],
            "reached_success_bound": trigger.reached_bound,
            "success_bound": self.inversion_config.success_bound,
            "final_cost": trigger.final_cost,
            "steps": trigger.steps,
            "history": trigger.history,
            "comparison_with_attack_trigger": compare_with_attack_trigger(
                trigger.mask, datamodule.attack.test_trigger_box, keys
            ),
        }
        trigger, report = self.trainer.strategy.broadcast((trigger, report), src=0)
        if self.trainer.is_global_zero:
            report["pngs"] = save_trigger_pngs(trigger, Path(self.trainer.default_root_dir))
        log.info(
            "MCLDef inversion: target %s, success %.3f, mask L1 %.1f px (true trigger %.1f px)",
            report["target_name"],
            trigger.success,
            trigger.mask_l1,
            report["comparison_with_attack_trigger"]["true_trigger_area"],
        )
        return trigger, report

    def _collect_clean_set(self, loader) -> tuple[Tensor, Tensor, list[str]]:
        """Up to ``inversion_samples`` clean training images (normalised, on this device), labels and keys."""
        images, labels, keys = [], [], []
        held = 0
        for batch in loader:
            chunk = self.clean_images(batch)
            images.append(chunk.to(self.device))
            labels.append(torch.as_tensor(batch["label"]).to(self.device))
            keys.extend(batch["key"])
            held += chunk.shape[0]
            if held >= self.inversion_samples:
                break
        if not images:
            raise ValueError("data.train_shards: the clean training set gave no images for the trigger inversion")
        n = min(held, self.inversion_samples)
        return torch.cat(images)[:n], torch.cat(labels)[:n], keys[:n]

    # ---- stage 2 ---------------------------------------------------------------------------------------------
    def stamp(self, images: Tensor) -> Tensor:
        """Clean normalised images with the inverted trigger blended in (pixel space)."""
        assert self.inverted is not None, "stage 1 (on_fit_start) sets the inverted trigger"
        if self._stamp_cache is None or self._stamp_cache[0].device != images.device:
            self._stamp_cache = (self.inverted.mask.to(images.device), self.inverted.pattern.to(images.device))
        mask, pattern = self._stamp_cache
        return self.pixel_normalizer().stamp(images, mask, pattern)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = self.clean_images(batch)
        stamped = self.stamp(images)
        z = self.purified_features(stamped)
        positive, negative = self.backdoored(images), self.backdoored(stamped)
        loss = model_contrastive_loss(z, positive, negative, self.mcl_temperature)
        size = images.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        with torch.no_grad():
            self.log("train/cos_positive", F.cosine_similarity(z, positive, dim=-1).mean(), batch_size=size)
            self.log("train/cos_negative", F.cosine_similarity(z, negative, dim=-1).mean(), batch_size=size)
        return loss

    # ---- results and checkpoints -----------------------------------------------------------------------------
    def defense_report(self) -> dict[str, Any]:
        return {
            "inverted_trigger": self.inversion_report,
            "purification": {
                "loss": "model-contrastive, positive f_bd(x), negative f_bd(x'); no clean-pair term (authors' code)",
                "temperature": self.mcl_temperature,
                "trained": self.trained_part,
                "train_fraction": self.trainer.datamodule.train_fraction,
                "poison_train": self.trainer.datamodule.poison_train,
            },
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.inverted is not None:
            checkpoint["clbd_mcldef"] = {"trigger": self.inverted.state(), "report": self.inversion_report}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("clbd_mcldef")
        if saved is not None:
            self.inverted = InvertedTrigger.from_state(saved["trigger"])
            self.inversion_report = saved["report"]
            self._stamp_cache = None


class MCLDefImage(MCLDefMixin, ImageSSLModule):
    """MCLDef on the encoder of any poisoned image method (SimCLR, MoCo v2, BYOL, SimSiam). f for the inversion:
    encoder + a linear probe on the clean set's labels.

    Only the encoder is loaded and purified: the method's heads, momentum networks and queue are used neither by the
    loss nor by evaluation.

    Args:
        checkpoint: the poisoned checkpoint of an image method (``clbd fit`` output); never written to.
        mcl_temperature: tau of the model-contrastive loss (0.5 in the paper).
        inversion_steps: Adam steps of the trigger inversion (stage 1).
        inversion_batch_size: clean images per inversion step.
        inversion_lr: Adam learning rate of the mask and pattern logits (Neural Cleanse: 0.1).
        inversion_cost: initial weight of the mask's L1 norm (Neural Cleanse: 1e-3; adjusted during the run).
        inversion_success_bound: share of stamped images that must reach the target for a mask to count.
        inversion_check_every: steps per check of the cost schedule (Neural Cleanse checks once per epoch).
        inversion_patience: checks in a row before the cost is raised or lowered (Neural Cleanse: 5).
        inversion_seed: seeds the initial mask / pattern and the inversion's mini-batches.
        inversion_samples: clean training images held in memory for the inversion (the authors use their whole
            5% split: 2,500 CIFAR-10 images).
        **image: the encoder of the poisoned model (backbone, cifar_stem, width: must match its checkpoint), the
            evaluation and the optimiser.
    """

    repairs = ("ImageSSLModule",)
    trained_part = "encoder"

    def __init__(
        self,
        checkpoint: str | None = None,
        mcl_temperature: float = 0.5,
        inversion_steps: int = 1000,
        inversion_batch_size: int = 128,
        inversion_lr: float = 0.1,
        inversion_cost: float = 1e-3,
        inversion_success_bound: float = 0.99,
        inversion_check_every: int = 20,
        inversion_patience: int = 5,
        inversion_seed: int = 0,
        inversion_samples: int = 2500,
        **image: Any,
    ):
        super().__init__(**image)
        inversion = InversionConfig(
            steps=inversion_steps,
            batch_size=inversion_batch_size,
            lr=inversion_lr,
            init_cost=inversion_cost,
            success_bound=inversion_success_bound,
            check_every=inversion_check_every,
            patience=inversion_patience,
            seed=inversion_seed,
        )
        self.init_mcldef(checkpoint, mcl_temperature, inversion, inversion_samples)

    def repaired_weights(self, weights: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in weights.items() if name.startswith("encoder.")}

    def optimized_module(self) -> nn.Module:
        return self.encoder

    def backdoored_source(self) -> nn.Module:
        return self.encoder

    def purified_features(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def clean_images(self, batch: dict[str, Any]) -> Tensor:
        return batch["views"][0]

    def pixel_normalizer(self) -> PixelNormalizer:
        augmentation = self.trainer.datamodule.augmentation
        return PixelNormalizer(augmentation.mean, augmentation.std)

    def inversion_classifier(self, images: Tensor, labels: Tensor) -> tuple[Classifier, dict[str, Any]]:
        names = self.trainer.datamodule.class_names
        known = labels >= 0
        if int(known.sum()) == 0 or torch.unique(labels[known]).numel() < 2:
            raise ValueError(
                "data.train_shards: MCLDef on an image method trains a linear probe on the clean set's labels, but the "
                "clean training images carry fewer than two classes (shards without 'cls'?)"
            )
        with torch.no_grad():
            features = torch.cat([self.encoder(chunk) for chunk in images[known].split(256)])
        hp = self.hparams
        probe = fit_linear_probe(
            features,
            labels[known],
            len(names),
            epochs=hp.probe_epochs,
            lr=hp.probe_lr,
            batch_size=hp.probe_batch_size,
            min_steps=hp.probe_min_steps,
            seed=0,
        )
        with torch.no_grad():
            accuracy = (probe(features).argmax(1) == labels[known]).float().mean().item()
        encoder = self.encoder

        def classify(x: Tensor) -> Tensor:
            with frozen(encoder):
                return probe(encoder(x))

        return classify, {
            "kind": "linear probe on the frozen encoder, trained on the clean set's labels",
            "probe_train_images": int(known.sum()),
            "probe_train_accuracy": accuracy,
        }


class MCLDefCLIP(MCLDefMixin, CLIP):
    """MCLDef on a poisoned CLIP image encoder. f for the inversion: the zero-shot head of the eval classes.

    Only the image tower is purified; the text tower and the temperature stay as they were.

    Args:
        checkpoint: the poisoned CLIP checkpoint (``clbd fit`` output); never written to.
        mcl_temperature, inversion_*: as ``MCLDefImage``.
        inversion_samples: clean images held in memory for the inversion (each is 3 x 224 x 224 floats at 224 px).
        **clip: the architecture of the poisoned model (``model_name``, must match its checkpoint) and the optimiser.
    """

    repairs = ("CLIP",)
    trained_part = "model.visual"

    def __init__(
        self,
        checkpoint: str | None = None,
        mcl_temperature: float = 0.5,
        inversion_steps: int = 1000,
        inversion_batch_size: int = 64,
        inversion_lr: float = 0.1,
        inversion_cost: float = 1e-3,
        inversion_success_bound: float = 0.99,
        inversion_check_every: int = 20,
        inversion_patience: int = 5,
        inversion_seed: int = 0,
        inversion_samples: int = 512,
        **clip: Any,
    ):
        super().__init__(**clip)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name.startswith("visual."))
        inversion = InversionConfig(
            steps=inversion_steps,
            batch_size=inversion_batch_size,
            lr=inversion_lr,
            init_cost=inversion_cost,
            success_bound=inversion_success_bound,
            check_every=inversion_check_every,
            patience=inversion_patience,
            seed=inversion_seed,
        )
        self.init_mcldef(checkpoint, mcl_temperature, inversion, inversion_samples)

    def optimized_module(self) -> nn.Module:
        return self.model.visual

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and getattr(self.trainer.datamodule, "train_augment", False):
            raise ValueError(
                "data.train_augment: MCLDef purifies on un-augmented images (the authors' loader applies none); set "
                "it false (resize + centre crop, as configs/defense/mcldef_clip.yaml does)"
            )

    def backdoored_source(self) -> nn.Module:
        return self.model.visual

    def purified_features(self, images: Tensor) -> Tensor:
        return self.model.visual(images)

    def clean_images(self, batch: dict[str, Any]) -> Tensor:
        return batch["image"]

    def pixel_normalizer(self) -> PixelNormalizer:
        preprocess = CLIPPreprocess(self.trainer.datamodule.model_name, train=False)
        return PixelNormalizer(preprocess.mean, preprocess.std)

    def inversion_classifier(self, images: Tensor, labels: Tensor) -> tuple[Classifier, dict[str, Any]]:
        weights = self.zero_shot_classifier()  # [D, C], from the backdoored model (nothing trained yet)
        scale = self.model.logit_scale.exp().detach()
        visual = self.model.visual

        def classify(x: Tensor) -> Tensor:
            with frozen(visual):
                return scale * F.normalize(visual(x), dim=-1) @ weights

        return classify, {
            "kind": "zero-shot head: image features x classifier of the eval class names and templates",
            "templates": self.hparams.zero_shot_templates,
            "classes": len(self.trainer.datamodule.class_names),
        }


MCLDefSimCLR = MCLDefImage  # the former name, kept for configs written before MCLDef repaired every image method
