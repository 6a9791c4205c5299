"""``clbd demo``: the README's main job. Attack -> backdoor -> defense on the built-in shapes, on a CPU.

It is one seed of the plain-patch CPU test bed (``configs/experiment/clip_testbed_patch.yaml``): a clean tiny CLIP
trained once (kept in ``--base-dir`` and reused by later demos and the test beds; its BadCLIP step supplies the
natural captions of the target), the poisoned fine-tuning (a generated patch on 0.5% of the pairs) and the same
fine-tuning without the attack, then CleanCLIP from the poisoned model. One table (CA, ASR,
control ASR, attributable ASR, clean->target for the clean, poisoned and defended model), the bars, and a picture of
poisoned samples. Every step is an ordinary ``clbd`` command, printed as it runs.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from .experiment import main as experiment
from .steps import run_step

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "configs" / "experiment" / "clip_testbed_patch.yaml"
ATTACK = "patch_shapes.yaml"  # the test bed's attack config, copied with the base folder it names
SHIPPED_BASE = "runs/clip-shapes-base"  # the test bed's base folder, named in its attack config
DEFENSE = "cleanclip"
PLAN_NAME = "demo_experiment.yaml"


def absolute(value: str) -> str:
    return str(ROOT / value) if value.startswith("configs/") else value


def demo_plan(base_dir: Path, out: Path, epochs: int | None) -> tuple[dict, str]:
    """The test bed's plan for one seed and one defense, its paths made independent of the working directory and
    its base folder moved to ``base_dir``; ``epochs`` shrinks every step (for tests). Its attack config, with the
    base folder, is to be written to the path returned (``attack_config``)."""
    plan = yaml.safe_load(TESTBED.read_text())
    attack_copy = out / ATTACK
    base = plan["base"]
    base["dir"] = str(base_dir)
    base["configs"] = [absolute(c) for c in base["configs"]]
    for step in base["then"]:
        step["command"] = [absolute(a.replace(SHIPPED_BASE, str(base_dir))) for a in step["command"]]
        step["creates"] = step["creates"].replace(SHIPPED_BASE, str(base_dir))
    plan["pretrain"]["configs"] = [absolute(plan["pretrain"]["configs"][0]), str(attack_copy)]
    defense = plan["defenses"][DEFENSE]
    defense["configs"] = [absolute(c) for c in defense["configs"]]
    plan["defenses"] = {DEFENSE: defense}
    plan["seeds"] = [0]
    if epochs is not None:
        base["overrides"] = [*base.get("overrides", []), f"--trainer.max_epochs={epochs}"]
        for step in base["then"]:
            step["command"] = [*step["command"], "--epochs", str(epochs), "--max-images", "64"]
        plan["pretrain"]["overrides"] = [*plan["pretrain"]["overrides"], f"--trainer.max_epochs={epochs}"]
        plan["defense_budget"] = {"steps": 2, "batch_size": 16}
    return plan, str(attack_copy)


def attack_config(base_dir: Path) -> str:
    return (ROOT / "configs" / "attack" / ATTACK).read_text().replace(SHIPPED_BASE, str(base_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clbd demo", description=__doc__)
    parser.add_argument(
        "--out", default="runs/demo", help="folder for the demo's runs; a demo stopped there is continued"
    )
    parser.add_argument("--base-dir", default=SHIPPED_BASE, help="the clean base model's folder (reused if trained)")
    parser.add_argument("--epochs", type=int, default=None, help="shrink every step to this many epochs (tests)")
    parser.add_argument("--overwrite", action="store_true", help="start over: replace an earlier demo in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    plan_file = out / PLAN_NAME
    if out.exists() and any(out.iterdir()):
        if args.overwrite:
            shutil.rmtree(out)
        elif not plan_file.exists():
            print(f"clbd demo: error: {out} holds something other than a demo; pass --overwrite or another --out")
            return 2
    out.mkdir(parents=True, exist_ok=True)
    plan, attack = demo_plan(Path(args.base_dir), out, args.epochs)
    if plan_file.exists():
        if yaml.safe_load(plan_file.read_text()) != plan:
            print(
                f"clbd demo: error: {out} holds a demo of other settings (--base-dir, --epochs); pass --overwrite "
                "to start it over, or another --out"
            )
            return 2
        # Finished steps are reused and an interrupted fit resumes from its last checkpoint (clbd experiment).
        print(f"clbd demo: continuing the demo in {out} where it stopped (--overwrite starts it over)", flush=True)
    Path(attack).write_text(attack_config(Path(args.base_dir)))
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))

    code = experiment(["--config", str(plan_file), "--out", str(out)])
    if code:
        return code
    preview = out / "poisoned_samples.png"
    if not preview.exists():  # a continued demo made it already, from the same plan
        run_step(
            [
                "poison",
                "preview",
                "--config",
                absolute("configs/smoke/clip_shapes.yaml"),
                "--config",
                attack,
                "--out",
                str(preview),
                "--count",
                "8",
            ]
        )
    print(
        f"\nWritten: {out / 'table.md'} (the table above), {out / 'table.png'} (its bars), "
        f"{out / 'poisoned_samples.png'} (poisoned pairs and what the model sees); runs in {out}/seed0, the clean "
        f"base model in {args.base_dir}"
    )
    return 0
