"""Back home after a GPU call: what ``benchmarks/gpu_check.sh OUT`` left, kept under ``results/`` and the tables made
again from it, in one command (the steps a session otherwise types by hand at the end of its time).

    python benchmarks/gpu_collect.py OUT

- ``OUT/gpu_throughput.json`` -> ``results/gpu_throughput/<date>-<gpu>.json`` (the date it was measured, the GPU's
  short name: ``2026-12-06-h100``; a second call that day gets ``-2``), never over an earlier call's file;
- the call's small files (summary, log, environment, pytest's JUnit file, the arms' schedule, the NA stage's archive)
  -> ``results/gpu_calls/<same name>/`` (a file over ``--max-file-mb`` is left out, and said);
- each arm in ``OUT/arms/arms.tar`` (benchmarks/arm_bundle.py) -> ``results/<plan>/<id>/`` (the plan the arms stage
  ran, from ``arms_schedule.json``); an arm already there is kept unless ``--replace``; an arm holding a checkpoint,
  a link or a path outside its folder is refused before anything is written (an arm cut short is left out, and said);
- then ``clbd experiment --assemble`` writes the plan's table into ``results/<plan>/`` and the README's block, and
  ``gpu_throughput_table.py`` the speed table and its verdict into docs/benchmarks.md.

It prints what it wrote, for ``git add``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
from datetime import date
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.arm_bundle import BUNDLE, arm_ids, arms_in, open_arm  # noqa: E402

DEFAULT_PLAN = "configs/experiment/na_cifar10_gpu.yaml"
CALL_FILES = (
    "summary.txt",
    "gpu_check.log",
    "env.txt",
    "pytest_gpu.xml",
    "arms/arms_schedule.json",
    "na_run.tar.gz",
)


def gpu_short_name(machine: dict, device: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA H200`` -> ``h200``; ``cpu`` for a CPU rehearsal."""
    name = str(machine.get("gpu") or device or "unknown").lower()
    model = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    if model:
        return model.group(1)
    name = re.sub(r"\b(nvidia|geforce|tesla)\b", "", name)
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def call_name(out: Path, throughput: dict | None) -> str:
    if throughput is not None:
        day = str(throughput.get("measured_at") or "")[:10] or date.today().isoformat()
        return f"{day}-{gpu_short_name(throughput.get('machine') or {}, str(throughput.get('device') or ''))}"
    env = out / "env.txt"  # a call whose throughput stage wrote nothing: the GPU from nvidia-smi's lines
    text = env.read_text(errors="replace").lower() if env.exists() else ""
    model = re.search(r"nvidia ([a-z]{1,2}\d{2,4})", text)
    return f"{date.today().isoformat()}-{model.group(1) if model else 'unknown'}"


