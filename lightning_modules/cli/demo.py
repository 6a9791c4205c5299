"""``clbd demo``: the README's main job. SimCLR on the built-in shapes, clean and poisoned with Noisy Alignment,
each evaluated (kNN and linear probe: clean accuracy and attack success rate), then one table.

It only chains public commands (``clbd fit`` then ``clbd test`` per run) and prints each one, so every step can be
rerun or changed by hand.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def run(argv: list[str]) -> None:
    from .runner import run as main

    print("\n$ clbd " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = main(argv)
    if code:
        raise SystemExit(code)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def table(rows: list[dict]) -> str:
    header = "| run | kNN CA | probe CA | kNN ASR | probe ASR | ASR images | poisoned seen | minutes |"
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        knn, probe = row["results"]["knn"], row["results"]["linear_probe"]
        lines.append(
            f"| {row['name']} | {100 * knn['accuracy']:.1f}% | {100 * probe['accuracy']:.1f}% | "
            f"{percent(knn.get('asr'))} | {percent(probe.get('asr'))} | {probe.get('asr_images', '-')} | "
            f"{row['poisoned_seen']} | {row['minutes']:.1f} |"
        )
    defined = next((row["results"].get("asr_definition") for row in rows if "attack" in row["results"]), None)
    note = f"\nCA on {rows[0]['results']['linear_probe']['n_images']} test images."
    if defined:
        note += f" ASR: {defined}; for the clean run it uses the same trigger and target, as a baseline."
    return "\n".join(lines) + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clbd demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="folder for the two runs (must not hold them yet)")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            print(f"clbd demo: error: {out} already holds a demo; pass --overwrite or another --out")
            return 2
        import shutil

        shutil.rmtree(out)
    base = ["--config", str(CONFIGS / "smoke" / "simclr_shapes.yaml")]
    attack = ["--config", str(CONFIGS / "smoke" / "na_shapes.yaml")]
    epochs = [f"--trainer.max_epochs={args.epochs}"] if args.epochs else []
    rows = []
    for name, extra in (("clean", []), ("noisy_alignment", attack)):
        run_dir = out / name
        started = time.time()
        run(["fit", *base, *extra, *epochs, f"--trainer.default_root_dir={run_dir}"])
        # Evaluate with the attack's trigger in both runs: the clean run's ASR is the baseline to beat.
        run(
            [
                "test",
                *base,
                *attack,
                *epochs,
                f"--trainer.default_root_dir={run_dir}",
                f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            ]
        )
        results = json.loads((run_dir / "checkpoints" / "metrics.json").read_text())["last.ckpt"]
        report = json.loads((run_dir / "data_report.json").read_text())
        rows.append(
            {
                "name": name,
                "results": results,
                "poisoned_seen": report["poisoned_seen"],
                "minutes": (time.time() - started) / 60,
            }
        )
    text = table(rows)
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nWritten: {out / 'results.md'}; runs in {out}/clean and {out}/noisy_alignment")
    return 0
