"""UBT end to end on CPU: a tiny poisoned CLIP run, then detection (scored against the manifest) and unlearning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clbd import main
from defenses.ubt import (
    caption_rank,
    caption_token_ids,
    characteristic_rows,
    detection_score,
    forget_loss,
    overfit_batches,
    split_by_score,
    weakest_keys,
)
from lightning_modules.clip import CLIP
from lightning_modules.zero_shot import fill_template, templates_by_name
from poisoning.plan import records_from_manifest
from tests.test_defense_mcldef import (
    CLIP_DATA,
    CLIP_MODEL,
    clip_badnet,
    data_args,
    pretrain,
    quick_trainer,
    sha256,
    write_shards,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ubt")
    train = write_shards(root / "shards", "train", 80, captions=True)  # 2 shards: equal halves on 2 ranks
    val = write_shards(root / "shards", "val", 40, captions=True)
    return {"train": train, "val": val, "checkpoint": pretrain(root / "poisoned", "clip", train, val)}


def run_ubt(run: Path, setup: dict[str, Path], extra: list[str] = ()) -> int:
    return main(
        [
            "fit",
            "--config=configs/defense/ubt.yaml",
            f"--model.init_args.checkpoint={setup['checkpoint']}",
            *CLIP_MODEL,
            "--model.init_args.overfit_steps=2",
            "--model.init_args.flag_count=24",
            "--model.init_args.unlearn_count=8",
            "--model.init_args.forget_batch_size=4",
            *clip_badnet(),
            *CLIP_DATA,
            *data_args(setup["train"], setup["val"], fraction=1.0),
            *quick_trainer(run, steps=3),
            *extra,
        ]
    )


def test_ubt_end_to_end(tmp_path, setup):
    source = setup["checkpoint"]
    digest = sha256(source)
    run = tmp_path / "ubt"
    assert run_ubt(run, setup) == 0

    report = json.loads((run / "defense_metrics.json").read_text())
    assert report["defense"] == "ubt"
    for stage in ("before", "after"):
        assert report[stage]["n_images"] == 40 and report[stage]["asr_images"] == 30

    # Detection, scored against the manifest the data module wrote for this run.
    poisons = {r["key"] for r in records_from_manifest(run / "poison_manifest.jsonl")}
    detection = json.loads((run / "ubt_detection.json").read_text())
    assert detection["truth_source"].startswith("manifest") and detection["stream_flags_agree_with_truth"]
    assert detection["scored"] == 80 and detection["true_poisons"] == len(poisons) == detection["manifest_poisons"]
    assert detection["flagged"] == 24 == len(detection["flagged_pairs"])
    flagged_poisons = sum(pair["poisoned"] for pair in detection["flagged_pairs"])
    assert (
        detection["true_positives"] == flagged_poisons == len({p["key"] for p in detection["flagged_pairs"]} & poisons)
    )
    assert detection["true_positives"] + detection["false_positives"] == 24
    assert detection["true_positives"] + detection["false_negatives"] == len(poisons)
    assert detection["precision"] == pytest.approx(flagged_poisons / 24)
    assert detection["recall"] == pytest.approx(flagged_poisons / len(poisons))
    assert 0 <= detection["precision"] <= 1 and 0 <= detection["recall"] <= 1
    assert 0 <= detection["auroc"] <= 1
    scores = [pair["score"] for pair in detection["flagged_pairs"]]
    assert scores == sorted(scores, reverse=True)
    assert detection["selected"] == 8 == sum(pair["unlearnt"] for pair in detection["flagged_pairs"][:8])
    extra = report["extra"]["detection"]
    assert {k: extra[k] for k in ("precision", "recall", "flagged", "true_poisons")} == {
        k: detection[k] for k in ("precision", "recall", "flagged", "true_poisons")
    }

    # Only the token portion moved: vision class token / positional embedding, and the chosen token-table rows.
    before = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 3
    weights = after["state_dict"]
    assert set(weights) == set(before)
    portion = {"model.visual.class_embedding", "model.visual.positional_embedding"}
    for name in portion:
        assert not torch.equal(before[name], weights[name]), name
    table = "model.token_embedding.weight"
    rows = torch.tensor(detection["text_rows"], dtype=torch.long)
    frozen_rows = torch.ones(before[table].shape[0], dtype=torch.bool)
    frozen_rows[rows] = False
    assert torch.equal(before[table][frozen_rows], weights[table][frozen_rows])
    if rows.numel():
        assert not torch.equal(before[table][rows], weights[table][rows])
    for name in set(before) - portion - {table}:
        assert torch.equal(before[name], weights[name]), name
    updated = report["extra"]["updated"]
    assert updated["updated_weights"] < updated["model_weights"] / 10
    assert sha256(source) == digest

    # Stage 1 overfits the weakest 20% of the pairs (by similarity under the poisoned model), flags by that weakness,
    # and reports every score at the flagged count.
    schedule = detection["overfit_schedule"]
    assert schedule["weak_pairs"] == 16 and schedule["weak_steps"] == 2 and schedule["all_pairs_steps"] == 0
    assert detection["score"] == "weak_similarity"
    assert set(detection["by_score"]) == {"weak_similarity", "similarity", "gain"}
    assert detection["by_score"]["weak_similarity"]["auroc"] == detection["auroc"]
    assert detection["by_score"]["weak_similarity"]["precision"] == detection["precision"]
    for values in detection["by_score"].values():
        assert 0 <= values["auroc"] <= 1 and 0 <= values["precision"] <= 1 and 0 <= values["recall"] <= 1
    # The retain term's pairs: every pair ranked below the top half, so no flagged pair.
    retain = set(after["clbd_ubt"]["retain"])
    assert len(retain) == 40 and not retain & {p["key"] for p in detection["flagged_pairs"]}
    assert detection["retain_pairs"] == 40 and detection["retain_true_poisons"] == len(retain & poisons)
    # No unlearnt token row is a word of the target's eval prompts.
    tokenizer = open_clip.get_tokenizer("clip-tiny-vit")
    prompts = [fill_template(t, "class1") for t in templates_by_name("openai_imagenet")]
    prompt_ids = set(caption_token_ids(tokenizer(prompts)).flatten().tolist()) - {0}
    assert not prompt_ids & set(detection["text_rows"])
    assert "class" in detection["prompt_rows_excluded"] and "photo" in detection["prompt_rows_excluded"]


def test_ubt_detects_on_images_made_on_the_device(tmp_path, setup):
    """Detection reads the training loader itself, outside Lightning's loop: its batches are made there too."""
    run = tmp_path / "ubt"
    assert run_ubt(run, setup, ["--data.init_args.images_on_device=true"]) == 0
    detection = json.loads((run / "ubt_detection.json").read_text())
    assert detection["scored"] == 80 and detection["flagged"] == 24