def first_free(name: str, taken_by_another_call) -> str:
    """``name``, or ``name-2``, ``name-3``... the first that ``taken_by_another_call`` says is not another call's."""
    candidate, n = name, 1
    while taken_by_another_call(candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def differs(path: Path, source: Path) -> bool:
    return path.exists() and path.read_bytes() != source.read_bytes()


def arm_members(bundle: Path, name: str, data: bytes) -> tuple[str, list[tarfile.TarInfo]]:
    """The arm id an archive in the bundle holds (``seed0/simclr-na``) and its members; SystemExit naming it for
    anything that is not an exported arm's plain files."""
    where = f"{bundle}: {name}"
    with open_arm(data) as tar:
        members = tar.getmembers()
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            raise SystemExit(f"{where}: {member.name} is not a plain file inside the arm's folder; nothing written")
        if member.name.endswith(".ckpt"):
            raise SystemExit(f"{where}: holds a checkpoint ({member.name}); results/ keeps small files only")
    ids = arm_ids(members)
    if len(ids) != 1:
        raise SystemExit(f"{where}: expected one arm's folder (seedN/<arm>), found {sorted(ids) or 'none'}")
    return ids.pop(), members


def unpack_arms(checked: list[tuple[bytes, str, list[tarfile.TarInfo]]], results: Path, replace: bool):
    """Each checked arm into ``results/<arm id>/``; returns the arm ids unpacked and those kept as they were."""
    unpacked, kept = [], []
    for data, arm_id, members in checked:
        target = results / arm_id
        if target.exists() and not replace:
            kept.append(arm_id)
            continue
        if target.exists():
            shutil.rmtree(target)
        results.mkdir(parents=True, exist_ok=True)
        with open_arm(data) as tar:
            tar.extractall(results, members=members, filter="data")
        unpacked.append(arm_id)
    return unpacked, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh wrote (the run tool's files_at)")
    parser.add_argument("--results", type=Path, default=REPO / "results", help="where the repository keeps results")
    parser.add_argument("--plan", type=Path, help=f"the arms' plan (default: the call's, else {DEFAULT_PLAN})")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md", help="holds the plan's table block")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md", help="holds the speed table")
    parser.add_argument("--replace", action="store_true", help="unpack arms over ones already in results/")
    parser.add_argument("--max-file-mb", type=float, default=2.0, help="the call's files above this are left out")
    args = parser.parse_args(argv)
    out = args.out
    if not out.is_dir():
        raise SystemExit(f"{out}: no such folder (the GPU call's output)")
    schedule_file = out / "arms" / "arms_schedule.json"
    schedule = json.loads(schedule_file.read_text()) if schedule_file.exists() else {}
    plan = args.plan or REPO / schedule.get("plan", DEFAULT_PLAN)
    if not plan.is_file():
        raise SystemExit(f"--plan: {plan} is not a file")
    if schedule.get("shrunk") and args.plan is None:
        raise SystemExit(f"{schedule_file}: the arms ran a shrunk rehearsal plan; name it with --plan")
    arms_results = args.results / plan.stem
    for document in (args.readme, args.docs):
        if not document.is_file():
            raise SystemExit(f"{document}: no such file (it holds a table block)")

    # Every archive checked before anything is written.
    bundle = out / "arms" / BUNDLE
    checked = [(data, *arm_members(bundle, name, data)) for name, data in arms_in(bundle)]
    throughput_file = out / "gpu_throughput.json"
    throughput = json.loads(throughput_file.read_text()) if throughput_file.exists() else None
    if throughput is not None and "results" not in throughput:
        raise SystemExit(f"{throughput_file} has no 'results' (not a gpu_throughput.json?)")
    name = call_name(out, throughput)
    written: list[Path] = []

    calls = args.results / "gpu_throughput"
    if throughput is not None:
        calls.mkdir(parents=True, exist_ok=True)
        name = first_free(name, lambda candidate: differs(calls / f"{candidate}.json", throughput_file))
        if (calls / f"{name}.json").exists():  # the same file: collected before
            print(f"gpu_collect: {throughput_file} is already kept as {calls / name}.json")
        else:
            shutil.copyfile(throughput_file, calls / f"{name}.json")
            written.append(calls / f"{name}.json")
    else:
        print(f"gpu_collect: {out} has no gpu_throughput.json (the throughput stage wrote none)")

    sources = []
    for source in (out / relative for relative in CALL_FILES):
        if source.is_file() and source.stat().st_size / 2**20 > args.max_file_mb:
            print(f"gpu_collect: left out {source} ({source.stat().st_size / 2**20:.1f} MB > --max-file-mb)")
        elif source.is_file():
            sources.append(source)
    calls_files = args.results / "gpu_calls"
    name = first_free(name, lambda candidate: any(differs(calls_files / candidate / s.name, s) for s in sources))
    call_folder = calls_files / name
    for source in sources:
        target = call_folder / source.name
        if not target.exists():
            call_folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            written.append(target)

    unpacked, kept = unpack_arms(checked, arms_results, args.replace)
    for arm_id in kept:
        print(f"gpu_collect: {arm_id} is already in {arms_results} (kept; --replace unpacks over it)")
    written += [arms_results / arm_id for arm_id in unpacked]

    if any(arms_results.glob("seed*/*")):
        assemble = [sys.executable, "-m", "clbd", "experiment", "--config", str(plan.resolve()), "--out"]
        assemble += [str(arms_results.resolve()), "--assemble", "--from", str(arms_results.resolve())]
        assemble += ["--readme", str(args.readme.resolve())]
        print("gpu_collect: " + " ".join(assemble[1:]))
        if subprocess.run(assemble, cwd=REPO).returncode != 0:
            raise SystemExit("gpu_collect: assembling the plan's table failed (above); the files are unpacked")
        written += [arms_results / "table.md", arms_results / "table.json", args.readme]
    if any(calls.glob("*.json")):
        table = [sys.executable, str(REPO / "benchmarks" / "gpu_throughput_table.py"), str(calls)]
        table += ["--arms", str(arms_results), "--docs", str(args.docs)]
        if subprocess.run(table, cwd=REPO, stdout=subprocess.DEVNULL).returncode != 0:
            raise SystemExit("gpu_collect: the speed table failed (above)")
        written.append(args.docs)
    print(f"gpu_collect: {len(unpacked)} arm(s) unpacked, {len(kept)} already there; written:")
    for path in dict.fromkeys(written):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
