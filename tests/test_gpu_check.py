"""benchmarks/gpu_check.sh rehearsed on the CPU (CLBD_GPU_CHECK_CPU_DRYRUN=1): the GPU machine gets one try, so the
script's conversion, NA run, clbd test and summary must already work here, on a tiny CIFAR-10-shaped archive."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.arm_bundle import arms_in, open_arm

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _jpeg(rng: np.random.Generator, label: int) -> bytes:
    # Each class its own mean colour, so the kNN monitor has something to find.
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + 25 * label + rng.normal(0, 20, size=(32, 32, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _tiny_cifar_archive(path: Path, train_per_class: int = 10, test_per_class: int = 3) -> Path:
    """cifar10-jpg.tar.gz's layout (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg), 32 px JPEGs."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for label, name in enumerate(CLASSES):
                for i in range(count):
                    data = _jpeg(rng, label)
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def test_gpu_check_cpu_dry_run_converts_trains_tests_and_summarises(tmp_path):
    archive = _tiny_cifar_archive(tmp_path / "cifar10-jpg.tar.gz")
    out = tmp_path / "out"
    # What the throughput stage leaves for the NA run: the fastest setting's fit arguments (here "all" but its
    # compilation, which takes a minute on this CPU): the NA run must accept them and train with them.
    from benchmarks.gpu_throughput import fit_arguments, knobs

    fastest = {**knobs("all", "sgd", "32-true"), "compile_mode": None}
    out.mkdir()
    (out / "gpu_throughput.json").write_text(
        json.dumps(
            {
                "machine": {},
                "device": "cpu",
                "precision": "32-true",
                "results": [],
                "fastest_simclr_setting": {
                    "setting": "all",
                    "fit_args": fit_arguments(fastest),
                    "epoch_s_with_device_views": 2.0,  # the arms' first estimate: x1.25
                    "extra_start_s": 30.0,  # its compilation, on top of each arm's start-up
                },
                # ... and two at once measured paying: the arms stage runs two at once, each estimated 1.5x longer.
                "two_at_once": {
                    "setting": "all",
                    "steps": 90,
                    "alone_views_per_s": 20000.0,
                    "pair_views_per_s": 26000.0,
                    "ratio": 1.3,
                    "slowdown": 1.5,
                    "per_process_slowdown": [1.5, 1.5],
                },
            }
        )
    )
    env = dict(
        os.environ,
        CLBD_PYTHON=sys.executable,
        CLBD_GPU_CHECK_CPU_DRYRUN="1",
        CLBD_GPU_CHECK_SKIP_INSTALL="1",  # CI has the packages; the wheel install is rehearsed by hand (docs)
        CLBD_GPU_CHECK_STAGES="arms,na",
        CLBD_GPU_CHECK_WORK=str(tmp_path / "work"),
        CLBD_GPU_CHECK_MAXCOUNT="25",  # 4 training shards for the 2 loader processes
        CLBD_GPU_NA_ARGS="--data.init_args.attack.init_args.count=8 "
        "--data.init_args.attack.init_args.reference_pool_size=4 --data.init_args.knn_bank_size=64",
    )
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), str(archive)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # At most 8 files come back from a device call: the check leaves no more, the arms bundled in one.
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "arms/arms.tar",
        "arms/arms_schedule.json",
        "env.txt",
        "gpu_check.log",
        "gpu_throughput.json",
        "na_run.tar.gz",
        "summary.txt",
    ], files
    assert "gpu_check: done in" in log and "7 files in" in log and "only 8 come back" not in log
    with tarfile.open(out / "na_run.tar.gz") as tar:
        na = {
            Path(n).name: tar.extractfile(n).read().decode() for n in tar.getnames() if n.endswith((".jsonl", ".csv"))
        }
    epochs = [json.loads(line) for line in na["na_epochs.jsonl"].splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    for e in epochs:
        assert e["train_s"] > 0 and e["val_s"] > 0
        assert e["train_images"] == 2 * 2 * 32  # 2 batches (limit_train_batches) x 32 x 2 views
        assert 0 <= e["val/knn_acc"] <= 1 and 0 <= e["val/knn_asr"] <= 1
    assert "val/knn_acc" in na["na_metrics.csv"].splitlines()[0]
    with tarfile.open(out / "na_run.tar.gz") as tar:
        names = tar.getnames()
        assert "./poison_summary.json" in names and not any(n.endswith(".ckpt") for n in names)
        metrics = json.loads(tar.extractfile("./checkpoints/metrics.json").read())
        config = tar.extractfile("./config.yaml").read().decode()
    assert "optimizer_impl: fused" in config and "batchnorm_fp32: true" in config  # the fastest setting's
    assert metrics["last.ckpt"]["attack"]["target_name"] == "airplane"
    summary = (out / "summary.txt").read_text()
    assert "NA run: 2 epochs" in summary and "clbd test (last.ckpt): kNN acc" in summary, log[-4000:]
    assert "arm seed0/simclr-na: cpu" in summary and "arm seed0/mcldef: cpu" in summary
    assert (out / "gpu_check.log").read_text().count("=== [") >= 5
    # The experiment arms (the GPU plan shrunk): NA, then MCLDef and its control on that model, one archive each,
    # trained with the fastest setting's speed arguments.
    arms_bundled = arms_in(out / "arms" / "arms.tar")
    archives = sorted(name for name, _ in arms_bundled)
    assert archives == ["arm-seed0_finetune.tar.gz", "arm-seed0_mcldef.tar.gz", "arm-seed0_simclr-na.tar.gz"], log[
        -4000:
    ]
    # Two at once: the defenses started only after the NA model they start from had finished, then ran together,
    # each its own process with its own log; the summary says how many ran at once and why.
    assert "arms: 2 at a time: two at once measured x1.30 of one alone (all) > 1.15" in log
    assert (
        "arms: estimates at 2.50 s per epoch (the fastest setting measured, x1.25), 90 s start-up and test each" in log
    )
    schedule = json.loads((out / "arms" / "arms_schedule.json").read_text())
    assert schedule["parallel"] == 2 and schedule["slowdown"] == 1.5
    ran = {entry["id"]: entry for entry in schedule["arms"]}
    model, mcldef, finetune = ran["seed0/simclr-na"], ran["seed0/mcldef"], ran["seed0/finetune"]
    assert all(entry["exit"] == 0 for entry in ran.values())
    assert model["end_s"] <= mcldef["start_s"] and model["end_s"] <= finetune["start_s"] and model["beside"] == []
    assert mcldef["beside"] == ["seed0/finetune"] and finetune["beside"] == ["seed0/mcldef"]
    assert max(mcldef["start_s"], finetune["start_s"]) < min(mcldef["end_s"], finetune["end_s"])
    for name in ("seed0_simclr-na", "seed0_mcldef", "seed0_finetune"):
        assert "Exported" in (tmp_path / "work" / "arms" / "logs" / f"{name}.log").read_text()
    assert "experiment arms: up to 2 at once, each estimated x1.50 beside another (two at once measured" in summary
    assert "arm seed0/mcldef: cpu" in summary and "(beside seed0/finetune)" in summary
    for _, data in arms_bundled:
        with open_arm(data) as tar:
            assert not any(n.endswith(".ckpt") for n in tar.getnames())
    schedule_record = json.loads((out / "arms" / "arms_schedule.json").read_text())
    assert schedule_record["plan"] == "configs/experiment/na_cifar10_gpu.yaml" and schedule_record["shrunk"]
    # Back home: benchmarks/gpu_collect.py keeps what the call left under results/ and makes the tables again.
    work = tmp_path / "work" / "arms"
    plan = REPO / "configs" / "experiment" / "na_cifar10_gpu.yaml"
    results = tmp_path / "results"
    readme, docs = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text("# r\n<!-- clbd-table: na_cifar10_gpu -->\nnone\n<!-- /clbd-table: na_cifar10_gpu -->\n")
    docs.write_text("# d\n<!-- clbd-table: gpu_throughput -->\nnone\n<!-- /clbd-table: gpu_throughput -->\n")
    collect = [sys.executable, str(REPO / "benchmarks" / "gpu_collect.py"), str(out), "--results", str(results)]
    collect += ["--readme", str(readme), "--docs", str(docs)]
    refused = subprocess.run(collect, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert refused.returncode != 0 and "shrunk rehearsal plan; name it with --plan" in refused.stderr
    assert not results.exists()  # refused before anything was written
    collect += ["--plan", str(work / plan.name)]  # the shrunk plan the rehearsal's arms ran
    collected = subprocess.run(collect, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert collected.returncode == 0, (collected.stdout + collected.stderr)[-4000:]
    assert "3 arm(s) unpacked, 0 already there" in collected.stdout
    name = f"{date.today().isoformat()}-cpu"
    assert (results / "gpu_throughput" / f"{name}.json").read_bytes() == (out / "gpu_throughput.json").read_bytes()
    call_files = {p.name for p in (results / "gpu_calls" / name).iterdir()}
    assert call_files == {"summary.txt", "gpu_check.log", "env.txt", "arms_schedule.json", "na_run.tar.gz"}
    arms = results / "na_cifar10_gpu"
    assert "optimizer_impl: fused" in (arms / "seed0" / "simclr-na" / "config.yaml").read_text()
    assert {"provenance.json", "eval.json", "experiment_command.json", "poison_summary.json", "metrics.csv"} <= {
        p.name for p in (arms / "seed0" / "simclr-na").iterdir()
    }
    assert json.loads((arms / "seed0" / "mcldef" / "defense_metrics.json").read_text())["defense"] == "mcldef"
    # ... the plan's table, each row saying its seeds and device, in results/ and in the README's block ...
    table = json.loads((arms / "table.json").read_text())
    rows = {row["name"]: row for row in table["rows"]}
    assert rows["simclr + na"]["seeds"] == [0] and rows["mcldef"]["seeds"] == rows["finetune"]["seeds"] == [0]
    assert rows["simclr + na"]["devices"][0].startswith("cpu") and "seed0/simclr-clean" in table["missing"]
    assert "simclr + na" in readme.read_text() and "none" not in readme.read_text()
    assert "From 1 call(s)" in docs.read_text()
    # Collected again (a session unsure whether it did): nothing duplicated, nothing overwritten.
    (arms / "seed0" / "mcldef" / "note.txt").write_text("mine")
    again = subprocess.run(collect, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "0 arm(s) unpacked, 3 already there" in again.stdout, again.stderr[-3000:]
    assert len(list((results / "gpu_throughput").glob("*.json"))) == 1
    assert (arms / "seed0" / "mcldef" / "note.txt").read_text() == "mine"
    # Unpacked as results/, the next call skips them and starts with the next arm of the plan's priority list.
    schedule = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_arms.py"),
            "--plan",
            str(plan),
            "--seconds",
            "600",
            "--work",
            str(work),
            "--out",
            str(tmp_path / "out2"),
            "--results",
            str(arms),
            "--shrink",
            "--schedule-only",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert schedule.returncode == 0 and "3 already in" in schedule.stdout, schedule.stdout + schedule.stderr
    pending = [line.split()[0] for line in schedule.stdout.splitlines() if line.startswith("  seed")]
    assert pending[0] == "seed0/simclr-clean" and "seed0/simclr-na" not in pending


def test_arms_one_after_another_learn_their_estimates_from_the_first(tmp_path):
    """The arms stage as a first call most likely runs it (two at once not measured yet: --parallel 1): NA, then
    MCLDef on that model, one after another, each archived; the model arm's measured epoch replaces the guess."""
    archive = _tiny_cifar_archive(tmp_path / "cifar10-jpg.tar.gz")
    data = tmp_path / "data"
    convert = [sys.executable, "-m", "clbd", "data", "cifar10", "--src", str(archive), "--out", str(data)]
    subprocess.run([*convert, "--maxcount", "25", "--quiet"], check=True, cwd=REPO, timeout=120, capture_output=True)
    out = tmp_path / "out"
    arms = [sys.executable, str(REPO / "benchmarks" / "gpu_arms.py"), "--plan"]
    arms += [str(REPO / "configs" / "experiment" / "na_cifar10_gpu.yaml"), "--seconds", "600", "--work"]
    arms += [str(tmp_path / "work"), "--out", str(out), "--data", str(data), "--results", str(tmp_path / "none")]
    run = subprocess.run([*arms, "--shrink", "--max-arms", "2"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    schedule = json.loads((out / "arms_schedule.json").read_text())
    assert schedule["parallel"] == 1
    model, defense = schedule["arms"]
    assert (model["id"], defense["id"]) == ("seed0/simclr-na", "seed0/mcldef")
    assert model["exit"] == defense["exit"] == 0 and model["end_s"] <= defense["start_s"]
    assert model["beside"] == defense["beside"] == []
    assert [name for name, _ in arms_in(out / "arms.tar")] == ["arm-seed0_simclr-na.tar.gz", "arm-seed0_mcldef.tar.gz"]
    assert "estimates at 6.1 s per epoch" in run.stdout  # the guess, printed before anything starts
    assert "gpu_arms: estimates at" in run.stdout and "(measured an epoch" in run.stdout  # then the NA arm's own


def test_a_model_arm_waits_for_a_call_that_also_fits_its_defenses(tmp_path):
    """A defense arm can run only where its model trained (the checkpoint stays on that machine), so the NA model
    does not start when MCLDef and the control would not fit after it: the call runs the clean reference instead,
    and NA with its defenses wait for a call with room for all three (--model-alone overrides)."""
    archive = _tiny_cifar_archive(tmp_path / "cifar10-jpg.tar.gz")
    data = tmp_path / "data"
    convert = [sys.executable, "-m", "clbd", "data", "cifar10", "--src", str(archive), "--out", str(data)]
    subprocess.run([*convert, "--maxcount", "25", "--quiet"], check=True, cwd=REPO, timeout=120, capture_output=True)
    arms = [sys.executable, str(REPO / "benchmarks" / "gpu_arms.py"), "--plan"]
    arms += [str(REPO / "configs" / "experiment" / "na_cifar10_gpu.yaml"), "--work", str(tmp_path / "work")]
    arms += ["--data", str(data), "--results", str(tmp_path / "none"), "--shrink", "--max-arms", "1"]
    # A model arm ~61 s (1 epoch x 1 s + 60 s start-up), a defense arm 90 s: NA with both ~241 s > 200 s.
    arms += ["--seconds", "200", "--epoch-s", "1"]
    listed = subprocess.run(
        [*arms, "--out", str(tmp_path / "o0"), "--schedule-only"], capture_output=True, text=True, cwd=REPO
    )
    assert "seed0/simclr-na" in listed.stdout and "(~241 s with its 2 defense arm(s))" in listed.stdout, listed.stdout
    # The clean reference runs a clbd test per attack of the plan (4): 61 s + 3 further tests x 30 s.
    clean = next(line for line in listed.stdout.splitlines() if line.strip().startswith("seed0/simclr-clean"))
    assert clean.split("~")[1].split()[0] == "151", clean
    run = subprocess.run([*arms, "--out", str(tmp_path / "o1")], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert (
        "skip seed0/simclr-na: with the defense arms that start from its checkpoint (seed0/mcldef, seed0/finetune) "
        "~241 s does not fit the" in run.stdout
    )
    assert "skip seed0/mcldef: its model (seed0/simclr-na) was not trained on this machine" in run.stdout
    schedule = json.loads((tmp_path / "o1" / "arms_schedule.json").read_text())
    assert [arm["id"] for arm in schedule["arms"]] == ["seed0/simclr-clean"]
    # --model-alone: NA starts anyway (its defenses then cannot follow in this call).
    alone = subprocess.run(
        [*arms, "--out", str(tmp_path / "o2"), "--model-alone"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert alone.returncode == 0, (alone.stdout + alone.stderr)[-4000:]
    schedule = json.loads((tmp_path / "o2" / "arms_schedule.json").read_text())
    assert [arm["id"] for arm in schedule["arms"]] == ["seed0/simclr-na"]
    from benchmarks.gpu_arms import defenses_s

    def estimate(arm):
        return {"a": 90.0, "b": 90.0, "c": 30.0}[arm["id"]]

    arms_ = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    assert defenses_s(arms_, estimate, 1, 1.5) == 210.0  # one after another
    assert defenses_s(arms_, estimate, 2, 1.5) == 2 * 90 * 1.5  # two rounds of two at once, each slowed
    assert defenses_s(arms_[:1], estimate, 2, 1.5) == 90.0 and defenses_s([], estimate, 1, 1.5) == 0.0


def test_throughput_benchmark_and_its_summary_run_on_the_cpu(tmp_path):
    """The throughput stage's script with --device cpu --quick (SimCLR eager and the CPU-runnable speed settings, each
    against eager, with device views and an evaluation estimate; eager profiled; the fastest in two processes at once
    vs one alone; CLIP and its device images) on the tiny archive, then the report's reading of its JSON (nvjpeg,
    fp16 and the compiled settings: CUDA only)."""
    archive = _tiny_cifar_archive(tmp_path / "cifar10-jpg.tar.gz")
    results = tmp_path / "gpu_throughput.json"
    profile_md = tmp_path / "gpu_profile.md"
    bench = [sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--device", "cpu", "--quick"]
    bench += ["--data", str(archive), "--cache", str(tmp_path / "cache"), "--json", str(results)]
    bench += ["--profile-md", str(profile_md), "--pair-steps", "2"]
    run = subprocess.run(bench, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    data = json.loads(results.read_text())
    measured = [(r["model"], r["setting"]) for r in data["results"]]
    assert measured == [
        *(("simclr", s) for s in ("eager", "channels_last", "batchnorm_fp32", "optimizer")),
        *(("clip", s) for s in ("eager", "fused_adamw", "double_batch")),
    ]
    settings = [setting for model, setting in measured if model == "simclr"]
    eager, optimizer, clip = data["results"][0], data["results"][3], data["results"][4]
    clip_fused, clip_double = data["results"][5], data["results"][6]
    # CLIP's settings against CLIP's eager: fused AdamW, twice the batch (twice the FLOPs per step, the same images).
    assert clip["ratio_vs_eager"] == 1.0 and clip_fused["ratio_vs_eager"] > 0 and clip_double["ratio_vs_eager"] > 0
    assert "--model.init_args.optimizer_impl=fused" in clip_fused["fit_args"] and clip_fused["batch"] == 32
    assert clip_double["batch"] == 64 and "--data.init_args.batch_size=64" in clip_double["fit_args"]
    assert clip_double["flops_per_step"] == pytest.approx(2 * clip["flops_per_step"], rel=0.01)
    assert eager["ratio_vs_eager"] == 1.0 and optimizer["ratio_vs_eager"] > 0
    assert "--model.init_args.optimizer_impl=fused" in optimizer["fit_args"]  # the GPU config's SGD
    assert "--model.init_args.optimizer_impl=for-loop" in eager["fit_args"]
    assert optimizer["device_views_per_s"] > 0 and optimizer["epoch_s_with_device_views"] > optimizer["epoch_s_median"]
    assert optimizer["eval_s_estimate"] > optimizer["knn_vote_s"] > 0
    assert clip["device_images_per_s"] > 0 and optimizer["flops_per_step"] == eager["flops_per_step"]
    shares = eager["profile"]["shares"]
    assert abs(sum(shares.values()) - 1) < 1e-6 and shares["convolution"] > 0.1  # a ResNet's step is mostly convs
    assert "profile" not in optimizer and "| kind | share |" in profile_md.read_text()
    clip_shares = clip["profile"]["shares"]  # CLIP's eager is profiled too: a transformer's step, attention in it
    assert clip_shares["matmul"] > 0.1 and clip_shares["attention"] > 0 and clip_shares.get("convolution", 0) < 0.2
    assert data["fastest_simclr_setting"]["setting"] in settings
    from benchmarks.gpu_check_report import throughput_summary

    summary = "\n".join(throughput_summary(results))
    assert (
        "x1.00 eager" in summary
        and "views made on the device" in summary
        and "CLIP images made on the device" in summary
    )
    assert "profile (CPU op (self) time" in summary and "fastest SimCLR setting" in summary
    # Two at once: the fastest setting in two processes at once vs one alone, their timed steps started together.
    pair = data["two_at_once"]
    assert pair["setting"] in settings and pair["steps"] == 2 and len(pair["per_process_slowdown"]) == 2, pair
    assert pair["ratio"] > 0 and abs(pair["ratio"] * pair["slowdown"] - 2) < 1e-9
    assert pair["pair_start_skew_s"] < 5 and pair["pair_span_s"] > 0
    assert f"two at once ({pair['setting']}, 2 steps per process): one alone" in summary

    # The next call on the same device measures only what no earlier call did (eager always, the ratios' reference),
    # takes two at once and the fastest setting from the earlier call when they are the best known...
    calls = tmp_path / "results" / "gpu_throughput"
    calls.mkdir(parents=True)
    (calls / "2026-12-05-cpu.json").write_text(results.read_text())
    second = tmp_path / "second.json"
    bench[bench.index(str(results))] = str(second)
    run = subprocess.run([*bench, "--measured", str(calls)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    again = json.loads(second.read_text())
    assert [(r["model"], r["setting"]) for r in again["results"]] == [("simclr", "eager"), ("clip", "eager")]
    assert again["two_at_once"]["measured_in"] == "2026-12-05-cpu.json"
    assert again["two_at_once"]["ratio"] == pair["ratio"]
    fastest = again["fastest_simclr_setting"]
    candidates = [(r, "this call", again) for r in again["results"][:1]] + [
        (r, "2026-12-05-cpu.json", data) for r in data["results"][:4]
    ]
    # ... the one that trains a 20-epoch run soonest: 20 epochs (step + device views) + its compilation (none here)
    best = min(candidates, key=lambda c: 20 * c[0]["epoch_s_with_device_views"])
    assert (fastest["setting"], fastest["measured_in"]) == (best[0]["setting"], best[1])
    assert fastest["run_s_estimate"] == pytest.approx(20 * best[0]["epoch_s_with_device_views"])
    # Both calls in one table, each ratio against its own call's eager; two at once once (the copy is no measurement).
    (calls / "2026-12-06-cpu.json").write_text(second.read_text())
    docs = tmp_path / "benchmarks.md"
    docs.write_text("before\n<!-- clbd-table: gpu_throughput -->\nold\n<!-- /clbd-table: gpu_throughput -->\nafter\n")
    table = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_throughput_table.py"), str(calls), "--docs", str(docs)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert table.returncode == 0, table.stderr
    text = docs.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "From 2 call(s)" in text and text.count("| eager | 2026-12-0") == 4  # SimCLR's and CLIP's, each call
    assert "| double_batch | 2026-12-05-cpu |" in text and "| fused_adamw | 2026-12-05-cpu |" in text
    pair_rows = [line for line in text.splitlines() if line.startswith("| 2026-12-0")]  # the call comes first there
    assert len(pair_rows) == 1 and pair_rows[0].startswith("| 2026-12-05-cpu |")
    assert "Verdict:" in text and "per CIFAR-10 epoch** against the goal's 1.5 s" in text


def test_collector_refuses_an_arm_that_is_not_an_exported_arm_before_writing_anything(tmp_path):
    """gpu_collect.py checks every arm in the bundle first: a checkpoint, a path leaving the arm's folder or two arms
    in one archive stop it, naming the arm; nothing is written, not the good arm nor the call's files. An arm cut
    short (the call stopped while appending it) is left out, and the complete ones before it are kept."""
    from benchmarks.gpu_collect import gpu_short_name

    assert gpu_short_name({"gpu": "NVIDIA H100 80GB HBM3"}, "cuda") == "h100"
    assert gpu_short_name({"gpu": "NVIDIA H200"}, "cuda") == "h200"
    assert gpu_short_name({}, "cpu") == "cpu"
    readme, docs = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text("<!-- clbd-table: na_cifar10_gpu -->\n<!-- /clbd-table: na_cifar10_gpu -->\n")
    docs.write_text("<!-- clbd-table: gpu_throughput -->\n<!-- /clbd-table: gpu_throughput -->\n")

    def add(bundle: Path, name: str, members: dict[str, bytes]) -> None:
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w:gz") as arm:
            for member, content in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(content)
                arm.addfile(info, io.BytesIO(content))
        info = tarfile.TarInfo(name)
        info.size = data.tell()
        data.seek(0)
        with tarfile.open(bundle, "a") as tar:
            tar.addfile(info, data)

    def collect(out: Path, results: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "benchmarks" / "gpu_collect.py"), str(out), "--results", str(results)]
        command += ["--readme", str(readme), "--docs", str(docs)]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)

    bad = {
        "holds a checkpoint (seed0/simclr-na/last.ckpt)": {"seed0/simclr-na/last.ckpt": b"weights"},
        "../escape.txt is not a plain file inside the arm's folder": {"../escape.txt": b"x"},
        "expected one arm's folder (seedN/<arm>), found ['seed0/a', 'seed0/b']": {
            "seed0/a/metrics.json": b"{}",
            "seed0/b/metrics.json": b"{}",
        },
    }
    for n, (message, members) in enumerate(bad.items()):
        out = tmp_path / f"out{n}"
        (out / "arms").mkdir(parents=True)
        add(out / "arms" / "arms.tar", "arm-seed0_good.tar.gz", {"seed0/good/metrics.json": b"{}"})
        add(out / "arms" / "arms.tar", "arm-seed0_zbad.tar.gz", members)
        (out / "summary.txt").write_text("the call's summary")
        results = tmp_path / f"results{n}"
        run = collect(out, results)
        assert run.returncode != 0 and "arms.tar: arm-seed0_zbad.tar.gz" in run.stderr, run.stderr
        assert message in run.stderr and not results.exists(), run.stderr

    out = tmp_path / "cut"
    (out / "arms").mkdir(parents=True)
    bundle = out / "arms" / "arms.tar"
    add(bundle, "arm-seed0_good.tar.gz", {"seed0/good/metrics.json": b"{}"})
    complete = bundle.stat().st_size
    add(bundle, "arm-seed0_next.tar.gz", {"seed0/next/metrics.json": np.random.default_rng(0).bytes(50_000)})
    with tarfile.open(bundle) as tar:
        second = tar.getmember("arm-seed0_next.tar.gz")
    bundle.write_bytes(bundle.read_bytes()[: second.offset_data + second.size // 2])
    assert [name for name, _ in arms_in(bundle)] == ["arm-seed0_good.tar.gz"] and complete > 0
    run = collect(out, tmp_path / "results_cut")
    assert run.returncode == 0 and "1 arm(s) unpacked" in run.stdout, run.stderr
    assert "left out what follows its 1 complete arm(s), cut short" in run.stderr, run.stderr
    assert (tmp_path / "results_cut" / "na_cifar10_gpu" / "seed0" / "good" / "metrics.json").exists()
    assert not (tmp_path / "results_cut" / "na_cifar10_gpu" / "seed0" / "next").exists()
    # Two calls of one day without a throughput JSON (named from the date and env.txt): the second call's files go to
    # a folder of their own, never over the first's; collecting the first again changes nothing.
    calls = tmp_path / "results_cut" / "gpu_calls"
    (out / "summary.txt").write_text("call A")
    assert collect(out, tmp_path / "results_cut").returncode == 0
    other = tmp_path / "other"
    (other / "arms").mkdir(parents=True)
    (other / "summary.txt").write_text("call B")
    assert collect(other, tmp_path / "results_cut").returncode == 0
    assert collect(out, tmp_path / "results_cut").returncode == 0
    kept = {folder.name: (folder / "summary.txt").read_text() for folder in calls.iterdir()}
    today = f"{date.today().isoformat()}-unknown"
    assert kept == {today: "call A", f"{today}-2": "call B"}, kept
