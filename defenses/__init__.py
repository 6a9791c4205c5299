"""Defense fine-tuning modules: each starts from a poisoned clbd checkpoint and reports before / after."""

from .base import DefenseMixin, load_poisoned_checkpoint

__all__ = ["DefenseMixin", "load_poisoned_checkpoint"]
