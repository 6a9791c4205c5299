"""ASR and kNN monitor: exact values on hand-made inputs, and 2-rank gloo sync with uneven per-rank sizes equal to
one process on all the data. Linear probe and stratified label subsets."""

from __future__ import annotations

import io
import math
import socket
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from lightning_modules.metrics import AttackSuccessRate, KNNMonitor, weighted_knn_scores
from lightning_modules.probes import fit_linear_probe, label_fraction_subset, probe_epochs_run
from lightning_modules.zero_shot import CIFAR10_CLASSNAMES
from tests.conftest import shared_data

# 5 triggered images, 3 classes, target 0. Top-1 predictions: 0, 0, 1, 0, 2; the target is 2nd for image 2.
SCORES = torch.tensor(
    [
        [0.9, 0.05, 0.05],
        [0.6, 0.3, 0.1],
        [0.3, 0.6, 0.1],
        [0.5, 0.2, 0.3],
        [0.1, 0.3, 0.6],
    ]
)
LABELS = torch.tensor([0, 1, 2, 1, 2])


def test_asr_excludes_target_class_images():
    asr = AttackSuccessRate(target=0)
    asr.update(SCORES, LABELS)
    # counted: images 1..4 (true class != 0); predicted 0: images 1 and 3
    assert asr.total.item() == 4 and asr.hits.item() == 2
    assert asr.compute().item() == pytest.approx(0.5)


def test_asr_counting_all_triggered_images():
    asr = AttackSuccessRate(target=0, exclude_target_class=False)
    asr.update(SCORES, LABELS)
    assert (asr.hits.item(), asr.total.item()) == (3, 5)
    assert asr.summary() == {
        "asr": 0.6,
        "hits": 3,
        "total": 5,
        "target": 0,
        "top_k": 1,
        "exclude_target_class": False,
    }


def test_asr_top_k():
    asr = AttackSuccessRate(target=0, top_k=2)
    asr.update(SCORES[:3], LABELS[:3])
    asr.update(SCORES[3:], LABELS[3:])
    # top-2 contains 0 for images 1, 2, 3 (image 4's top-2 is {2, 1})
    assert (asr.hits.item(), asr.total.item()) == (3, 4)
    assert asr.compute().item() == pytest.approx(0.75)


def test_asr_without_countable_images_is_nan():
    asr = AttackSuccessRate(target=0)
    asr.update(SCORES[:1], LABELS[:1])
    assert math.isnan(asr.compute().item())
    assert asr.summary()["asr"] is None and asr.summary()["total"] == 0


def test_asr_rejects_bad_input():
    with pytest.raises(ValueError, match="target 3"):
        AttackSuccessRate(target=3).update(SCORES, LABELS)
    with pytest.raises(ValueError, match="top_k=4"):
        AttackSuccessRate(target=0, top_k=4).update(SCORES, LABELS)
    with pytest.raises(ValueError, match="labels"):
        AttackSuccessRate(target=0).update(SCORES, LABELS[:2])


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_weighted_knn_vote_uses_exp_similarity_over_temperature():
    # query at 0 deg; one class-0 neighbour at similarity 1, two class-1 neighbours at similarity 0.5, class 2 far
    bank = torch.tensor([unit(0), unit(60), unit(-60), unit(180)])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([unit(0)])
    scores = weighted_knn_scores(query, bank, labels, num_classes=3, k=3, temperature=0.1)
    torch.testing.assert_close(scores, torch.tensor([[math.exp(10), 2 * math.exp(5), 0.0]]))
    # a hot temperature makes it a plain majority vote: class 1 wins
    scores = weighted_knn_scores(query, bank, labels, num_classes=3, k=3, temperature=10.0)
    assert scores.argmax().item() == 1


def test_knn_monitor_toy_accuracy_and_asr():
    # three classes at 0, 120, 240 degrees; 2 bank points each
    bank = torch.tensor([unit(a) for a in (0, 10, 120, 130, 240, 250)])
    bank_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    knn = KNNMonitor(num_classes=3, k=2, temperature=0.1, target=0)
    knn.update_bank(bank[:4], bank_labels[:4])
    knn.update_bank(bank[4:], bank_labels[4:])
    # clean queries: 3 right, the 4th (true class 2, lying at class 1's angle) wrong
    clean = torch.tensor([unit(5), unit(125), unit(245), unit(118)]) * 3.0  # scale: features are normalised
    labels = torch.tensor([0, 1, 2, 2])
    # triggered: image 0 is target class (not counted); of images 1..3, images 1 and 3 land at class 0
    triggered = torch.tensor([unit(3), unit(2), unit(250), unit(-5)])
    knn.update_query(clean, labels, triggered_features=triggered)
    out = knn.compute()
    assert out["acc"].item() == pytest.approx(0.75)
    assert out["asr"].item() == pytest.approx(2 / 3)
    assert out["n_clean"].item() == 4 and out["n_triggered"].item() == 3