def test_patch_portion_adds_only_the_patch_embedding(tmp_path, setup):
    """token_portion: vision+patch moves the ViT's patch embedding and token parameters; every other weight stays."""
    run = tmp_path / "ubt-patch"
    assert run_ubt(run, setup, ["--model.init_args.token_portion=vision+patch"]) == 0
    before = torch.load(setup["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    weights = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    portion = {"model.visual.conv1.weight", "model.visual.class_embedding", "model.visual.positional_embedding"}
    for name in portion:
        assert not torch.equal(before[name], weights[name]), name
    for name in set(before) - portion:
        assert torch.equal(before[name], weights[name]), name
    updated = json.loads((run / "defense_metrics.json").read_text())["extra"]["updated"]["parameters"]
    assert updated["visual.conv1.weight"] == before["model.visual.conv1.weight"].numel()
    assert "token_embedding.weight[rows]" not in updated


def batches_of(keys: list[str], size: int) -> list[dict]:
    """A stand-in loader: batches whose image rows hold each pair's index (to check rows travel with their keys)."""
    out = []
    for start in range(0, len(keys), size):
        chunk = keys[start : start + size]
        index = torch.tensor([int(k[1:]) for k in chunk], dtype=torch.float32)
        out.append({"key": chunk, "image": index[:, None].expand(-1, 3), "text": index[:, None].long()})
    return out


def test_overfitting_takes_the_weak_similarity_pairs_first():
    similarity = {f"k{i:03d}": (i * 37 % 50) / 50 for i in range(50)}  # an order unrelated to the stream's
    weak = weakest_keys(similarity, 0.2)
    assert weak == set(sorted(similarity, key=similarity.get)[:10])
    loader = batches_of(sorted(similarity), 8)
    batches = list(overfit_batches(loader, weak, weak_steps=4, steps=6, batch_size=4))
    assert len(batches) == 6
    # One pass holds 10 weak pairs: batches of 4, 4 and the pass's rest (2); then the next pass.
    assert [len(keys) for keys, _, _ in batches[:4]] == [4, 4, 2, 4]
    for keys, images, tokens in batches[:4]:
        assert set(keys) <= weak and len(set(keys)) == len(keys)
        assert images[:, 0].tolist() == [int(k[1:]) for k in keys] == tokens[:, 0].tolist()
    # Then whole batches of all pairs, from the start of the stream.
    assert [keys for keys, _, _ in batches[4:]] == [loader[0]["key"], loader[1]["key"]]
    assert not set(batches[4][0]) <= weak
    # Without the weak share: the stream's batches, uniformly.
    uniform = list(overfit_batches(loader, None, weak_steps=4, steps=3, batch_size=4))
    assert [keys for keys, _, _ in uniform] == [batch["key"] for batch in loader[:3]]


def test_retain_set_excludes_the_suspects():
    scores = {f"k{i}": float(i) for i in range(10)}  # k9 most suspicious
    ranked, flagged, retain = split_by_score(scores, n_flag=3, suspect_fraction=0.5)
    assert ranked[:3] == flagged == ["k9", "k8", "k7"]
    assert retain == {"k0", "k1", "k2", "k3", "k4"}  # the top half are suspects, flagged or not
    _, flagged, retain = split_by_score(scores, n_flag=3, suspect_fraction=0.0)
    assert retain == {f"k{i}" for i in range(7)} and not retain & set(flagged)  # at least the flagged ones go


def test_unlearnt_rows_leave_out_the_prompt_words():
    # 4 unlearnt captions (start 1, end 15: the largest id, as open_clip's) all use ids 7 ("banana") and 9
    # ("photo"), rare elsewhere; id 5 is in every caption.
    forget = torch.tensor([[1, 5, 7, 9, 15, 0], [1, 5, 9, 7, 15, 0], [1, 7, 5, 9, 15, 0], [1, 9, 7, 5, 15, 0]])
    df_all = torch.zeros(16, dtype=torch.long)
    df_all[5], df_all[7], df_all[9] = 100, 5, 8
    assert characteristic_rows(forget, df_all, 100, lift=2.0).tolist() == [7, 9]
    assert characteristic_rows(forget, df_all, 100, lift=2.0, excluded=torch.tensor([7])).tolist() == [9]


def test_ubt_resumes_without_redoing_the_detection(tmp_path, setup):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    every = ["--checkpoint.every_n_train_steps=1"]
    assert run_ubt(straight, setup, every) == 0
    interrupt = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=2"]
    with pytest.raises(RuntimeError, match="killed after step 2"):
        run_ubt(interrupted, setup, [*every, *interrupt])
    (interrupted / "ubt_detection.json").unlink()  # stage 1 must not run again (it would write it)
    assert run_ubt(interrupted, setup, [*every, "--ckpt_path", "last"]) == 0
    assert not (interrupted / "ubt_detection.json").exists()
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["clbd_ubt"]["flagged"] == b["clbd_ubt"]["flagged"]


# ---- bad input: one clear line, exit 2 --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.init_args.weight_decay=0.1", "model.weight_decay=0.1: UBT needs 0"),
        ("--data.init_args.poison_train=false", "data.poison_train: UBT detects and unlearns poisoned pairs"),
        (
            "--model.init_args.token_portion=everything",
            "model.token_portion must join distinct parts of text, vision, patch",
        ),
        ("--model.init_args.weak_fraction=0", "model.weak_fraction must be in (0, 1]"),
        ("--model.init_args.weak_steps=3", "model.weak_steps must be in [0, overfit_steps=2]"),
        ("--model.init_args.suspect_fraction=1", "model.suspect_fraction must be in [0, 1)"),
    ],
)
def test_bad_settings_are_refused(tmp_path, setup, capsys, override, message):
    assert run_ubt(tmp_path / "run", setup, [override]) == 2
    assert message in capsys.readouterr().err


