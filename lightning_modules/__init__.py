"""LightningModules for contrastive pretraining under poisoning: the image methods (SimCLR, MoCo v2, BYOL, SimSiam)
on one base, CLIP, their losses and evaluation."""

from .base import ContrastiveModule
from .byol import BYOL
from .clip import CLIP
from .image_ssl import ImageSSLModule
from .moco import MoCoV2
from .simclr import SimCLR
from .simsiam import SimSiam

__all__ = ["BYOL", "CLIP", "ContrastiveModule", "ImageSSLModule", "MoCoV2", "SimCLR", "SimSiam"]
