"""The README's main job, `clbd demo`, end to end on the built-in shapes (every step shrunk to two epochs): one demo
for the module, whose clean base the interrupted one shares."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from clbd.demo import main as demo_main
from lightning_modules.stream_bookkeeping import StreamBookkeeping
from tests.callbacks import SimulatedPreemption


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path, str]:
    """One uninterrupted demo shrunk to 2 epochs per step: (its folder, its base folder, what it printed)."""
    root = tmp_path_factory.mktemp("demo")
    out, base = root / "demo", root / "base"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo_main(["--out", str(out), "--base-dir", str(base), "--epochs", "2"]) == 0
    return out, base, printed.getvalue()


def test_demo_runs_attack_backdoor_defense_and_never_overwrites(demo, tmp_path, capsys):
    out, base, printed = demo
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
    # Started again, the finished demo is kept: every step is reused, nothing trained again.
    before = (out / "table.json").read_text()
    assert demo_main(["--out", str(out), "--base-dir", str(base), "--epochs", "2"]) == 0
    assert "continuing the demo" in capsys.readouterr().out and (out / "table.json").read_text() == before
    # Other settings in the same folder are refused, naming the way out; so is a folder that holds no demo.
    assert demo_main(["--out", str(out), "--base-dir", str(base), "--epochs", "1"]) == 2
    assert (out / "table.json").read_text() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert demo_main(["--out", str(tmp_path / "other"), "--base-dir", str(base)]) == 2
    assert (tmp_path / "other" / "notes.txt").exists()


def table_numbers(out: Path) -> list[dict]:
    """The demo table's rows without the minutes each step took."""
    rows = json.loads((out / "table.json").read_text())["rows"]
    return [{key: value for key, value in row.items() if key != "minutes"} for row in rows]


@pytest.mark.slow
def test_an_interrupted_demo_continues_to_the_table_of_an_uninterrupted_one(demo, tmp_path, monkeypatch, capsys):
    """Stopped in the poisoned fine-tuning's second epoch (after its first epoch-end checkpoint) and started again,
    the demo continues where it stopped and ends with the uninterrupted demo's table."""
    straight, base, _ = demo
    stopped = tmp_path / "stopped"
    shrink = ["--base-dir", str(base), "--epochs", "2"]

    counting = StreamBookkeeping.on_train_batch_start

    def preempted(self, trainer, pl_module, batch, batch_idx):
        if Path(trainer.default_root_dir).name == "poisoned" and trainer.current_epoch == 1:
            raise SimulatedPreemption("killed in the poisoned fine-tuning's second epoch")
        return counting(self, trainer, pl_module, batch, batch_idx)

    monkeypatch.setattr(StreamBookkeeping, "on_train_batch_start", preempted)
    with pytest.raises(SimulatedPreemption):
        demo_main(["--out", str(stopped), *shrink])
    monkeypatch.undo()
    poisoned = stopped / "seed0" / "poisoned"
    assert (poisoned / "checkpoints" / "last.ckpt").exists() and not (poisoned / "fit_finished.json").exists()
    capsys.readouterr()

    assert demo_main(["--out", str(stopped), *shrink]) == 0
    assert "continuing the demo" in capsys.readouterr().out
    assert table_numbers(stopped) == table_numbers(straight)
