"""The experiment stage of a GPU call: the highest-priority arms of a plan not yet in ``results/`` that fit the time
left, each run with ``clbd experiment --arm`` and exported as one small archive (no checkpoint) appended to the call's
``OUT/arms.tar`` (benchmarks/arm_bundle.py: one file, whatever the number of arms).

    python benchmarks/gpu_arms.py --plan configs/experiment/na_cifar10_gpu.yaml --seconds 420 \
        --data /tmp/clbd_gpu_check/data/cifar10 --work /tmp/clbd_gpu_check/arms --out OUT

Order: the plan's ``priority`` (shell patterns over arm ids), then the rest in plan order. An arm is skipped when
its estimate does not fit the seconds left (a smaller one further down may), and a defense arm when the model it
starts from is neither finished in this call's folder nor run earlier in it (its checkpoint lives on the machine
that trained it). So a model arm starts only when the defense arms that start from it fit after it too (else that
seed's defenses could never run; ``--model-alone`` starts it anyway). The estimate, printed before anything starts:
epochs x seconds per epoch + monitors + start-up for a model arm, ``--defense-s`` for a defense arm; after the first
model arm, its measured seconds per epoch replace the guess (and its measured evaluation the ``--eval-s`` guess).
Back home, ``benchmarks/gpu_collect.py OUT`` unpacks the arms into ``results/<plan>/`` and assembles the plan's table.

Each arm is its own ``clbd experiment --arm`` process with its own export folder and log (``WORK/logs/<arm>.log``,
its lines also printed with the arm's id in front). ``--parallel N`` (default 1: one after another) runs up to N of
them at once on the one GPU, by the same schedule. Order and skips as above, and: an arm waiting for a model that is training here holds its
place (arms further down do not start past it: the plan's priority holds); an arm beside another is estimated
``--slowdown`` times longer (two at once, each slower; measured by gpu_throughput.py's "two at once", else 2.0: no
gain assumed), and it starts only if it and every arm already running, all so slowed, still end within
``--seconds``; else it waits for them. A model arm's measured epoch time, when it ran beside another, is divided by
the slowdown before it replaces the guess. Arms still running at ``--seconds`` are stopped. Either way
``OUT/arms_schedule.json`` records each arm's start and end (seconds into the stage), exit status and the arms it
ran beside, with ``--parallel``, ``--slowdown`` and ``--parallel-why``.

``--shrink`` rehearses the same plan on a CPU with tiny sizes (CI runs it): a narrow ResNet, a few batches, small
poison budgets, every setting the GPU configs need replaced by its CPU form.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.arm_bundle import BUNDLE, append_arm  # noqa: E402
from clbd.experiment.runs import without_speed_settings  # noqa: E402

CLBD = [sys.executable, "-c", "import sys; from clbd import main; sys.exit(main())"]
# Two arms at once on one GPU when nothing was measured: each assumed twice as long, i.e. no gain (safe for the budget).
DEFAULT_SLOWDOWN = 2.0
# The CPU form of the GPU settings, and tiny sizes: a rehearsal of the call's mechanics, not of its numbers.
SHRINK_COMMON = [
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--trainer.benchmark=false",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--model.init_args.width=8",
    "--model.init_args.probe_epochs=2",
    "--model.init_args.channels_last=false",
    "--data.init_args.batch_size=32",
    "--data.init_args.eval_batch_size=64",
    "--data.init_args.num_workers=2",
    "--data.init_args.knn_bank_size=256",
    "--data.init_args.views_on_device=false",
    "--data.init_args.channels_last=false",
    "--data.init_args.pin_memory=false",
    "--data.init_args.resident=false",
    "--data.init_args.cache_eval_batches=false",
]
SHRINK_HEAD = ["--model.init_args.proj_hidden_dim=64"]  # every method, and the SimCLR control (not MCLDef: no head)
SHRINK_DEFENSE = [
    "--model.init_args.inversion_steps=4",
    "--model.init_args.inversion_check_every=2",
    "--model.init_args.inversion_batch_size=16",
    "--model.init_args.inversion_samples=32",
]
SHRINK_ATTACK = {"count": 16, "reference_pool_size": 8}


def shrunk(plan: dict) -> dict:
    """The plan with tiny sizes on a CPU; each attack's poison budget and reference pool shrunk where it has one."""
    plan = json.loads(json.dumps(plan))
    plan["common"] = [*plan.get("common", []), *SHRINK_COMMON]
    for entry in plan.get("methods", {}).values():
        entry["overrides"] = [*entry.get("overrides", []), *SHRINK_HEAD]
    for entry in plan.get("attacks", {}).values():
        settings = {}
        for config in entry["configs"]:
            attack = ((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}).get("init_args", {})
            settings.update((attack.get("attack") or {}).get("init_args") or {})
        shrink = [f"--data.init_args.attack.init_args.{k}={v}" for k, v in SHRINK_ATTACK.items() if k in settings]
        entry["overrides"] = [*entry.get("overrides", []), *shrink]
    if plan.get("defense_budget"):
        plan["defense_budget"] = {"steps": 2, "batch_size": 16}
    for entry in plan.get("defenses", {}).values():
        extra = SHRINK_DEFENSE if "mcldef" in " ".join(entry["configs"]) else SHRINK_HEAD
        entry["overrides"] = [*entry.get("overrides", []), "--data.init_args.train_fraction=0.5", *extra]
    return plan


