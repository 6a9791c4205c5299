"""CleanCLIP and TA-Cleaner: seeded augmented items, the subtext loss (also across 2 gloo ranks), end-to-end runs
through ``clbd fit`` on a tiny poisoned CLIP, and bad input refused before fine-tuning starts."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchdata.stateful_dataloader import StatefulDataLoader

from clbd import main
from datamodules import CleanCLIPDataModule, TACleanerDataModule
from datamodules.shards import ShardSink
from defenses.tacleaner import global_subtext_loss, subtext_alignment_loss
from tests.callbacks import SimulatedPreemption
from tests.conftest import png_bytes, solid_class_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["dog", "cat", "car", "truck"]
COLOURS = ["red", "blue", "green", "white"]
PLACES = ["street", "beach", "table", "park"]
VERBS = ["sitting on", "standing near", "parked by", "lying on"]
BATCH = 32


def write_caption_shards(folder: Path, prefix: str, n: int, size: int = 32) -> Path:
    """Real PNG shards whose captions use words of the synonym table (so every augmentation has work to do)."""
    with ShardSink(folder, prefix, maxcount=32, classes=CLASSES) as sink:
        for i in range(n):
            label = i % len(CLASSES)
            caption = f"a {COLOURS[(i // 4) % 4]} {CLASSES[label]} {VERBS[(i // 16) % 4]} a {PLACES[(i // 7) % 4]}"
            sink.write(
                f"{prefix}{i:05d}", {"png": png_bytes(solid_class_image(label, i, size)), "cls": label, "txt": caption}
            )
    return folder / f"{prefix}.index.json"


def attack_config(folder: Path, name: str, target: str) -> Path:
    """An attack config in the layout of configs/attack/*.yaml, composed into both the pretraining and defense."""
    path = folder / f"{name.lower()}_{target}.yaml"
    path.write_text(
        "data:\n  init_args:\n    attack:\n"
        f"      class_path: poisoning.{name}\n      init_args: {{target_class: {target}, rate: 0.5, trigger_size: 8}}\n"
    )
    return path


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> dict[str, Path]:
    """Shards and a tiny CLIP pretrained with BadNet (half the pairs poisoned, target "dog")."""
    root = tmp_path_factory.mktemp("cleanclip")
    paths = {
        "root": root,
        "train": write_caption_shards(root / "train", "train", 64),
        # larger than the model's 32 px: the test trigger is scaled from the run's image size, as `clbd test` does
        "test": write_caption_shards(root / "test", "test", 32, size=48),
        "attack": attack_config(root, "BadNet", "dog"),
        "run": root / "poisoned",
    }
    args = [
        "fit",
        "--model=lightning_modules.CLIP",
        "--model.model_name=clip-tiny-vit",
        "--model.zero_shot_templates=cifar10",
        "--data=datamodules.CLIPDataModule",
        "--config",
        str(paths["attack"]),
        "--data.model_name=clip-tiny-vit",
        f"--data.batch_size={BATCH}",
        *data_args(paths),
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={paths['run']}",
    ]
    assert main(args) == 0
    paths["checkpoint"] = paths["run"] / "checkpoints" / "last.ckpt"
    return paths


def data_args(paths: dict[str, Path]) -> list[str]:
    return [
        f"--data.train_shards={paths['train']}",
        f"--data.val_shards={paths['test']}",
        "--data.num_workers=0",
        "--data.eval_batch_size=32",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
    ]


def defense_args(paths: dict[str, Path], defense: str, run: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "defense" / f"{defense}.yaml"),
        "--config",
        str(paths["attack"]),
        f"--model.init_args.checkpoint={paths['checkpoint']}",
        "--model.init_args.model_name=clip-tiny-vit",
        "--model.init_args.zero_shot_templates=cifar10",
        "--model.init_args.lr=1e-4",
        "--model.init_args.warmup_steps=1",
        "--data.init_args.model_name=clip-tiny-vit",
        f"--data.init_args.batch_size={BATCH}",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={run}",
        *data_args(paths),
        *extra,
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logged(run: Path, column: str) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


# ---- the data -------------------------------------------------------------------------------------------------
def items_by_key(module: CleanCLIPDataModule, epoch: int) -> dict[str, dict[str, torch.Tensor]]:
    module.setup("fit")
    stream = module.train_stream()
    stream.configure(rank=0, world_size=1, num_workers=module.num_workers)
    stream.set_epoch(epoch)
    loader = StatefulDataLoader(stream, batch_size=None, num_workers=module.num_workers)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            out[key] = {name: batch[name][i] for name in batch if isinstance(batch[name], torch.Tensor)}
    return out


def test_augmented_items_are_seeded_per_key_whatever_the_workers(tmp_path):
    train = write_caption_shards(tmp_path / "train", "train", 64)
    common = dict(train_shards=str(train), val_shards=None, model_name="clip-tiny-vit", batch_size=16)
    one = items_by_key(TACleanerDataModule(num_workers=0, subtext_fraction=0.5, **common), epoch=0)
    two = items_by_key(TACleanerDataModule(num_workers=2, subtext_fraction=0.5, **common), epoch=0)
    assert one.keys() == two.keys() and len(one) == 64
    for key, item in one.items():
        for name in ("image", "image_aug", "text", "text_aug", "subtexts", "subtext_mask", "subtext_positive"):
            assert torch.equal(item[name], two[key][name]), (key, name)
    chosen = [key for key, item in one.items() if item["subtext_mask"].any()]
    assert 16 <= len(chosen) <= 48  # about half, by hash
    item = one[chosen[0]]
    assert item["subtexts"].shape == (4, 32) and item["subtext_positive"].tolist() == [True, True, False, False]
    assert not torch.equal(item["image"], item["image_aug"]) and not torch.equal(item["text"], item["text_aug"])
    later = items_by_key(TACleanerDataModule(num_workers=0, subtext_fraction=0.5, **common), epoch=1)
    assert sum(not torch.equal(later[k]["image_aug"], one[k]["image_aug"]) for k in one) > 48  # fresh each epoch
    assert {k for k, v in later.items() if v["subtext_mask"].any()} != set(chosen)
    # As the authors: the un-augmented view is resize + centre crop (no random crop: the same every epoch) and the
    # EDA caption is made once per sample for the whole run.
    for key in one:
        assert torch.equal(later[key]["image"], one[key]["image"]) and torch.equal(
            later[key]["text_aug"], one[key]["text_aug"]
        )


def test_tacleaner_negatives_swap_the_class_word(tmp_path):
    """The data's class names (from the shard index) are the words the first negative swaps."""
    import open_clip

    train = write_caption_shards(tmp_path / "train", "train", 64)
    module = TACleanerDataModule(
        train_shards=str(train),
        val_shards=None,
        model_name="clip-tiny-vit",
        batch_size=16,
        num_workers=0,
        subtext_fraction=1.0,
    )
    items = items_by_key(module, epoch=0)
    assert module.subtext_classes() == tuple(CLASSES)
    tokenizer = open_clip.get_tokenizer("clip-tiny-vit")
    class_token = {name: int(tokenizer([name])[0][1]) for name in CLASSES}  # one BPE token each
    for key, item in items.items():
        own = CLASSES[int(key[len("train") :]) % len(CLASSES)]
        first_negative = set(item["subtexts"][module.n_positive].tolist())
        assert class_token[own] not in first_negative, key
        assert any(class_token[other] in first_negative for other in CLASSES if other != own), key
        for slot in range(module.n_positive):  # positives keep the class word
            if item["subtext_mask"][slot]:
                assert class_token[own] in item["subtexts"][slot].tolist(), key
    plain = TACleanerDataModule(
        train_shards=str(train), val_shards=None, model_name="clip-tiny-vit", batch_size=16, class_words=False
    )
    assert plain.subtext_classes() == ()
    # The variant without class-word negatives: no negative names another class; positives still keep their own.
    variant = TACleanerDataModule(
        train_shards=str(train),
        val_shards=None,
        model_name="clip-tiny-vit",
        batch_size=16,
        num_workers=0,
        subtext_fraction=1.0,
        class_word_negatives=False,
    )
    for key, item in items_by_key(variant, epoch=0).items():
        own = CLASSES[int(key[len("train") :]) % len(CLASSES)]
        for slot in range(variant.n_positive, variant.n_positive + variant.n_negative):
            if item["subtext_mask"][slot]:
                tokens = set(item["subtexts"][slot].tolist())
                assert class_token[own] in tokens, key
                assert not any(class_token[other] in tokens for other in CLASSES if other != own), key


def test_clean_data_module_has_no_subtexts(tmp_path):
    train = write_caption_shards(tmp_path / "train", "train", 32)
    common = dict(train_shards=str(train), val_shards=None, model_name="clip-tiny-vit", batch_size=16)
    item = next(iter(items_by_key(CleanCLIPDataModule(num_workers=0, **common), epoch=0).values()))
    assert {"image", "image_aug", "text", "text_aug"} <= item.keys() and "subtexts" not in item
    with pytest.raises(ValueError, match="n_positive"):
        TACleanerDataModule(n_positive=0, n_negative=0, **common)
    with pytest.raises(ValueError, match="eda_alpha"):
        CleanCLIPDataModule(eda_alpha=0.0, **common)


def test_clean_fit_scales_the_test_trigger_as_clbd_test(tmp_path):
    """Without poisoning, fit still validates the attack: the test trigger on a 48 px test image follows the run's
    32 px image size, exactly as in `clbd test` (not the test image's own size): clbd's fixed trigger is scaled to
    the test image, the benchmark one is put on the image resized to the run's 32 px."""
    from poisoning import BadNet

    test = write_caption_shards(tmp_path / "test", "test", 8, size=48)
    common = dict(train_shards=str(test), val_shards=str(test), model_name="clip-tiny-vit", batch_size=8)
    for mode, side in (("fixed", 12), ("benchmark", 8)):  # fixed: 8 px at 32 px -> 12 px at 48 px
        boxes = []
        for stage in ("fit", "test"):
            attack = BadNet("dog", rate=0.5, trigger_size=8, trigger_mode=mode)
            module = CleanCLIPDataModule(attack=attack, poison_train=False, **common)
            module.setup(stage)
            boxes.append(module.attack.test_trigger_box((48, 48), "test00001"))
        assert boxes[0] == boxes[1] and boxes[0][2] - boxes[0][0] == side
    assert max(boxes[0]) <= 31  # the benchmark box lies on the 32 px image the test trigger returns


# ---- CleanCLIP's in-modal loss ---------------------------------------------------------------------------------
def test_inmodal_loss_is_one_directional_on_a_known_input():
    """Each original view picks its own augmented view (rows of o @ a.T); the transposed direction is not added."""
    from defenses.cleanclip import inmodal_loss

    original = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    augmented = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # rows: o1 . (a1, a2) = (1, 0.6), own 0; o2 . (a1, a2) = (0, 0.8), own 1
    row1 = -math.log(math.exp(2 * 1.0) / (math.exp(2 * 1.0) + math.exp(2 * 0.6)))
    row2 = -math.log(math.exp(2 * 0.8) / (math.exp(2 * 0.0) + math.exp(2 * 0.8)))
    assert float(inmodal_loss(original, augmented, scale)) == pytest.approx((row1 + row2) / 2, rel=1e-6)
    # columns (augmented picks original), which a symmetric loss would average in: a1 . (o1, o2) = (1, 0), ...
    col1 = -math.log(math.exp(2 * 1.0) / (math.exp(2 * 1.0) + math.exp(0.0)))
    col2 = -math.log(math.exp(2 * 0.8) / (math.exp(2 * 0.6) + math.exp(2 * 0.8)))
    symmetric = ((row1 + row2) / 2 + (col1 + col2) / 2) / 2
    assert float(inmodal_loss(original, augmented, scale)) != pytest.approx(symmetric, abs=0.01)
    # only the original rows' softmax: moving a non-matching original leaves the other row's term alone
    moved = original.clone()
    moved[1] = torch.tensor([0.6, 0.8])
    assert float(inmodal_loss(moved, augmented, scale)) == pytest.approx(
        (row1 - math.log(math.exp(2 * 1.0) / (math.exp(2 * 0.6) + math.exp(2 * 1.0)))) / 2, rel=1e-6
    )


# ---- the subtext loss -----------------------------------------------------------------------------------------
def reference_subtext_loss(image, captions, own_index, subtexts, mask, positive, scale):
    """The loss of the module doc, one image and one positive at a time."""
    terms = []
    for i in range(image.shape[0]):
        if not mask[i].any():
            continue
        u = image[i]
        negatives = [scale * u @ captions[j] for j in range(captions.shape[0]) if j != own_index[i]]
        negatives += [scale * u @ subtexts[i, k] for k in range(mask.shape[1]) if mask[i, k] and not positive[i, k]]
        positives = [scale * u @ captions[own_index[i]]]
        positives += [scale * u @ subtexts[i, k] for k in range(mask.shape[1]) if mask[i, k] and positive[i, k]]
        per_positive = [-(p - torch.logsumexp(torch.stack([p, *negatives]), 0)) for p in positives]
        terms.append(torch.stack(per_positive).mean())
    return torch.stack(terms).mean()


def random_features(n: int, slots: int, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    subtexts = F.normalize(torch.randn(n, slots, d, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.rand(n, slots, generator=g) < 0.6
    mask[0] = False  # an image without subtexts
    mask[1] = torch.tensor([False, False, True, True])  # negatives only
    mask[2] = torch.tensor([True, True, False, False])  # positives only
    positive = (torch.arange(slots) < slots // 2).expand(n, slots)
    return image, text, subtexts, mask, positive


def test_subtext_loss_matches_its_definition():
    image, text, subtexts, mask, positive = random_features(6, 4)
    scale = torch.tensor(7.0, dtype=torch.float64)
    own = torch.arange(6)
    per_image, active = subtext_alignment_loss(image, text, own, subtexts, mask, positive, scale)
    assert active.tolist() == mask.any(dim=1).tolist() and per_image[0] == 0
    expected = reference_subtext_loss(image, text, own, subtexts, mask, positive, scale)
    assert torch.allclose(per_image.sum() / active.sum(), expected)
    loss, _ = global_subtext_loss(image, text, subtexts, mask, positive, scale)
    assert torch.allclose(loss, expected)
    no_subtexts = torch.zeros_like(mask)
    loss, active = global_subtext_loss(image, text, subtexts, no_subtexts, positive, scale)
    assert loss == 0 and not active.any()
    # a harder negative (closer to the image) raises the loss
    harder = subtexts.clone()
    harder[1, 2] = image[1]
    assert subtext_alignment_loss(image, text, own, harder, mask, positive, scale)[0][1] > per_image[1]


WORLD, N = 2, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encoders(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 8).double(), torch.nn.Linear(5, 8).double()


def _inputs():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(N, 6, generator=g, dtype=torch.float64)
    tokens = torch.randn(N, 5, generator=g, dtype=torch.float64)
    subtokens = torch.randn(N, 4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(N, 4, generator=g) < 0.5
    mask[:3] = False  # rank 0 has fewer chosen images than rank 1
    positive = (torch.arange(4) < 2).expand(N, 4)
    return pixels, tokens, subtokens, mask, positive


def _step(image_encoder, text_encoder, rows: slice) -> torch.Tensor:
    pixels, tokens, subtokens, mask, positive = (x[rows] for x in _inputs())
    image = F.normalize(image_encoder(pixels), dim=-1)
    text = F.normalize(text_encoder(tokens), dim=-1)
    subtexts = F.normalize(text_encoder(subtokens), dim=-1)
    loss, _ = global_subtext_loss(image, text, subtexts, mask, positive, torch.tensor(5.0, dtype=torch.float64))
    loss.backward()
    return loss.detach()


def _inmodal_step(image_encoder, text_encoder, rows: slice) -> torch.Tensor:
    """CleanCLIP's in-modal term on both modalities (the augmented views: the inputs slightly perturbed)."""
    from defenses.cleanclip import inmodal_loss

    pixels, tokens, *_ = (x[rows] for x in _inputs())
    g = torch.Generator().manual_seed(2)
    noise = 0.3 * torch.randn(N, 6, generator=g, dtype=torch.float64)[rows]
    text_noise = 0.3 * torch.randn(N, 5, generator=g, dtype=torch.float64)[rows]
    scale = torch.tensor(5.0, dtype=torch.float64)
    loss = inmodal_loss(
        F.normalize(image_encoder(pixels), dim=-1), F.normalize(image_encoder(pixels + noise), dim=-1), scale
    ) + inmodal_loss(
        F.normalize(text_encoder(tokens), dim=-1), F.normalize(text_encoder(tokens + text_noise), dim=-1), scale
    )
    loss.backward()
    return loss.detach()


STEPS = {"subtext": _step, "inmodal": _inmodal_step}


def _ddp_worker(rank: int, port: int, out: str, kind: str = "subtext") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    encoders = _encoders()
    STEPS[kind](*encoders, slice(rank * N // WORLD, (rank + 1) * N // WORLD))
    grads = []
    for encoder in encoders:
        for p in encoder.parameters():
            dist.all_reduce(p.grad)  # what DDP does: the mean of the ranks' gradients
            grads.append(p.grad / WORLD)
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["subtext", "inmodal"])
def test_subtext_and_inmodal_losses_across_two_ranks_equal_one_process(tmp_path, kind):
    out = tmp_path / "grads.pt"
    # fork: the children reuse this process's imports (spawn would re-import Lightning in each, ~10 s); they set
    # one intra-op thread first, as DataLoader workers do after a fork
    port = _free_port()
    mp.start_processes(_ddp_worker, args=(port, str(out), kind), nprocs=WORLD, join=True, start_method="fork")
    encoders = _encoders()
    STEPS[kind](*encoders, slice(0, N))
    single = [p.grad for encoder in encoders for p in encoder.parameters()]
    for ddp, one in zip(torch.load(out), single):
        assert torch.allclose(ddp, one, atol=1e-12), (ddp - one).abs().max()


# ---- end to end -----------------------------------------------------------------------------------------------
def check_report(run: Path, defense: str, checkpoint: Path) -> dict:
    report = json.loads((run / "defense_metrics.json").read_text())
    assert report["defense"] == defense and report["poisoned_checkpoint"] == str(checkpoint.resolve())
    for stage in ("before", "after"):
        result = report[stage]
        assert result["n_images"] == 32
        assert result["asr_images"] == 24  # triggered test images whose true class is not the target
        assert result["attack"] == {"name": "badnet", "target": 0, "target_name": "dog"}
        for key in ("clean_accuracy_top1", "asr_top1", "asr_top10"):
            assert 0.0 <= result[key] <= 1.0
    assert (run / "fit_finished.json").exists() and (run / "checkpoints" / "last.ckpt").exists()
    return report


def test_cleanclip_end_to_end(poisoned, tmp_path):
    source_hash = sha256(poisoned["checkpoint"])
    run = tmp_path / "cleanclip"
    assert main(defense_args(poisoned, "cleanclip", run)) == 0
    report = check_report(run, "cleanclip", poisoned["checkpoint"])
    assert report["extra"] == {"lambda_clip": 1.0, "lambda_unimodal": 1.0}
    for column in ("train/loss_clip_step", "train/loss_unimodal_step", "train/loss_step"):
        values = logged(run, column)
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), column
    total = [c + u for c, u in zip(logged(run, "train/loss_clip_step"), logged(run, "train/loss_unimodal_step"))]
    assert total == pytest.approx(logged(run, "train/loss_step"), rel=1e-5)
    assert sha256(poisoned["checkpoint"]) == source_hash  # the poisoned checkpoint is only read

    # "before" is what `clbd test` reports for the poisoned checkpoint (same trigger scale, same templates)
    assert (
        main(["test", "--config", str(poisoned["run"] / "config.yaml"), "--ckpt_path", str(poisoned["checkpoint"])])
        == 0
    )
    tested = json.loads((poisoned["checkpoint"].parent / "metrics.json").read_text())["last.ckpt"]
    for key in ("clean_accuracy_top1", "asr_top1", "asr_top10", "asr_images", "n_images"):
        assert report["before"][key] == tested[key], key


def test_tacleaner_end_to_end(poisoned, tmp_path):
    source_hash = sha256(poisoned["checkpoint"])
    run = tmp_path / "tacleaner"
    assert main(defense_args(poisoned, "tacleaner", run, "--data.init_args.subtext_fraction=0.5")) == 0
    report = check_report(run, "tacleaner", poisoned["checkpoint"])
    assert report["extra"]["subtext_fraction"] == 0.5 and report["extra"]["n_positive"] == 2
    assert report["extra"]["class_words"] == CLASSES  # the eval index's class names carry the captions' meaning
    subtext = logged(run, "train/loss_subtext_step")
    assert len(subtext) == 2 and all(math.isfinite(v) and v > 0 for v in subtext)
    assert sum(logged(run, "train/subtext_images_step")) > 16  # about half of the 64 samples
    parts = zip(*(logged(run, f"train/loss_{name}_step") for name in ("clip", "unimodal", "subtext")))
    assert [sum(p) for p in parts] == pytest.approx(logged(run, "train/loss_step"), rel=1e-5)
    assert sha256(poisoned["checkpoint"]) == source_hash


def test_tacleaner_resumes_bitwise_exactly(poisoned, tmp_path):
    """Stop mid-epoch after a checkpoint, resume: the same weights as an uninterrupted run (per-key seeds for every
    augmentation and subtext; the loader's state in the checkpoint; "before" kept from the first start). Workers
    do not change the items (test above) and the stream's resume with workers is tests/test_resume.py's."""
    extra = [
        "--data.init_args.batch_size=16",
        "--data.init_args.subtext_fraction=0.5",
        "--trainer.deterministic=true",
        "--checkpoint.every_n_train_steps=2",
    ]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(defense_args(poisoned, "tacleaner", straight, *extra)) == 0
    interrupt = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=3"]
    with pytest.raises(SimulatedPreemption):
        main(defense_args(poisoned, "tacleaner", interrupted, *extra, *interrupt))
    resume = ["--ckpt_path", str(interrupted / "checkpoints" / "epoch=0-step=2.ckpt")]  # mid-epoch: 4 steps
    assert main(defense_args(poisoned, "tacleaner", interrupted, *extra, *resume)) == 0
    final = "epoch=0-step=4.ckpt"  # not last.ckpt: Lightning versions it (last-v1) when resuming from the first save
    a = torch.load(straight / "checkpoints" / final, map_location="cpu", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / final, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    before = [json.loads((run / "defense_metrics.json").read_text())["before"] for run in (straight, interrupted)]
    assert before[0] == before[1]


# ---- bad input: one line on stderr, exit 2, nothing trained --------------------------------------------------
def refused(capsys, args: list[str], run: Path, message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (run / "defense_metrics.json").exists() and not (run / "checkpoints").exists()


def test_simclr_checkpoint_is_refused(poisoned, tmp_path, capsys):
    simclr = tmp_path / "simclr"
    args = [
        "fit",
        "--model=lightning_modules.SimCLR",
        "--model.width=8",
        "--model.proj_hidden_dim=16",
        "--data=datamodules.SimCLRDataModule",
        "--data.batch_size=32",
        "--data.knn_bank_size=32",
        "--trainer.max_steps=1",
        f"--trainer.default_root_dir={simclr}",
        *data_args(poisoned),
    ]
    assert main(args) == 0
    run = tmp_path / "defense"
    bad = defense_args(poisoned, "cleanclip", run, f"--model.init_args.checkpoint={simclr}/checkpoints/last.ckpt")
    refused(capsys, bad, run, "holds a SimCLR model; this defense repairs CLIP models")


def test_missing_checkpoint_is_refused(poisoned, tmp_path, capsys):
    run = tmp_path / "defense"
    args = [a for a in defense_args(poisoned, "tacleaner", run) if not a.startswith("--model.init_args.checkpoint")]
    refused(capsys, args, run, "model.checkpoint: not set")


def test_another_attack_than_the_poisoned_runs_is_refused(poisoned, tmp_path, capsys):
    run = tmp_path / "defense"
    cat = attack_config(tmp_path, "BadNet", "cat")
    args = [*defense_args(poisoned, "cleanclip", run), "--config", str(cat)]
    # the poisoned run's target was "dog": another target, even one the eval set knows, is refused
    refused(capsys, args, run, "but the poisoned run used BadNet with target 'dog'")


def test_target_not_among_eval_classes_is_refused(poisoned, tmp_path, capsys):
    run = tmp_path / "defense"
    args = [*defense_args(poisoned, "cleanclip", run), "--data.init_args.class_names=[cat,car,truck,bus]"]
    refused(capsys, args, run, "data.attack.target_class='dog' is not one of the eval classes")


def test_no_attack_is_refused(poisoned, tmp_path, capsys):
    run = tmp_path / "defense"
    refused(
        capsys, [*defense_args(poisoned, "cleanclip", run), "--data.init_args.attack=null"], run, "data.attack: not set"
    )


def test_train_fraction_below_one_batch_is_refused(poisoned, tmp_path, capsys):
    run = tmp_path / "defense"
    args = [*defense_args(poisoned, "tacleaner", run), "--data.init_args.train_fraction=0.1"]
    refused(capsys, args, run, "data.train_fraction=0.1 keeps")


def test_wrong_data_module_is_refused(poisoned, tmp_path, capsys):
    run = tmp_path / "defense"
    args = [*defense_args(poisoned, "cleanclip", run, "--data=datamodules.CLIPDataModule")]
    args = [a for a in args if not a.startswith("--data.init_args.eda_alpha")]
    refused(capsys, args, run, "cleanclip needs datamodules.CleanCLIPDataModule")


def test_the_source_run_directory_is_refused(poisoned, tmp_path, capsys):
    source_hash = sha256(poisoned["checkpoint"])
    assert main(defense_args(poisoned, "cleanclip", poisoned["run"])) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert sha256(poisoned["checkpoint"]) == source_hash
    assert not (poisoned["run"] / "defense_metrics.json").exists()
    # a checkpoint kept inside a fresh directory: that directory cannot be the defense's run directory either
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    copy = fresh / "poisoned.ckpt"
    copy.write_bytes(poisoned["checkpoint"].read_bytes())
    args = defense_args(poisoned, "cleanclip", fresh, f"--model.init_args.checkpoint={copy}")
    refused(capsys, args, fresh, "holds the poisoned checkpoint")
    assert sha256(copy) == source_hash


def test_configs_parse(capsys):
    for defense in ("cleanclip", "tacleaner"):
        for attack in ("badnet_clip", "blended_clip"):
            args = [
                "fit",
                "--config",
                str(ROOT / "configs" / "defense" / f"{defense}.yaml"),
                "--config",
                str(ROOT / "configs" / "attack" / f"{attack}.yaml"),
                "--print_config",
            ]
            with pytest.raises(SystemExit) as exit_info:
                main(args)
            assert exit_info.value.code == 0
            printed = capsys.readouterr().out
            assert "target_class: banana" in printed and "poison_train: false" in printed
            assert f"class_path: defenses.{'CleanCLIP' if defense == 'cleanclip' else 'TACleaner'}" in printed
