"""LightningModules for contrastive pretraining under poisoning: SimCLR and CLIP, their losses and evaluation."""

from .base import ContrastiveModule
from .clip import CLIP
from .simclr import SimCLR

__all__ = ["CLIP", "ContrastiveModule", "SimCLR"]
