"""Defense fine-tuning modules: each starts from a poisoned clbd checkpoint and reports before / after."""

from .base import DefenseMixin, load_poisoned_checkpoint
from .cleanclip import CleanCLIP
from .finetune import FinetuneSimCLR
from .mcldef import MCLDefCLIP, MCLDefImage, MCLDefMixin, MCLDefSimCLR
from .tacleaner import TACleaner
from .ubt import UBT

__all__ = [
    "CleanCLIP",
    "DefenseMixin",
    "FinetuneSimCLR",
    "MCLDefCLIP",
    "MCLDefImage",
    "MCLDefMixin",
    "MCLDefSimCLR",
    "TACleaner",
    "UBT",
    "load_poisoned_checkpoint",
]
