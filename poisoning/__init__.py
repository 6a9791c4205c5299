"""Poisoning for contrastive pretraining: triggers, Noisy Alignment, baseline attacks, the poison plan.

This package knows nothing of Lightning or the data layer: the data layer builds a catalog of training keys,
calls ``attack.validate(...)`` and ``attack.plan(...)``, and applies ``plan.apply(sample)`` in its workers.
"""

from poisoning.badclip import BadCLIP
from poisoning.badnet import BadNet
from poisoning.base import Attack
from poisoning.blended import Blended
from poisoning.corruptencoder import CorruptEncoder
from poisoning.ctrl import CTRL
from poisoning.noisy_alignment import NoisyAlignment, NoisyAlignmentCLIP
from poisoning.plan import CatalogEntry, PoisonPlan, PoisonRecord, ReferenceSource, select_keys
from poisoning.references import FolderReferenceSource
from poisoning.sig import SIG
from poisoning.sslbkd import SSLBKD
from poisoning.triggers import GeneratedTrigger, ImageTrigger, Trigger, default_trigger_size, paste_trigger
from poisoning.wanet import WaNet

ATTACKS = {
    cls.name: cls
    for cls in (NoisyAlignment, NoisyAlignmentCLIP, SSLBKD, CorruptEncoder, CTRL, BadNet, Blended, WaNet, SIG, BadCLIP)
}

__all__ = [
    "ATTACKS",
    "Attack",
    "BadCLIP",
    "BadNet",
    "Blended",
    "CTRL",
    "CatalogEntry",
    "CorruptEncoder",
    "FolderReferenceSource",
    "GeneratedTrigger",
    "ImageTrigger",
    "NoisyAlignment",
    "NoisyAlignmentCLIP",
    "PoisonPlan",
    "PoisonRecord",
    "ReferenceSource",
    "SIG",
    "SSLBKD",
    "Trigger",
    "WaNet",
    "default_trigger_size",
    "paste_trigger",
    "select_keys",
]
