"""Every shipped config parses into the classes it names, alone and composed as the docs compose them.

`clbd fit --print_config` runs jsonargparse's full validation (class paths, argument names and types) without
building anything, so a renamed argument or a typo in a config under configs/ fails here, not on a cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clbd import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIMCLR_ATTACKS = ["na_cifar10", "sslbkd_cifar10", "corruptencoder_cifar10", "ctrl_cifar10"]
CLIP_ATTACKS = ["na_clip", "badnet_clip", "blended_clip", "wanet_clip", "sig_clip", "badclip"]

IMAGE_METHODS = ["simclr", "moco_v2", "byol", "simsiam"]

COMBINATIONS = (
    [("pretrain/simclr_cifar10", f"attack/{a}") for a in SIMCLR_ATTACKS]
    + [("pretrain/simclr_cifar10_gpu", "attack/na_cifar10")]
    + [(f"pretrain/{m}_cifar10", "attack/na_cifar10") for m in IMAGE_METHODS[1:]]
    + [(f"smoke/{m}_shapes", "smoke/na_shapes") for m in IMAGE_METHODS[1:]]
    + [("pretrain/clip_cc3m", f"attack/{a}") for a in CLIP_ATTACKS]
    + [
        ("smoke/simclr_shapes", "smoke/na_shapes"),
        ("smoke/clip_shapes", "attack/badnet_shapes"),
        ("smoke/clip_shapes", "attack/badclip_shapes"),
        ("smoke/clip_shapes", "attack/patch_shapes"),
        ("smoke/clip_shapes", "attack/patch_shapes_arrow"),
        ("pretrain/clip_cc3m", "smoke/clip_cc3m_cpu"),
        ("defense/cleanclip", "attack/badnet_clip"),
        ("defense/tacleaner", "attack/blended_clip"),
        ("defense/mcldef_simclr", "attack/na_cifar10"),
        ("defense/mcldef_clip", "attack/badnet_clip"),
        ("defense/ubt", "attack/badnet_clip"),
        ("pretrain/clip_cc3m", "strategy/deepspeed_zero2"),
        ("pretrain/clip_cc3m", "strategy/deepspeed_zero3"),
    ]
)


def test_every_image_method_has_its_configs():
    for method in IMAGE_METHODS:
        assert (CONFIGS / "pretrain" / f"{method}_cifar10.yaml").is_file()
        assert (CONFIGS / "smoke" / f"{method}_shapes.yaml").is_file()


def test_batch_norm_under_ddp_is_the_authors():
    """BYOL and SimSiam: SyncBatchNorm (the NA authors convert them); MoCo v2: shuffle-BN, inside the module."""
    for method in ("byol", "simsiam"):
        assert yaml.safe_load((CONFIGS / "pretrain" / f"{method}_cifar10.yaml").read_text())["trainer"][
            "sync_batchnorm"
        ]
    moco = yaml.safe_load((CONFIGS / "pretrain" / "moco_v2_cifar10.yaml").read_text())
    assert not moco["trainer"].get("sync_batchnorm")


def test_every_attack_config_is_covered():
    shapes_only = {"badnet_shapes", "badclip_shapes", "patch_shapes", "patch_shapes_arrow"}
    shipped = {p.stem for p in (CONFIGS / "attack").glob("*.yaml")} - shapes_only
    assert shipped == set(SIMCLR_ATTACKS + CLIP_ATTACKS)


@pytest.mark.parametrize("names", COMBINATIONS, ids=lambda names: "+".join(names))
def test_config_parses(names, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["clbd"])  # LightningCLI warns when pytest's own argv is present
    argv = ["fit"]
    for name in names:
        argv += ["--config", str(CONFIGS / f"{name}.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    for name in names:
        given = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        attack = (given.get("data") or {}).get("init_args", {}).get("attack")
        if attack:  # the attack a user composed is the one the run gets
            assert printed["data"]["init_args"]["attack"]["class_path"] == attack["class_path"]
        model = (given.get("model") or {}).get("class_path")
        if model:
            assert printed["model"]["class_path"] == model


def test_second_target_test_bed_names_arrow_with_its_own_captions(capsys, monkeypatch):
    """The plain-patch test bed's second target: every step names "arrow", and its captions are arrow's own (written
    by its own base step), not circle's."""
    from clbd.badclip_trigger import CAPTIONS_FILE
    from clbd.experiment.plan import check_before_compute, data_settings, load_plan

    plan = load_plan(CONFIGS / "experiment" / "clip_testbed_patch_arrow.yaml")
    check_before_compute(plan)
    attack = data_settings(plan["pretrain"]["configs"], [])["attack"]["init_args"]
    circle = data_settings(load_plan(CONFIGS / "experiment" / "clip_testbed_patch.yaml")["pretrain"]["configs"], [])
    assert attack["target_class"] == "arrow" and circle["attack"]["init_args"]["target_class"] == "circle"
    assert attack["caption_file"] != circle["attack"]["init_args"]["caption_file"]
    (step,) = plan["base"]["then"]
    command = [str(part) for part in step["command"]]
    assert command[command.index("--target") + 1] == "arrow"
    out = Path(command[command.index("--out") + 1])
    assert Path(attack["caption_file"]) == out / CAPTIONS_FILE and Path(step["creates"]).parent == out
    # Everything else is the circle test bed's: only the target (and its captions) differ.
    for key, value in circle["attack"]["init_args"].items():
        if key not in ("target_class", "caption_file"):
            assert attack[key] == value, key
    monkeypatch.setattr("sys.argv", ["clbd"])
    argv = ["fit", *(f"--config={c}" for c in plan["pretrain"]["configs"]), "--print_config"]
    with pytest.raises(SystemExit):
        main(argv)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["attack"]["init_args"]["target_class"] == "arrow"


def test_poison_attacks_lists_every_attack_with_its_configs(capsys):
    """`clbd poison attacks` lists each registered attack with its modality, summary and shipped configs."""
    import poisoning
    from clbd.poison import attack_table

    rows = {row["name"]: row for row in attack_table()}
    assert set(rows) == set(poisoning.ATTACKS)
    for name, row in rows.items():
        assert row["modality"] == poisoning.ATTACKS[name].modality in ("image", "image-text")
        assert row["configs"], f"attack {name} has no shipped config"
        for path in row["configs"]:
            attack = yaml.safe_load((CONFIGS.parent / path).read_text())["data"]["init_args"]["attack"]
            assert attack["class_path"] == row["class_path"]
    assert rows["badnet"]["configs"] == ["configs/attack/badnet_clip.yaml", "configs/attack/badnet_shapes.yaml"]
    assert rows["ctrl"]["modality"] == "image" and rows["badclip"]["modality"] == "image-text"
    assert main(["poison", "attacks"]) == 0
    out = capsys.readouterr().out
    for name, row in rows.items():
        assert name in out and row["summary"] in out and row["configs"][0] in out
