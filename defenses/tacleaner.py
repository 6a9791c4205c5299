"""TA-Cleaner (Xun et al., arXiv 2409.17601): CleanCLIP plus fine-grained text alignment with generated subtexts.

Each epoch a random share of the samples carries positive subtexts (faithful parts of the caption) and negative
subtexts (the caption with one content word swapped), made in the data pipeline
(``datamodules.TACleanerDataModule``). The added term, for every image i that has at least one subtext:

    P_i = {caption_i} + {positive subtexts of i}
    D_i = {captions of all other samples of the global batch} + {negative subtexts of i}
    l_i = mean over p in P_i of  -log( exp(s <u_i, p>) / (exp(s <u_i, p>) + sum over d in D_i of exp(s <u_i, d>)) )

with u_i the image feature, s the model's logit scale; each positive competes only with the negatives, not with
the other positives. L_subtext is the mean of l_i over all such images of the global batch; the loss is
CleanCLIP's plus ``lambda_subtext * L_subtext``. There is no public code: every choice here is clbd's and is
written down in docs/defenses.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from datamodules.multimodal import TACleanerDataModule
from lightning_modules.losses import distributed_rank_and_world, gather_with_grad

from .cleanclip import CleanCLIP

# Masked logits: a large negative number rather than -inf, so a row with nothing to compete against (a global
# batch of one without negatives) gives a zero loss and a zero gradient, not NaN.
MASKED_LOGIT = -1.0e4


def subtext_alignment_loss(
    image: torch.Tensor,
    captions: torch.Tensor,
    own_index: torch.Tensor,
    subtexts: torch.Tensor,
    mask: torch.Tensor,
    positive: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image loss terms l_i (see the module doc) and which images have one.

    Args:
        image: ``[n, d]`` normalised image features of this rank.
        captions: ``[N, d]`` normalised caption features of the global batch.
        own_index: ``[n]`` row of each image's own caption in ``captions``.
        subtexts: ``[n, K, d]`` normalised subtext features (anything where ``mask`` is False).
        mask: ``[n, K]`` True where a subtext exists.
        positive: ``[n, K]`` True for positive slots, False for negative ones.
        scale: the logit scale (exp of the learned log-scale).

    Returns:
        (``[n]`` l_i, zero where the image has no subtext; ``[n]`` bool, True where it has one).
    """
    rows = torch.arange(image.shape[0], device=image.device)
    caption_logits = scale * image @ captions.T  # [n, N]
    subtext_logits = scale * torch.einsum("nd,nkd->nk", image, subtexts)  # [n, K]
    own = caption_logits[rows, own_index]  # [n]
    other_captions = caption_logits.clone()
    other_captions[rows, own_index] = MASKED_LOGIT
    negatives = subtext_logits.masked_fill(~(mask & ~positive), MASKED_LOGIT)
    negative_lse = torch.logsumexp(torch.cat([other_captions, negatives], dim=1), dim=1)  # [n]
    positive_logits = torch.cat([own[:, None], subtext_logits], dim=1)  # [n, 1 + K]
    positive_valid = torch.cat([torch.ones_like(mask[:, :1]), mask & positive], dim=1)
    # -log(e^p / (e^p + e^lse)) = softplus(lse - p)
    per_positive = F.softplus(negative_lse[:, None] - positive_logits) * positive_valid
    per_image = per_positive.sum(dim=1) / positive_valid.sum(dim=1)
    active = mask.any(dim=1)
    return per_image * active, active


def global_subtext_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    subtexts: torch.Tensor,
    mask: torch.Tensor,
    positive: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_subtext of this rank's share of the global batch: (loss, [n] which local images have subtexts).

    Captions of all ranks are gathered with gradient (every rank calls the collective, chosen images or not).
    The loss is the mean of l_i over the chosen images of the GLOBAL batch: DDP averages the ranks' gradients, so
    each rank divides its sum by (global count / world size), and the update equals one process on the whole
    batch. Arguments as ``subtext_alignment_loss``'s, with ``text`` this rank's ``[n, d]`` caption features.
    """
    rank, world = distributed_rank_and_world()
    captions = gather_with_grad(text)
    own_index = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    per_image, active = subtext_alignment_loss(image, captions, own_index, subtexts, mask, positive, scale)
    count = active.sum().to(per_image.dtype)
    if world > 1:
        count = count.detach().clone()
        dist.all_reduce(count)
    share = count / world
    return per_image.sum() / share.clamp(min=1.0 / world), active


class TACleaner(CleanCLIP):
    """TA-Cleaner: CleanCLIP's loss plus ``lambda_subtext`` times the subtext alignment term.

    Args:
        checkpoint: the poisoned run's checkpoint (only read).
        lambda_subtext: weight of the subtext alignment term.
        **kwargs: ``CleanCLIP``'s arguments (lambda_clip, lambda_unimodal, model_name, lr, ...).
    """

    defense_name = "tacleaner"
    datamodule_class: type = TACleanerDataModule

    def __init__(self, checkpoint: str | None = None, lambda_subtext: float = 1.0, **kwargs: Any):
        if lambda_subtext < 0:
            raise ValueError(f"model.lambda_subtext must be >= 0, got {lambda_subtext}")
        super().__init__(checkpoint=checkpoint, **kwargs)

    def extra_loss(
        self,
        batch: dict[str, Any],
        features: dict[str, torch.Tensor],
        scale: torch.Tensor,
        losses: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        image = features["image"]
        mask = batch["subtext_mask"]
        subtexts = image.new_zeros(*mask.shape, image.shape[1])
        if mask.any():  # only the chosen samples' subtexts go through the text encoder
            subtexts[mask] = self.encode_text(batch["subtexts"][mask])
        loss, active = global_subtext_loss(image, features["text"], subtexts, mask, batch["subtext_positive"], scale)
        losses["subtext"] = loss
        self.log("train/subtext_images", active.sum().float(), on_step=True, on_epoch=True, reduce_fx="sum")
        return self.hparams.lambda_subtext * loss

    def defense_report(self) -> dict[str, Any]:
        report = super().defense_report()
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        report["lambda_subtext"] = self.hparams.lambda_subtext
        if isinstance(datamodule, TACleanerDataModule):
            report.update(
                subtext_fraction=datamodule.subtext_fraction,
                n_positive=datamodule.n_positive,
                n_negative=datamodule.n_negative,
                class_words=list(datamodule.subtext_classes()),
                class_word_negatives=datamodule.class_word_negatives,
            )
        return report
