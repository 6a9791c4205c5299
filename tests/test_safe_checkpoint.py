"""A checkpoint carrying a pickled payload is refused wherever clbd opens one, and the payload never runs."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clbd import main
from defenses.base import DefenseMixin, load_poisoned_checkpoint
from defenses.recorded_classes import UnknownRecordedClassError, clbd_classes
from lightning_modules.checkpoints import consolidate
from lightning_modules.safe_checkpoint import UnsafeCheckpointError, load_checkpoint
from poisoning import BadNet


class Payload:
    """Unpickling it with the full unpickler creates the folder ``marker``: proof that a file ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-looking checkpoint of real weights, with the payload tucked among clbd's own keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {"model.weight": torch.ones(2, 2)},
            "global_step": 3,
            "clbd_run_config": {"model": {"class_path": "lightning_modules.CLIP"}, "extra": Payload(marker)},
        },
        path,
    )
    return path


SIMCLR = ["--model=lightning_modules.SimCLR", "--model.width=8", "--model.proj_hidden_dim=32"]


def test_the_payload_is_live(tmp_path):
    """The crafted file does run code under the full unpickler (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    torch.load(crafted_checkpoint(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.is_dir()


def test_a_defense_source_with_a_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    bad = crafted_checkpoint(tmp_path / "backdoored.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_poisoned_checkpoint(str(bad), ("CLIP",))
    assert str(bad) in str(refused.value) and "os.makedirs" in str(refused.value)
    assert not marker.exists()


def test_a_plain_checkpoint_loads(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3)}, "clbd_run_config": {"model": {"lr": 0.1}}}, path)
    state = load_checkpoint(path)
    assert torch.equal(state["state_dict"]["w"], torch.arange(3)) and state["clbd_run_config"]["model"]["lr"] == 0.1


def test_a_legacy_format_payload_is_refused(tmp_path):
    """Files from torch < 1.6 (not zip) are refused too; torch's message names the global."""
    marker = tmp_path / "ran"
    bad = tmp_path / "legacy.ckpt"
    torch.save({"w": torch.ones(1), "p": Payload(marker)}, bad, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="legacy.ckpt"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_resume_from_a_payload_is_refused(tmp_path, make_shards, capsys):
    shards = make_shards(n=40, per_shard=20)
    marker = tmp_path / "ran"
    bad = crafted_checkpoint(tmp_path / "elsewhere" / "last.ckpt", marker)
    args = [*SIMCLR, "--data=datamodules.SimCLRDataModule", f"--data.train_shards={shards}", "--data.val_shards=null"]
    code = main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'run'}", "--ckpt_path", str(bad)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "os.makedirs" in err
    assert not marker.exists()


def test_clbd_test_of_a_payload_is_refused(tmp_path, make_shards, capsys):
    shards = make_shards(n=40, per_shard=20)
    marker = tmp_path / "ran"
    bad = crafted_checkpoint(tmp_path / "elsewhere" / "last.ckpt", marker)
    args = [
        *SIMCLR,
        "--data=datamodules.SimCLRDataModule",
        f"--data.test_shards={shards}",
        "--data.train_shards=null",
        "--data.val_shards=null",
    ]
    code = main(["test", *args, f"--trainer.default_root_dir={tmp_path / 'eval'}", "--ckpt_path", str(bad)])
    assert code == 2
    assert str(bad) in capsys.readouterr().err
    assert not marker.exists()


def test_lightnings_own_load_is_safe_too(tmp_path, make_shards, monkeypatch):
    """Without clbd's check in front, Lightning still unpickles with weights_only=True (the CLI forces it)."""
    import clbd.runner as cli

    monkeypatch.setattr(cli, "check_checkpoint", lambda path: None)
    shards = make_shards(n=40, per_shard=20)
    marker = tmp_path / "ran"
    bad = crafted_checkpoint(tmp_path / "elsewhere" / "last.ckpt", marker)
    args = [
        *SIMCLR,
        "--data=datamodules.SimCLRDataModule",
        f"--data.test_shards={shards}",
        "--data.train_shards=null",
        "--data.val_shards=null",
    ]
    with pytest.raises(pickle.UnpicklingError, match="os.makedirs"):
        main(["test", *args, f"--trainer.default_root_dir={tmp_path / 'eval'}", "--ckpt_path", str(bad)])
    assert not marker.exists()


def test_a_deepspeed_folder_with_a_payload_is_not_consolidated(tmp_path):
    """DeepSpeed and the fp32 converter unpickle with weights_only=False: clbd vets every file of the folder first."""
    marker = tmp_path / "ran"
    folder = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    torch.save({"module": {"w": torch.ones(1)}}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save(
        {"optimizer_state_dict": Payload(marker)}, folder / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        consolidate(folder)
    assert not marker.exists() and not (tmp_path / "run" / "consolidated").exists()


def planted_module(folder: Path, marker: Path) -> str:
    """A module on sys.path whose import writes ``marker``: proof that a recorded class path was imported."""
    name = f"planted_{folder.name.replace('-', '_')}"
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclass Anything: pass\n")
    return name


def recording_checkpoint(path: Path, model: str, attack: str = "poisoning.BadNet") -> Path:
    run_config = {
        "model": {"class_path": model},
        "data": {"init_args": {"attack": {"class_path": attack, "init_args": {"target_class": 0}}}},
    }
    torch.save({"state_dict": {"w": torch.ones(1)}, "clbd_run_config": run_config}, path)
    return path


def test_a_recorded_model_class_outside_clbd_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    monkeypatch.syspath_prepend(str(tmp_path))
    module = planted_module(tmp_path, marker)
    bad = recording_checkpoint(tmp_path / "elsewhere.ckpt", f"{module}.Anything")
    with pytest.raises(UnknownRecordedClassError) as refused:
        load_poisoned_checkpoint(str(bad), ("CLIP",))
    message = str(refused.value)
    assert message.startswith("model.checkpoint: ") and str(bad) in message and f"'{module}.Anything'" in message
    assert "lightning_modules.CLIP" in message  # the error lists what a checkpoint may name
    assert not marker.exists() and module not in sys.modules


def test_a_recorded_attack_class_outside_clbd_is_never_imported(tmp_path, monkeypatch):
    """The defense's check that it composes the poisoned run's attack resolves that recorded name the same way."""
    marker = tmp_path / "imported"
    monkeypatch.syspath_prepend(str(tmp_path))
    module = planted_module(tmp_path, marker)
    path = recording_checkpoint(tmp_path / "run.ckpt", "lightning_modules.clip.CLIP", attack=f"{module}.BadNet")
    state = load_poisoned_checkpoint(str(path), ("CLIP",))  # the model's own path resolves too
    defense = SimpleNamespace(source_run_config=state["clbd_run_config"], source_checkpoint=str(path))
    attack = BadNet(target_class=0, rate=0.1)
    with pytest.raises(UnknownRecordedClassError, match=f"{path}.*'{module}.BadNet'"):
        DefenseMixin.check_attack_matches_source(defense, attack, ["cat", "dog"])
    assert not marker.exists() and module not in sys.modules


def test_the_allow_list_holds_every_kind_a_run_config_records():
    classes = clbd_classes()
    for class_path in ("lightning_modules.SimCLR", "defenses.UBT", "datamodules.CLIPDataModule", "poisoning.BadCLIP"):
        assert classes[class_path].__name__ == class_path.rsplit(".", 1)[-1]
    assert classes["poisoning.GeneratedTrigger"] is classes["poisoning.triggers.GeneratedTrigger"]