def test_simclr_checkpoint_is_refused(tmp_path, setup, capsys):
    simclr = tmp_path / "simclr"
    train = write_shards(tmp_path / "shards", "train", 48)
    checkpoint = pretrain(simclr, "simclr", train, train)
    assert run_ubt(tmp_path / "run", setup, [f"--model.init_args.checkpoint={checkpoint}"]) == 2
    assert "holds a SimCLR model; this defense repairs CLIP models" in capsys.readouterr().err


@pytest.mark.slow
def test_ubt_on_two_ranks_scores_every_pair_once(tmp_path, setup):
    """DDP (gloo, 2 CPU ranks): each rank scores its half of the stream; the merged detection covers all pairs."""
    run = tmp_path / "ddp"
    args = [
        "fit",
        "--config=configs/defense/ubt.yaml",
        f"--model.init_args.checkpoint={setup['checkpoint']}",
        *CLIP_MODEL,
        "--model.init_args.overfit_steps=2",
        "--model.init_args.flag_count=24",
        "--model.init_args.unlearn_count=8",
        "--model.init_args.forget_batch_size=4",
        *clip_badnet(),
        *CLIP_DATA,
        *data_args(setup["train"], setup["val"], fraction=1.0),
        *quick_trainer(run, steps=2),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]
    # Lightning starts the second rank by re-running the command line: run the CLI, not pytest, in a subprocess.
    done = subprocess.run([sys.executable, "-m", "clbd", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    detection = json.loads((run / "ubt_detection.json").read_text())
    poisons = {r["key"] for r in records_from_manifest(run / "poison_manifest.jsonl")}
    assert detection["scored"] == 80 and detection["true_poisons"] == len(poisons)
    assert detection["stream_flags_agree_with_truth"] and detection["flagged"] == 24
    assert detection["true_positives"] + detection["false_negatives"] == len(poisons)
    report = json.loads((run / "defense_metrics.json").read_text())
    assert report["before"]["n_images"] == report["after"]["n_images"] == 40  # summed over the two ranks


def test_detection_scores_rank_as_defined():
    """weak_similarity ranks the poisoned model's weakest pairs first, the same pairs stage 1 overfits on; gain is the
    rise during overfitting; similarity the overfitted copy's cosine."""
    assert detection_score("weak_similarity", 0.9, 0.2) == -0.2
    assert detection_score("gain", 0.9, 0.2) == pytest.approx(0.7)
    assert detection_score("similarity", 0.9, 0.2) == 0.9
    poisoned = {"a": 0.5, "b": -0.1, "c": 0.3, "d": 0.0, "e": 0.8}
    overfitted = {"a": 0.6, "b": 0.7, "c": 0.31, "d": 0.02, "e": 0.85}
    by = {
        name: {k: detection_score(name, overfitted[k], poisoned[k]) for k in poisoned}
        for name in ("weak_similarity", "gain", "similarity")
    }
    assert split_by_score(by["weak_similarity"], 2, 0.0)[1] == ["b", "d"]
    assert set(split_by_score(by["weak_similarity"], 2, 0.0)[1]) == weakest_keys(poisoned, 0.4)
    assert split_by_score(by["gain"], 2, 0.0)[1] == ["b", "a"]
    assert split_by_score(by["similarity"], 2, 0.0)[1] == ["e", "b"]


def test_ranking_objective_acts_where_the_cosine_one_stops():
    """The test bed's failure, on free features: the unlearnt pair's cosine is already about 0 but every other caption
    scores lower, so its caption still ranks first. The cosine term is then ~0 and leaves the ranking alone; the
    ranking term pushes the caption below the other captions."""
    torch.manual_seed(0)
    text = F.normalize(torch.randn(1, 16), dim=-1)
    negatives = F.normalize(torch.randn(6, 16), dim=-1)
    start = F.normalize(-negatives.sum(0, keepdim=True), dim=-1)  # away from every other caption
    start = F.normalize(start - (start * text).sum() * text, dim=-1)  # orthogonal to its own caption: cosine 0
    ranks = {}
    for objective in ("cosine", "ranking"):
        image = start.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([image], lr=0.5)
        for _ in range(30):
            loss = forget_loss(objective, F.normalize(image, dim=-1), text, negatives)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            ranks[objective] = int(caption_rank(F.normalize(image, dim=-1), text, negatives))
    assert int(caption_rank(start, text, negatives)) == 0  # its own caption first
    assert ranks == {"cosine": 0, "ranking": 6}


def poisoned_for_ranking(root: Path, train: Path, val: Path) -> Path:
    """A tiny poisoned CLIP trained long enough (40 steps) that the most similar pairs' captions rank near the top."""
    args = ["--model=lightning_modules.CLIP", *CLIP_MODEL, "--data=datamodules.CLIPDataModule", *CLIP_DATA]
    args += [*clip_badnet(), *data_args(train, val, fraction=1.0), *quick_trainer(root, steps=40)]
    assert main(["fit", *args, "--trainer.max_epochs=100"]) == 0
    return root / "checkpoints" / "last.ckpt"


def unlearnt_caption_rank(checkpoint: Path, images: torch.Tensor, tokens: torch.Tensor, others: torch.Tensor) -> float:
    """Mean rank of the unlearnt images' own captions among ``others`` (0: first) under a checkpoint's model."""
    module = CLIP(model_name="clip-tiny-vit")
    module.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    module.eval()
    with torch.no_grad():
        image = module.model.encode_image(images, normalize=True)
        text = module.model.encode_text(tokens, normalize=True)
        return caption_rank(image, text, module.model.encode_text(others, normalize=True)).float().mean().item()


def test_ranking_objective_moves_only_the_portion_and_lowers_the_rank(tmp_path, setup):
    """forget_objective: ranking, 30 steps at lr 5e-4 on a tiny poisoned CLIP, the unlearnt pairs flagged by
    similarity (their captions rank near the top): parameters outside the token portion stay bit for bit, those in
    it move, and the unlearnt images' own captions fall in rank among the clean non-target captions of the eval set.
    Measured here (mean rank of 30): 3.5 -> 5.1 with ranking, 3.5 -> 5.1 with cosine (the same on this bed)."""
    checkpoint = poisoned_for_ranking(tmp_path / "poisoned", setup["train"], setup["val"])
    local = {**setup, "checkpoint": checkpoint}
    run = tmp_path / "ranking"
    extra = ["--model.init_args.detection_score=similarity", "--model.init_args.lr=5e-4", "--trainer.max_epochs=100"]
    assert run_ubt(run, local, [*extra, "--model.init_args.forget_objective=ranking", "--trainer.max_steps=30"]) == 0
    before = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    weights = saved["state_dict"]
    portion = {"model.visual.class_embedding", "model.visual.positional_embedding"}
    table = "model.token_embedding.weight"
    for name in portion:
        assert not torch.equal(before[name], weights[name]), name
    for name in set(before) - portion - {table}:
        assert torch.equal(before[name], weights[name]), name
    rows = saved["clbd_ubt"]["text_rows"]
    frozen = torch.ones(before[table].shape[0], dtype=torch.bool)
    frozen[rows] = False
    assert torch.equal(before[table][frozen], weights[table][frozen])
    assert json.loads((run / "defense_metrics.json").read_text())["extra"]["forget_objective"] == "ranking"

    tokenizer = open_clip.get_tokenizer("clip-tiny-vit")
    others = tokenizer([f"a photo of a class{i % 4} number {i}" for i in range(40) if i % 4 != 1])  # val, non-target
    images, tokens = saved["clbd_ubt"]["forget_images"], saved["clbd_ubt"]["forget_tokens"]
    rank_before = unlearnt_caption_rank(checkpoint, images, tokens, others)
    rank_after = unlearnt_caption_rank(run / "checkpoints" / "last.ckpt", images, tokens, others)
    assert rank_before < others.shape[0] / 2  # the flagged captions ranked near the top: something to unlearn
    assert rank_after > rank_before
