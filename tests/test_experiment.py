"""clbd experiment end to end on a tiny CLIP: one poisoned checkpoint, two defenses, the table and the chart."""

from __future__ import annotations

import json

import yaml
from PIL import Image

from lightning_modules.cli.experiment import main as experiment_main


def test_experiment_writes_table_and_chart(tmp_path, make_shards):
    shards = make_shards(n=128, per_shard=32, captions=True)
    data = [
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.model_name=clip-tiny-vit",
        "--model.init_args.zero_shot_templates=photo",
        "--data.init_args.model_name=clip-tiny-vit",
        f"--data.init_args.train_shards={shards}",
        f"--data.init_args.val_shards={shards}",
        f"--data.init_args.test_shards={shards}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=32",
        "--data.init_args.eval_batch_size=64",
        "--trainer.max_epochs=1",
    ]
    attack = tmp_path / "attack.yaml"
    attack.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "init_args": {
                        "attack": {
                            "class_path": "poisoning.BadNet",
                            "init_args": {"target_class": "class1", "rate": 0.3, "trigger_size": 6},
                        }
                    }
                }
            }
        )
    )
    plan = {
        "pretrain": {"configs": ["configs/smoke/clip_shapes.yaml", str(attack)], "overrides": data},
        "clean_reference": True,
        "defenses": {
            "cleanclip": {"configs": ["configs/defense/cleanclip.yaml"], "overrides": data},
            "mcldef": {
                "configs": ["configs/defense/mcldef_clip.yaml"],
                "overrides": [*data, "--data.init_args.train_fraction=0.5", "--model.init_args.inversion_steps=10"],
            },
        },
    }
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    assert experiment_main(["--config", str(config), "--out", str(out)]) == 0

    table = json.loads((out / "table.json").read_text())
    assert [row["name"] for row in table["rows"]] == ["cleanclip", "mcldef"]
    for row in table["rows"]:
        for when in ("before", "after"):
            assert 0.0 <= row[when]["ca"] <= 1.0 and row[when]["asr_images"] > 0
    # Both defenses start from the same poisoned model, measured the same way: the same "before".
    assert table["rows"][0]["before"] == table["rows"][1]["before"]
    # The clean reference: trained without the attack, measured with its trigger on the same images.
    reference = table["clean_reference"]
    assert 0.0 <= reference["ca"] <= 1.0 and reference["asr_images"] == table["rows"][0]["after"]["asr_images"]
    assert not (out / "clean" / "poison_manifest.jsonl").exists()
    assert "| cleanclip |" in (out / "table.md").read_text()
    assert "Reference, the same pretraining without poisoning" in (out / "table.md").read_text()
    assert Image.open(out / "table.png").size[0] > 300
    # A second call reuses finished defenses and only rewrites the table, keeping their measured minutes.
    assert experiment_main(["--config", str(config), "--out", str(out)]) == 0
    again = json.loads((out / "table.json").read_text())
    assert [row["minutes"] for row in again["rows"]] == [row["minutes"] for row in table["rows"]]


def test_experiment_file_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"pretrain": {"configs": ["configs/smoke/clip_shapes.yaml"]}, "defenses": {}}))
    assert experiment_main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "at least one attack config" in capsys.readouterr().err
