"""Defense fine-tuning modules: each starts from a poisoned clbd checkpoint and reports before / after."""

from .base import DefenseMixin, load_poisoned_checkpoint
from .mcldef import MCLDefCLIP, MCLDefMixin, MCLDefSimCLR
from .ubt import UBT

__all__ = ["DefenseMixin", "MCLDefCLIP", "MCLDefMixin", "MCLDefSimCLR", "UBT", "load_poisoned_checkpoint"]
