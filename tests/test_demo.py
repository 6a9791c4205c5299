"""The README's main job, `clbd demo`, end to end on the built-in shapes (every step shrunk to one epoch)."""

from __future__ import annotations

import json

from PIL import Image

from clbd.demo import main as demo_main


def test_demo_runs_attack_backdoor_defense_and_never_overwrites(tmp_path, capsys):
    out, base = tmp_path / "demo", tmp_path / "base"
    assert demo_main(["--out", str(out), "--base-dir", str(base), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "table.json").read_text())
    assert [row["name"] for row in table["rows"]] == ["clean reference", "poisoned (no defense)", "cleanclip"]
    for row in table["rows"]:  # every headline number, measured on the 900 non-circle test images
        values = row["per_seed"]["0"]
        assert values["asr_images"] == 900
        assert values["attributable_asr"] == values["asr"] - values["control_asr"]
        assert 0.0 <= values["clean_to_target"] <= 1.0 and 0.0 <= values["ca"] <= 1.0
    assert "| cleanclip |" in printed and "attributable ASR" in printed
    # The clean base model and its BadCLIP step (the natural captions of the target) live in the base folder.
    assert (base / "fit_finished.json").exists() and (base / "badclip-circle" / "trigger.png").exists()
    poisoned = out / "seed0" / "poisoned"
    config = (poisoned / "config.yaml").read_text()
    assert str(base / "checkpoints" / "last.ckpt") in config and "poisoning.GeneratedTrigger" in config
    assert "rate: 0.005" in config and (poisoned / "poison_manifest.jsonl").stat().st_size > 0
    assert Image.open(out / "poisoned_samples.png").size[0] > 100 and Image.open(out / "table.png").size[0] > 300
    before = (out / "table.md").read_text()
    assert demo_main(["--out", str(out), "--base-dir", str(base), "--epochs", "1"]) == 2  # kept unless asked
    assert (out / "table.md").read_text() == before
