"""Each module's optimiser defaults: what its docstring states, as jsonargparse resolves them (what
``--print_config`` shows and a run gets) and as the constructed module stores them in its hparams (what a checkpoint
holds); a checkpoint's hparams build the same module again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from defenses import CleanCLIP, TACleaner
from lightning_modules import BYOL, CLIP, MoCoV2, SimCLR, SimSiam

OPTIM_FIELDS = ("optimizer", "lr", "weight_decay", "momentum", "betas", "eps", "warmup_steps", "warmup_fraction")

# ContrastiveModule's defaults, which MoCoV2, BYOL and SimSiam keep (their docstrings: SGD, lr 0.1, no warm-up).
BASE = {
    "optimizer": "sgd",
    "lr": 0.1,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "warmup_steps": 0,
    "warmup_fraction": 0.0,
}
# Each value as the class's docstring states it.
DOCUMENTED = {
    SimCLR: dict(BASE, optimizer="lars", lr=0.5, warmup_fraction=0.03),
    MoCoV2: BASE,
    BYOL: BASE,
    SimSiam: BASE,
    CLIP: dict(BASE, optimizer="adamw", lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, warmup_fraction=0.05),
    CleanCLIP: dict(BASE, optimizer="adamw", lr=1e-5, weight_decay=0.1, warmup_steps=50),
    TACleaner: dict(BASE, optimizer="adamw", lr=1e-5, weight_decay=0.1, warmup_steps=50),
}


def optim_settings(values) -> dict:
    return {name: tuple(values[name]) if name == "betas" else values[name] for name in OPTIM_FIELDS}


@pytest.mark.parametrize("cls", list(DOCUMENTED), ids=lambda cls: cls.__name__)
def test_resolved_defaults_are_the_documented_ones(cls):
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "model")
    defaults = parser.get_defaults().model
    assert optim_settings(defaults) == DOCUMENTED[cls]
    assert defaults.min_lr_ratio == 0.0 and defaults.compile is False
    # Each setting once, at the module's level (a run's config names model.init_args.lr, nothing nested).
    names = [action.dest for action in parser._actions if action.dest.startswith("model.")]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "build",
    [lambda: SimCLR(width=2, proj_hidden_dim=8, proj_output_dim=4), lambda: CLIP(model_name="clip-tiny-vit")],
    ids=["SimCLR", "CLIP"],
)
def test_hparams_hold_the_class_defaults_and_rebuild_the_module(build):
    model = build()
    assert optim_settings(model.hparams) == DOCUMENTED[type(model)]
    again = type(model)(**model.hparams)  # what load_from_checkpoint does with a checkpoint's hparams
    assert dict(again.hparams) == dict(model.hparams)
    model.total_steps = lambda: 100  # no trainer here
    optimizer = model.configure_optimizers()["optimizer"]
    assert type(optimizer).__name__.lower() == DOCUMENTED[type(model)]["optimizer"]
    assert optimizer.defaults["lr"] == DOCUMENTED[type(model)]["lr"]


def test_an_explicit_setting_overrides_the_class_default():
    model = SimCLR(width=2, proj_hidden_dim=8, proj_output_dim=4, optimizer="sgd", lr=0.3, momentum=0.8)
    assert (model.hparams.optimizer, model.hparams.lr, model.hparams.momentum) == ("sgd", 0.3, 0.8)
    assert model.hparams.warmup_fraction == 0.03


def clip_checkpoint(folder: Path) -> Path:
    victim = CLIP(model_name="clip-tiny-vit")
    path = folder / "victim.ckpt"
    config = {"model": {"class_path": "lightning_modules.CLIP"}}
    torch.save({"state_dict": victim.state_dict(), "clbd_run_config": config}, path)
    return path


@pytest.mark.parametrize("cls", [CleanCLIP, TACleaner], ids=lambda cls: cls.__name__)
def test_defense_hparams_rebuild_the_defense(tmp_path, cls):
    model = cls(checkpoint=str(clip_checkpoint(tmp_path)), model_name="clip-tiny-vit")
    assert optim_settings(model.hparams) == DOCUMENTED[cls]
    assert model.hparams.pretrained is None  # CLIP's, in the hparams: a rebuild must take it
    again = cls(**model.hparams)
    assert dict(again.hparams) == dict(model.hparams)


def test_cleanclip_refuses_a_pretrained_file(tmp_path):
    with pytest.raises(ValueError, match="model.pretrained"):
        CleanCLIP(checkpoint=str(clip_checkpoint(tmp_path)), model_name="clip-tiny-vit", pretrained="x.pt")
