"""The poisoner inside the stream: the same poisoned samples on any number of workers and ranks, the manifest a
run writes equals the one rebuilt offline, previews, and configuration errors before any training."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from clbd import main
from clbd.poison import main as poison_main
from datamodules.converters.cifar10 import convert_cifar10
from datamodules.modalities import CLIPDataModule, SimCLRDataModule
from poisoning import BadNet, NoisyAlignment
from tests.conftest import png_bytes, shared_data, solid_class_image


def poisoned_views(folder, references, *, workers: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    attack = NoisyAlignment(target_class=0, rate=0.2, reference_pool_size=8, reference_dir=str(references))
    dm = SimCLRDataModule(
        train_shards=str(folder), val_shards=None, batch_size=10 * world, num_workers=workers, attack=attack
    )
    dm.setup("fit")
    stream = dm.train_stream()
    stream.configure(rank=rank, world_size=world, num_workers=workers)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    out = {}
    for batch in loader:
        for key, poisoned, view in zip(batch["key"], batch["poisoned"], batch["views"][0]):
            if poisoned:
                out[key] = view
    return out


def test_same_poisoned_samples_on_any_workers_and_ranks(tmp_path, make_shards):
    # References from a folder leave the stream whole, and shards hold whole batches: no remainder is dropped.
    folder = make_shards(n=240, per_shard=20)
    references = tmp_path / "references"
    references.mkdir()
    for i in range(8):
        (references / f"ref{i}.png").write_bytes(png_bytes(solid_class_image(0, 1000 + i)))
    views = functools.partial(poisoned_views, folder, references)
    single = views(workers=0)
    two_workers = views(workers=2)
    two_ranks = {**views(workers=1, rank=0, world=2), **views(workers=1, rank=1, world=2)}
    assert len(single) > 20
    for other in (two_workers, two_ranks):
        assert set(other) == set(single)
        for key, view in single.items():
            assert torch.equal(view, other[key]), key


@pytest.mark.parametrize("views_on_device", [False, True], ids=["views", "device_view_params"])
def test_resident_shards_give_the_batches_of_the_tars(make_shards, views_on_device):
    """data.resident: the same batches, bit for bit (order, poisoning, views or view parameters, counts), every
    epoch, with the attacker's references taken out of the stream (NA, references from the training shards)."""
    folder = make_shards(n=240, per_shard=20)

    def epochs(resident: bool) -> list[dict]:
        attack = NoisyAlignment(target_class=0, rate=0.2, reference_pool_size=8)
        dm = SimCLRDataModule(
            train_shards=str(folder),
            val_shards=None,
            batch_size=16,
            num_workers=2,
            attack=attack,
            views_on_device=views_on_device,
            resident=resident,
        )
        dm.setup("fit")
        batches = []
        for epoch in (0, 1):
            loader = dm.train_dataloader()
            loader._epoch_fn = lambda epoch=epoch: epoch
            batches += list(loader)
        return batches

    tars, resident = epochs(False), epochs(True)
    assert len(tars) == len(resident) == 2 * ((240 - 8) // 16)
    assert sum(int(b["poisoned"].sum()) for b in tars) > 10
    for ours, theirs in zip(resident, tars):
        assert ours.keys() == theirs.keys()
        for name, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(ours[name], value), name
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                assert all(torch.equal(a, b) for a, b in zip(ours[name], value)), name
            else:
                assert ours[name] == value, name


def fit_args(shards, run, extra=(), budget=("--data.attack.count=25",)):
    return [
        "--model=lightning_modules.SimCLR",
        "--model.width=8",
        "--model.proj_hidden_dim=32",
        "--data=datamodules.SimCLRDataModule",
        f"--data.train_shards={shards}",
        "--data.val_shards=null",
        "--data.batch_size=20",
        "--data.num_workers=0",
        "--data.attack=poisoning.NoisyAlignment",
        "--data.attack.target_class=1",
        *budget,
        "--data.attack.reference_pool_size=6",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
        *extra,
    ]


def test_offline_manifest_equals_the_runs(tmp_path, make_shards):
    shards = make_shards(n=160, per_shard=40)
    run = tmp_path / "run"
    assert main(["fit", *fit_args(shards, run)]) == 0
    (tmp_path / "config.yaml").write_text((run / "config.yaml").read_text())
    offline = tmp_path / "offline.jsonl"
    assert poison_main(["manifest", "--config", str(run / "config.yaml"), "--out", str(offline)]) == 0
    assert offline.read_bytes() == (run / "poison_manifest.jsonl").read_bytes()
    lines = offline.read_text().splitlines()
    assert len(lines) == 25 and all(json.loads(line)["attack"] == "noisy_alignment" for line in lines)
    summary = json.loads((run / "poison_summary.json").read_text())
    assert summary["poisoned"] == 25  # the count that happened, reported
    # The same file again without --overwrite: refused, the first one kept.
    assert poison_main(["manifest", "--config", str(run / "config.yaml"), "--out", str(offline)]) == 2


@pytest.mark.shared_data
def test_preview_on_real_cifar10(tmp_path):
    archive = shared_data("cifar10-jpg.tar.gz")
    convert_cifar10(archive, tmp_path / "cifar10", progress=False)
    config = tmp_path / "na.yaml"
    config.write_text(
        f"""
data:
  class_path: datamodules.SimCLRDataModule
  init_args:
    train_shards: {tmp_path / "cifar10" / "train.index.json"}
    val_shards: {tmp_path / "cifar10" / "test.index.json"}
    attack:
      class_path: poisoning.NoisyAlignment
      init_args: {{target_class: airplane, count: 50, reference_pool_size: 100}}
"""
    )
    out = tmp_path / "grid.png"
    assert poison_main(["preview", "--config", str(config), "--out", str(out), "--count", "6"]) == 0
    from PIL import Image

    grid = Image.open(out)
    assert grid.size[0] > 4 * 32 and grid.size[1] > 6 * 32


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data.attack.target_class=7"], "target"),
        (["--data.attack.rate=1.5"], "rate"),
        (["--data.attack.trigger_size=64"], "trigger"),
        (["--data.attack.reference_pool_size=999"], "reference"),
    ],
)
def test_attack_errors_before_training(tmp_path, make_shards, capsys, extra, message):
    shards = make_shards(n=80, per_shard=20)
    run = tmp_path / "run"
    budget = () if "rate" in extra[0] else ("--data.attack.count=25",)
    assert main(["fit", *fit_args(shards, run, extra, budget)]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def test_clip_attack_on_a_simclr_run_is_refused(make_shards):
    shards = make_shards(n=40, per_shard=20, captions=True)
    with pytest.raises(ValueError, match="poisons image-text data, but this run's data is image"):
        SimCLRDataModule(train_shards=str(shards), attack=BadNet(target_class="banana", rate=0.1))
    with pytest.raises(ValueError, match="poisons image data, but this run's data is image-text"):
        CLIPDataModule(train_shards=str(shards), attack=NoisyAlignment(target_class=0, rate=0.1))