def test_knn_monitor_without_target_or_triggered_has_nan_asr():
    knn = KNNMonitor(num_classes=2, k=1)
    knn.update_bank(torch.tensor([unit(0), unit(180)]), torch.tensor([0, 1]))
    knn.update_query(torch.tensor([unit(10)]), torch.tensor([0]), triggered_features=torch.tensor([unit(170)]))
    out = knn.compute()
    assert out["acc"].item() == 1.0 and math.isnan(out["asr"].item()) and out["n_triggered"].item() == 0


def test_knn_monitor_rejects_bad_input():
    with pytest.raises(ValueError, match="target 5"):
        KNNMonitor(num_classes=3, target=5)
    knn = KNNMonitor(num_classes=3)
    with pytest.raises(ValueError, match="labels must lie"):
        knn.update_bank(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="triggered_features"):
        knn.update_query(torch.randn(2, 4), torch.tensor([0, 1]), triggered_features=torch.randn(3, 4))
    knn.update_query(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bank is empty"):
        knn.compute()


# ---- 2 ranks, uneven sizes: bank 20 / 13, clean queries 7 / 3, triggered 7 / none ----
NUM_CLASSES, DIM, TARGET = 4, 8, 1
BANK_SPLIT, QUERY_SPLIT = (20, 13), (7, 3)


def synthetic_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(NUM_CLASSES, DIM, generator=g) * 2
    n_bank, n_query = sum(BANK_SPLIT), sum(QUERY_SPLIT)
    bank_labels = torch.randint(0, NUM_CLASSES, (n_bank,), generator=g)
    query_labels = torch.randint(0, NUM_CLASSES, (n_query,), generator=g)
    return {
        "bank": centres[bank_labels] + torch.randn(n_bank, DIM, generator=g),
        "bank_labels": bank_labels,
        "query": centres[query_labels] + torch.randn(n_query, DIM, generator=g),
        "query_labels": query_labels,
        # triggered images drift towards the target centre
        "triggered": centres[query_labels] * 0.3 + centres[TARGET] + torch.randn(n_query, DIM, generator=g),
        "scores": torch.randn(n_query, NUM_CLASSES, generator=g),
    }


def rank_slices(rank: int) -> tuple[slice, slice]:
    b0, q0 = BANK_SPLIT[0], QUERY_SPLIT[0]
    return (slice(0, b0), slice(0, q0)) if rank == 0 else (slice(b0, None), slice(q0, None))


def make_metrics() -> tuple[KNNMonitor, AttackSuccessRate]:
    return KNNMonitor(num_classes=NUM_CLASSES, k=5, temperature=0.1, target=TARGET), AttackSuccessRate(TARGET, top_k=2)


def results_of(knn: KNNMonitor, asr: AttackSuccessRate) -> dict[str, float]:
    out = {key: value.item() for key, value in knn.compute().items() if key != "backdoor"}
    summary = asr.summary()
    assert summary["asr"] == pytest.approx(asr.compute().item())
    out.update(asr=summary["asr"], asr_hits=summary["hits"], asr_total=summary["total"], knn_asr=out.pop("asr"))
    return out


def metric_worker(rank: int, port: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    data = synthetic_data()
    bank, query = rank_slices(rank)
    knn, asr = make_metrics()
    knn.update_bank(data["bank"][bank], data["bank_labels"][bank])
    triggered = data["triggered"][query] if rank == 0 else None
    knn.update_query(data["query"][query], data["query_labels"][query], triggered_features=triggered)
    asr.update(data["scores"][query], data["query_labels"][query])
    torch.save(results_of(knn, asr), f"{out_path}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_synced_metrics_equal_single_process_with_uneven_ranks(tmp_path):
    mp.spawn(metric_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    data = synthetic_data()
    knn, asr = make_metrics()
    knn.update_bank(data["bank"], data["bank_labels"])
    knn.update_query(data["query"][: QUERY_SPLIT[0]], data["query_labels"][: QUERY_SPLIT[0]], data["triggered"][:7])
    knn.update_query(data["query"][QUERY_SPLIT[0] :], data["query_labels"][QUERY_SPLIT[0] :])
    asr.update(data["scores"], data["query_labels"])
    expected = results_of(knn, asr)

    assert expected["n_clean"] == 10 and expected["asr_total"] == (data["query_labels"] != TARGET).sum().item()
    assert 0 < expected["knn_asr"] < 1  # the test data must exercise the ASR
    for result in per_rank:
        assert result == pytest.approx(expected)


# ---- linear probe and label subsets ----


def blobs(n_per_class: int, num_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(labels.numel(), dim, generator=g), labels


def test_linear_probe_is_deterministic_and_leaves_global_rng_alone():
    features, labels = blobs(50, 3, 16, seed=0)
    rng = torch.random.get_rng_state()
    a = fit_linear_probe(features, labels, 3, epochs=5, seed=1)
    b = fit_linear_probe(features, labels, 3, epochs=5, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    c = fit_linear_probe(features, labels, 3, epochs=5, seed=2)
    assert not torch.equal(a.weight, c.weight)


def test_linear_probe_min_steps_adds_epochs_on_small_sets():
    features, labels = blobs(25, 4, 8, seed=4)  # 100 images, batch 32: 4 steps per epoch
    assert probe_epochs_run(100, 3, 32, 40) == 10 and probe_epochs_run(100, 40, 32, 40) == 40
    longer = fit_linear_probe(features, labels, 4, epochs=3, min_steps=40)
    explicit = fit_linear_probe(features, labels, 4, epochs=10)
    assert torch.equal(longer.weight, explicit.weight) and torch.equal(longer.bias, explicit.bias)


def test_linear_probe_folds_standardisation_into_the_layer():
    features, labels = blobs(40, 4, 8, seed=3)
    scale, offset = torch.logspace(-2, 3, 8), torch.linspace(-500, 500, 8)
    plain = fit_linear_probe(features, labels, 4, epochs=20)
    affine = fit_linear_probe(features * scale + offset, labels, 4, epochs=20)
    # standardising first makes the fit invariant to per-dimension affine maps of the raw features (up to float32
    # rounding of the standardisation: logits reach ~5 here, differences ~2e-3)
    torch.testing.assert_close(affine(features * scale + offset), plain(features), rtol=1e-3, atol=1e-2)
    assert (affine(features * scale + offset).argmax(1) == labels).float().mean() > 0.95
    assert not affine.weight.requires_grad


def test_linear_probe_rejects_bad_input():
    with pytest.raises(ValueError, match="train_labels must lie"):
        fit_linear_probe(torch.randn(4, 3), torch.tensor([0, 1, 2, 5]), 3)
    with pytest.raises(ValueError, match="train_features must be"):
        fit_linear_probe(torch.randn(4), torch.tensor([0, 1, 2, 1]), 3)


@pytest.mark.shared_data
def test_linear_probe_on_real_cifar10_pixels():
    # 16x16 RGB pixels as features: a linear classifier on raw pixels reaches ~39% on CIFAR-10 (chance 10%)
    per_class = {"train": 300, "test": 60}
    data = {"train": ([], []), "test": ([], [])}
    classes = list(CIFAR10_CLASSNAMES)
    with tarfile.open(shared_data("cifar10-jpg.tar.gz")) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-3] not in data or parts[-2] not in classes:
                continue
            xs, ys = data[parts[-3]]
            label = classes.index(parts[-2])
            if ys.count(label) >= per_class[parts[-3]]:
                continue
            image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB").resize((16, 16))
            xs.append(torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1)))
            ys.append(label)
            if all(len(data[split][1]) == 10 * n for split, n in per_class.items()):
                break
    train_x, train_y = torch.stack(data["train"][0]), torch.tensor(data["train"][1])
    test_x, test_y = torch.stack(data["test"][0]), torch.tensor(data["test"][1])
    assert len(train_y) == 3000 and len(test_y) == 600
    probe = fit_linear_probe(train_x, train_y, 10)
    accuracy = (probe(test_x).argmax(1) == test_y).float().mean().item()
    assert 0.3 < accuracy < 0.5


def test_label_fraction_subset_is_stratified_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 7)[torch.randperm(87, generator=torch.Generator().manual_seed(0))]
    subset = label_fraction_subset(labels, 0.1, seed=0)
    assert torch.equal(subset, subset.sort().values) and subset.unique().numel() == subset.numel()
    assert torch.bincount(labels[subset]).tolist() == [5, 3, 1]
    assert torch.equal(subset, label_fraction_subset(labels.tolist(), 0.1, seed=0))
    assert not torch.equal(subset, label_fraction_subset(labels, 0.1, seed=1))
    assert torch.equal(label_fraction_subset(labels, 1.0, seed=0), torch.arange(87))
    with pytest.raises(ValueError, match="fraction"):
        label_fraction_subset(labels, 0.0, seed=0)