def clbd_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def ordered(arms: list[dict], priority: list[str]) -> list[dict]:
    def rank(arm: dict) -> int:
        return next((i for i, pattern in enumerate(priority) if fnmatch.fnmatchcase(arm["id"], pattern)), len(priority))

    return sorted(arms, key=rank)  # stable: the plan's order within a rank


def epochs_of(plan: dict) -> int:
    for arg in reversed(plan.get("common", [])):
        if str(arg).startswith("--trainer.max_epochs="):
            return int(str(arg).split("=", 1)[1])
    raise ValueError("the plan's common overrides must set --trainer.max_epochs (the estimate needs it)")


def working_tree(folder: Path, data: Path | None) -> Path:
    """Where the arms run: the checkout's configs, and the shards as ``data/cifar10``, the relative paths the plan
    names, so each arm's record reads as the plan's on any machine and nothing is written into the checkout."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    links = {folder / "configs": REPO / "configs", folder / "benchmarks": REPO / "benchmarks"}
    if data is not None:
        links[folder / "data" / "cifar10"] = data.resolve()
    for link, target in links.items():
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return folder


def list_arms(plan_file: Path, runs: Path, results: Path | None, tree: Path) -> list[dict]:
    sources = ["--from", str(results.resolve())] if results is not None and results.is_dir() else []
    done = subprocess.run(
        [*CLBD, "experiment", "--config", str(plan_file), "--out", str(runs), *sources, "--list", "--json"],
        capture_output=True,
        text=True,
        cwd=tree,
        env=clbd_env(),
    )
    if done.returncode != 0:
        raise SystemExit(f"gpu_arms: clbd experiment --list failed:\n{done.stderr}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def arm_command(plan_file: Path, runs: Path, arm_id: str, export: Path) -> list[str]:
    return [
        *CLBD,
        "experiment",
        "--config",
        str(plan_file),
        "--out",
        str(runs),
        "--arm",
        arm_id,
        "--export",
        str(export),
    ]


def archive_arm(folder: Path, out: Path, arm_id: str) -> dict:
    """The exported arm appended to ``OUT/arms.tar`` (benchmarks/arm_bundle.py); returns its provenance
    (``epoch_s``, ``validation_s``: what it measured), empty when it wrote none."""
    append_arm(out / BUNDLE, folder, arm_id)
    provenance = folder / "provenance.json"
    return json.loads(provenance.read_text()) if provenance.exists() else {}


def learn_from(args, provenance: dict, slowdown: float) -> None:
    """A model arm's measured epoch and evaluation (divided by ``slowdown`` when it ran beside another) replace the
    estimates' guesses from now on."""
    epoch, evaluation = provenance.get("epoch_s"), provenance.get("validation_s")
    tests = [seconds for name, seconds in (provenance.get("wall_s") or {}).items() if name != "fit"]
    test = sum(tests) / len(tests) if tests else None
    if epoch:
        args.epoch_s = epoch / slowdown
    if evaluation:
        args.eval_s = evaluation / slowdown
    if test:
        args.test_s = test / slowdown
    measured = [
        f"{what} {value:.2f} s"
        for what, value in (("an epoch", epoch), ("an evaluation", evaluation), ("a clbd test", test))
        if value
    ]
    if measured:
        beside = f", beside another: / {slowdown:.2f}" if slowdown != 1 else ""
        say(
            f"gpu_arms: estimates at {args.epoch_s:.2f} s per epoch, {args.eval_s:.2f} s per evaluation and "
            f"{args.test_s:.2f} s per further clbd test from now "
            f"(measured {' and '.join(measured)}{beside})"
        )


