"""The README's main job, `clbd demo`, end to end on the built-in shapes (one epoch per run to stay fast)."""

from __future__ import annotations

import json

from lightning_modules.cli.demo import main as demo_main


def test_demo_runs_the_whole_chain_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--out", str(out), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| clean |" in printed and "| noisy_alignment |" in printed
    assert (out / "results.md").read_text().splitlines()[0].startswith("| run | kNN CA")
    for name, poisoned in (("clean", False), ("noisy_alignment", True)):
        results = json.loads((out / name / "checkpoints" / "metrics.json").read_text())["last.ckpt"]
        # Both runs are measured with the NA trigger on the 900 non-circle test images.
        assert results["attack"]["target_name"] == "circle" and results["knn"]["asr_images"] == 900
        assert 0.0 <= results["linear_probe"]["accuracy"] <= 1.0
        report = json.loads((out / name / "data_report.json").read_text())
        assert (report["poisoned_seen"] > 0) is poisoned
    assert (out / "noisy_alignment" / "poison_manifest.jsonl").stat().st_size > 0
    before = (out / "results.md").read_text()
    assert demo_main(["--out", str(out), "--epochs", "1"]) == 2  # an earlier demo is kept unless asked
    assert (out / "results.md").read_text() == before
