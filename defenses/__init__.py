"""Defense fine-tuning modules: each starts from a poisoned clbd checkpoint and reports before / after."""

from .base import DefenseMixin, load_poisoned_checkpoint
from .cleanclip import CleanCLIP
from .tacleaner import TACleaner

__all__ = ["CleanCLIP", "DefenseMixin", "TACleaner", "load_poisoned_checkpoint"]