PRINT_LOCK = threading.Lock()


def say(*args, **kwargs) -> None:
    """print, whole lines at a time while arms' output is copied from other threads."""
    with PRINT_LOCK:
        print(*args, **kwargs, flush=True)


class RunningArm:
    """One ``clbd experiment --arm`` process of the parallel schedule, its output copied line by line into its log
    and onto this process's output with the arm's id in front."""

    def __init__(self, arm: dict, command: list[str], tree: Path, log: Path, start_s: float, estimate_s: float):
        self.arm, self.start_s, self.estimate_s, self.log = arm, start_s, estimate_s, log
        self.beside: set[str] = set()
        log.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            command,
            cwd=tree,
            env=clbd_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stopped with its loader workers at the deadline
        )
        self.copier = threading.Thread(target=self._copy, daemon=True)
        self.copier.start()

    def _copy(self) -> None:
        with self.log.open("w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                say(f"[{self.arm['id']}] {line}", end="")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def defenses_s(defenses: list[dict], estimate, parallel: int, slowdown: float) -> float:
    """The time the defense arms of one model take after it: one after another, or ``parallel`` at once."""
    if not defenses:
        return 0.0
    if parallel == 1:
        return sum(estimate(arm) for arm in defenses)
    rounds = -(-len(defenses) // parallel)
    return rounds * max(estimate(arm) for arm in defenses) * (slowdown if len(defenses) > 1 else 1.0)


def run_parallel(args, pending, finished_here, estimate, plan_file, runs, tree, started, record) -> int:
    """Up to ``args.parallel`` arms at once (the rules in the module's docstring; 1: one after another); returns how
    many finished.
    A model arm's measured epoch time replaces ``args.epoch_s`` (which ``estimate`` reads)."""
    slowdown = args.slowdown
    waiting, running, ran = list(pending), [], 0

    def clock() -> float:
        return time.monotonic() - started

    def stop_all(signum=None, frame=None) -> None:  # the stage's timeout stops the arms too (own sessions)
        for job in running:
            job.stop()
        if signum is not None:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop_all)
    try:
        while True:
            for arm in list(waiting):  # start what may start, in order
                if len(running) >= args.parallel or (args.max_arms is not None and ran + len(running) >= args.max_arms):
                    break
                left = args.seconds - clock()
                here = {r.arm["id"] for r in running}
                missing = [need for need in arm["needs"] if need not in finished_here]
                if missing and all(need in here for need in missing):
                    break  # its model is training here: it holds its place
                if missing:
                    waiting.remove(arm)
                    say(f"gpu_arms: skip {arm['id']}: its model ({', '.join(missing)}) was not trained on this machine")
                    continue
                alone = estimate(arm)
                if alone > left:
                    waiting.remove(arm)
                    say(f"gpu_arms: skip {arm['id']}: ~{alone:.0f} s does not fit the {left:.0f} s left")
                    continue
                defenses = [other for other in waiting if arm["id"] in other["needs"]]
                with_defenses = alone + defenses_s(defenses, estimate, args.parallel, slowdown)
                if defenses and not args.model_alone and with_defenses > left:
                    waiting.remove(arm)
                    say(
                        f"gpu_arms: skip {arm['id']}: with the defense arms that start from its checkpoint "
                        f"({', '.join(d['id'] for d in defenses)}) ~{with_defenses:.0f} s does not fit the {left:.0f} s "
                        "left, and they can run only where it trained (--model-alone runs it without them)"
                    )
                    continue
                if running:
                    beside = alone * slowdown
                    late = [r.arm["id"] for r in running if r.start_s + r.estimate_s * slowdown > args.seconds]
                    if beside > left or late:
                        break  # it waits for the running arms rather than make them, or itself, overrun
                else:
                    beside = alone
                waiting.remove(arm)
                say(
                    f"\n=== gpu_arms: {arm['id']} (~{beside:.0f} s{' beside ' + ', '.join(here) if here else ''}, "
                    f"{left:.0f} s left)"
                )
                name = arm["id"].replace("/", "_")
                command = arm_command(plan_file, runs, arm["id"], args.work / "export" / name)
                started_arm = RunningArm(arm, command, tree, args.work / "logs" / f"{name}.log", clock(), alone)
                for other in running:
                    other.beside.add(arm["id"])
                    started_arm.beside.add(other.arm["id"])
                running.append(started_arm)
            if not running:  # what is left waits for nothing that could still come (--max-arms reached)
                if waiting:
                    ids = [arm["id"] for arm in waiting]
                    say(
                        f"gpu_arms: {len(ids)} arm(s) not started: {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''}"
                    )
                return ran
            time.sleep(0.5)
            for job in list(running):
                late = clock() > args.seconds
                if job.process.poll() is None and not late:
                    continue
                if job.process.poll() is None:
                    say(f"gpu_arms: stopping {job.arm['id']}: the stage's {args.seconds:.0f} s are over")
                    job.stop()
                job.copier.join(timeout=10)
                running.remove(job)
                code, seconds = job.process.returncode, clock() - job.start_s
                say(f"gpu_arms: {job.arm['id']} exit {code} after {seconds:.0f} s")
                record(job.arm["id"], job.start_s, clock(), code, sorted(job.beside))
                if code != 0:
                    continue
                ran += 1
                finished_here.add(job.arm["id"])
                name = job.arm["id"].replace("/", "_")
                provenance = archive_arm(args.work / "export" / name / job.arm["id"], args.out, job.arm["id"])
                if not job.arm["needs"]:  # a model arm: its measured times from now on
                    learn_from(args, provenance, slowdown if job.beside else 1.0)
    finally:
        stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="time this stage may take")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the runs (checkpoints stay here)")
    parser.add_argument("--out", type=Path, required=True, help="the call's output: arms.tar, arms_schedule.json")
    parser.add_argument("--data", type=Path, help="CIFAR-10 shards, seen as data/cifar10 where the plan reads them")
    parser.add_argument("--results", type=Path, help="finished arms to skip (default results/<plan name>)")
    parser.add_argument("--epoch-s", type=float, default=6.1, help="seconds per epoch until one is measured")
    parser.add_argument("--eval-s", type=float, default=12.4, help="seconds per monitor pass")
    parser.add_argument("--startup-s", type=float, default=60.0, help="start-up and the final clbd test per model arm")
    parser.add_argument(
        "--test-s", type=float, default=30.0, help="seconds per clbd test beyond the first (the clean reference's)"
    )
    parser.add_argument("--defense-s", type=float, default=90.0, help="seconds per defense arm")
    parser.add_argument("--max-arms", type=int, default=None, help="run at most this many arms")
    parser.add_argument("--shrink", action="store_true", help="tiny sizes on a CPU (the rehearsal)")
    parser.add_argument(
        "--speed-args",
        default="",
        metavar="'ARG ...'",
        help="clbd fit arguments of the fastest setting measured, in one string; speed settings only (the arm is "
        "the same arm with or without them), others are left out",
    )
    parser.add_argument("--schedule-only", action="store_true", help="print the order and estimates, run nothing")
    parser.add_argument("--parallel", type=int, default=1, help="arms at once on the one device (default 1)")
    parser.add_argument(
        "--slowdown",
        type=float,
        default=DEFAULT_SLOWDOWN,
        help=f"how much longer an arm takes beside another (default {DEFAULT_SLOWDOWN}: no gain from two at once)",
    )
    parser.add_argument("--parallel-why", default="", help="why this --parallel (recorded in arms_schedule.json)")
    parser.add_argument(
        "--model-alone",
        action="store_true",
        help="start a model arm even when the defense arms that start from it would not fit after it (they are then "
        "lost to this plan's table for that seed: its checkpoint stays on this machine)",
    )
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel: at least 1, got {args.parallel}")
    if args.slowdown < 1:
        parser.error(f"--slowdown: at least 1 (an arm beside another is not faster), got {args.slowdown}")
    started = time.monotonic()
    plan = yaml.safe_load(args.plan.read_text())
    results = args.results or REPO / "results" / args.plan.stem
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plan_file = args.plan.resolve()
    args.work = args.work.resolve()
    given = args.speed_args.split()
    others = without_speed_settings(given)
    if others:
        print(f"gpu_arms: leaving out {' '.join(others)}: not speed settings, they would make other arms")
    speed_args = [arg for arg in given if arg not in others]
    if args.shrink or speed_args:
        plan = shrunk(plan) if args.shrink else plan
        plan["common"] = [*plan.get("common", []), *speed_args]
        plan_file = args.work / args.plan.name
        plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    tree = working_tree(args.work / "tree", args.data)
    runs = (args.work / "runs").resolve()
    arms = ordered(list_arms(plan_file, runs, results, tree), plan.get("priority") or [])
    epochs = epochs_of(plan)
    every = next((int(str(a).split("=")[1]) for a in plan.get("common", []) if "check_val_every_n_epoch=" in str(a)), 1)

    def estimate(arm: dict) -> float:  # args.epoch_s: the guess, then a model arm's measured epoch time
        if arm["kind"] == "defense":
            return args.defense_s
        # The start-up holds one clbd test; the clean reference has one per attack of the plan (its ASR under each
        # attack's trigger).
        tests = len(arm.get("evaluations") or [None])
        return epochs * args.epoch_s + (epochs // every) * args.eval_s + args.startup_s + (tests - 1) * args.test_s

    pending = [arm for arm in arms if arm["state"] != "done"]
    print(
        f"gpu_arms: {len(arms)} arms in {args.plan.name}, {len(arms) - len(pending)} already in {results} or here; "
        f"{args.seconds:.0f} s for this stage; estimates at {args.epoch_s} s per epoch, {epochs} epochs:"
    )
    for arm in pending:
        defenses = [other for other in pending if arm["id"] in other["needs"]]
        group = estimate(arm) + defenses_s(defenses, estimate, args.parallel, args.slowdown)
        print(
            f"  {arm['id']:<34} ~{estimate(arm):5.0f} s"
            + (f"  (needs {', '.join(arm['needs'])})" if arm["needs"] else "")
            + (f"  (~{group:.0f} s with its {len(defenses)} defense arm(s))" if defenses else "")
        )
    if args.schedule_only:
        return 0
    finished_here = {arm["id"] for arm in arms if arm["state"] == "done" and str(runs) in arm["where"]}
    plan_path = args.plan.resolve()
    schedule = {
        # The plan as given (not the speed-argument copy in --work): gpu_collect.py unpacks the arms for it.
        "plan": str(plan_path.relative_to(REPO)) if plan_path.is_relative_to(REPO) else str(plan_path),
        "shrunk": args.shrink,
        "parallel": args.parallel,
        "slowdown": args.slowdown,
        "why": args.parallel_why,
        "seconds": args.seconds,
        "arms": [],
    }

    def record(arm_id: str, start_s: float, end_s: float, code: int, beside: list[str]) -> None:
        entry = {"id": arm_id, "start_s": round(start_s, 1), "end_s": round(end_s, 1), "exit": code, "beside": beside}
        schedule["arms"].append(entry)
        (args.out / "arms_schedule.json").write_text(json.dumps(schedule, indent=1) + "\n")

    if args.parallel > 1:
        print(f"gpu_arms: up to {args.parallel} arms at once, each ~{args.slowdown:.2f}x longer beside another")
    ran = run_parallel(args, pending, finished_here, estimate, plan_file, runs, tree, started, record)
    print(f"gpu_arms: {ran} arm(s) finished and archived in {args.out} after {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
