"""Contrastive losses: values on hand-made inputs, and DDP (2 gloo ranks) gradients equal to one process on the
global batch when gathering with gradient, and different without."""

from __future__ import annotations

import math
import socket

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lightning_modules.backbones import register_model_configs
from lightning_modules.losses import NTXentLoss, clip_loss, gather_with_grad

WORLD = 2
GLOBAL_BATCH = 8
CAPTIONS = [
    "a photo of a cat.",
    "a dog running on grass.",
    "a red car parked in the street.",
    "two birds on a wire.",
    "a plate of food.",
    "a ship at sea.",
    "a horse in a field.",
    "a truck on a highway.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def simclr_setup() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    views = torch.randn(GLOBAL_BATCH, 2, 10, dtype=torch.float64)
    return model, views


def clip_setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("clip-tiny-vit", pretrained=None).double()
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, dtype=torch.float64)
    tokens = open_clip.get_tokenizer("clip-tiny-vit")(CAPTIONS)
    return model, images, tokens


def simclr_step(model: nn.Module, views: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
    loss = loss_fn(model(views[:, 0]), model(views[:, 1]))
    loss.backward()
    return loss.detach()


def clip_step(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
    image_features, text_features, logit_scale = model(images, tokens)
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    return loss.detach()


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name.removeprefix("module."): p.grad.detach().clone() for name, p in model.named_parameters()}


def ddp_worker(rank: int, port: int, out_path: str) -> None:
    # built before the process group exists, as a LightningModule's __init__ would: rank/world are read at call time
    early_clip_loss = clip_loss()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    results = {}
    for case, with_grad in [("ntxent", True), ("ntxent_nograd", False)]:
        model, views = simclr_setup()
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = simclr_step(ddp, views[local], NTXentLoss(temperature=0.5, gather_with_grad=with_grad))
        results[case] = (loss, grads_of(ddp))
    for case, loss_fn in [("clip", early_clip_loss), ("clip_nograd", clip_loss(gather_with_grad=False))]:
        model, images, tokens = clip_setup()
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = clip_step(ddp, images[local], tokens[local], loss_fn)
        results[case] = (loss, grads_of(ddp))
    # gather_with_grad: the concatenation is rank-major
    x = torch.full((2, 3), float(rank), requires_grad=True)
    results["gathered"] = gather_with_grad(x).detach()
    torch.save(results, f"{out_path}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_losses")
    mp.spawn(ddp_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process() -> dict:
    results = {}
    model, views = simclr_setup()
    results["ntxent"] = (simclr_step(model, views, NTXentLoss(temperature=0.5)), grads_of(model))
    model, images, tokens = clip_setup()
    results["clip"] = (clip_step(model, images, tokens, clip_loss()), grads_of(model))
    return results


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12, msg=f"gradient of {name} differs")


def max_relative_grad_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in a)


@pytest.mark.parametrize("case", ["ntxent", "clip"])
def test_ddp_loss_and_gradients_equal_single_process_on_global_batch(ddp_results, single_process, case):
    ref_loss, ref_grads = single_process[case]
    mean_loss = sum(r[case][0] for r in ddp_results) / WORLD
    torch.testing.assert_close(mean_loss, ref_loss, rtol=1e-10, atol=1e-12)
    for rank_result in ddp_results:
        assert_same_grads(rank_result[case][1], ref_grads)


@pytest.mark.parametrize("case", ["ntxent", "clip"])
def test_gather_without_gradient_gives_different_gradients(ddp_results, single_process, case):
    ref_loss, ref_grads = single_process[case]
    loss_nograd = sum(r[f"{case}_nograd"][0] for r in ddp_results) / WORLD
    # the forward value is the same; only the backward loses the cross-rank terms
    torch.testing.assert_close(loss_nograd, ref_loss, rtol=1e-10, atol=1e-12)
    assert max_relative_grad_difference(ddp_results[0][f"{case}_nograd"][1], ref_grads) > 0.1


def test_gather_with_grad_concatenates_rank_major(ddp_results):
    expected = torch.tensor([0.0] * 6 + [1.0] * 6).reshape(4, 3)
    for rank_result in ddp_results:
        torch.testing.assert_close(rank_result["gathered"], expected)


def test_ntxent_hand_made_value():
    # two orthogonal unit vectors, both views identical: positive similarity 1, the two negatives 0
    z = torch.eye(2, dtype=torch.float64)
    loss = NTXentLoss(temperature=0.5)(z, z.clone())
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + 2 * math.exp(-2.0)), dtype=torch.float64))


def test_ntxent_matches_explicit_per_row_formula():
    torch.manual_seed(1)
    z1, z2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    temperature = 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    terms = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = torch.stack([z[i] @ z[j] / temperature for j in range(2 * n) if j != i])
        terms.append(torch.logsumexp(sims, 0) - z[i] @ z[positive] / temperature)
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(NTXentLoss(temperature=temperature)(z1, z2), expected)


def test_ntxent_rejects_mismatched_views():
    with pytest.raises(ValueError, match="same shape"):
        NTXentLoss()(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
