"""The control every image-SSL defense is read against: plain SimCLR fine-tuning of the poisoned encoder on the
defender's clean data, at the defense's budget. A defense's cut in ASR counts for what it removes beyond this one.

(For CLIP the control is CleanCLIP's run with its in-modal term off: ``--model.init_args.lambda_unimodal=0``.)
"""

from __future__ import annotations

from typing import Any

from lightning_modules.simclr import SimCLR

from .base import DefenseMixin


class FinetuneSimCLR(DefenseMixin, SimCLR):
    """SimCLR fine-tuning from a poisoned image-method checkpoint; before / after CA and ASR in defense_metrics.json.

    The encoder comes from the checkpoint (SimCLR, MoCo v2, BYOL or SimSiam), and so does the projector when the
    checkpoint is a SimCLR run with the same head; otherwise the projector starts fresh.

    Args:
        checkpoint: the poisoned run's checkpoint (``RUN/checkpoints/last.ckpt``); it is only read.
        **simclr: ``lightning_modules.SimCLR``'s arguments: the encoder of the poisoned model (``backbone``,
            ``cifar_stem``, ``width``: must match its checkpoint), the head, the evaluation and the optimiser.
    """

    defense_name = "finetune"
    repairs = ("ImageSSLModule",)

    def __init__(self, checkpoint: str | None = None, **simclr: Any):
        super().__init__(**simclr)
        if checkpoint is None:
            raise ValueError(
                "model.checkpoint: give the poisoned checkpoint (--model.init_args.checkpoint RUN/...ckpt)"
            )
        self.init_defense(checkpoint)

    def repaired_weights(self, weights: dict[str, Any]) -> dict[str, Any]:
        own = self.state_dict()
        return {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}

    def is_defense_parameter(self, name: str) -> bool:
        return not name.startswith("encoder.")  # a projector the checkpoint does not have starts fresh
