"""MoCo v2, BYOL and SimSiam on 2 gloo ranks: loss and gradients equal one process on the global batch, the MoCo
queue holds every rank's keys, and shuffle-BN encodes each key in a batch mixed across ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_modules import BYOL, MoCoV2, SimSiam
from lightning_modules.momentum import momentum_copy
from tests.test_losses_ddp import assert_same_grads, free_port

WORLD = 2
GLOBAL_BATCH = 8
QUEUE = 32
METHODS = {
    "moco_v2": lambda: MoCoV2(width=2, proj_hidden_dim=8, proj_output_dim=4, queue_size=QUEUE),
    "byol": lambda: BYOL(width=2, proj_hidden_dim=8, proj_output_dim=4),
    "simsiam": lambda: SimSiam(width=2, proj_hidden_dim=8, proj_output_dim=4, pred_hidden_dim=4),
}


def without_batch_norm(module: nn.Module) -> nn.Module:
    """Batch norm swapped for identities: with it, a rank's statistics would differ from the global batch's
    (that part is SyncBatchNorm's / shuffle-BN's, tested apart)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            without_batch_norm(child)
    return module


def build(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = without_batch_norm(METHODS[method]()).double()
    if hasattr(model, "momentum_encoder"):  # the targets start as copies of the online network, as in __init__
        model.momentum_encoder = momentum_copy(model.encoder)
        model.momentum_projector = momentum_copy(model.projector)
    return model


def views() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))


def step(model: nn.Module, view1: torch.Tensor, view2: torch.Tensor) -> dict:
    loss = model.method_loss(view1, view2)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {n: t.detach().clone() for n, t in model.state_dict().items() if n.startswith("queue")}
    return {"loss": loss.detach(), "grads": grads, "state": state}


def shuffle_bn_keys() -> torch.Tensor:
    """MoCo's keys with batch norm in the key encoder (shuffle-BN on), this rank's images only."""
    torch.manual_seed(0)
    model = MoCoV2(width=2, proj_hidden_dim=8, proj_output_dim=4, queue_size=QUEUE).double()
    return model.all_keys(views()[1][local_rows()])


def local_rows() -> slice:
    rank = dist.get_rank() if dist.is_initialized() else 0
    n = GLOBAL_BATCH // WORLD
    return slice(rank * n, (rank + 1) * n)


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for method in METHODS:
        model = build(method)
        view1, view2 = views()
        result = step(model, view1[local_rows()], view2[local_rows()])
        for grad in result["grads"].values():  # what DDP does: the mean of the ranks' gradients
            dist.all_reduce(grad)
            grad /= WORLD
        results[method] = result
    results["shuffle_bn_keys"] = shuffle_bn_keys()
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_methods")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("method", list(METHODS))
def test_ddp_loss_and_gradients_equal_one_process(ddp_results, method):
    model = build(method)
    reference = step(model, *views())
    mean_loss = sum(r[method]["loss"] for r in ddp_results) / WORLD
    torch.testing.assert_close(mean_loss, reference["loss"], rtol=1e-10, atol=1e-12)
    for rank_result in ddp_results:
        assert_same_grads(rank_result[method]["grads"], reference["grads"])


def test_moco_queue_receives_every_ranks_keys(ddp_results):
    model = build("moco_v2")
    reference = step(model, *views())["state"]  # one process enqueues the keys of the whole global batch
    assert int(reference["queue_ptr"]) == GLOBAL_BATCH
    for rank_result in ddp_results:
        state = rank_result["moco_v2"]["state"]
        assert int(state["queue_ptr"]) == GLOBAL_BATCH
        torch.testing.assert_close(state["queue"], reference["queue"], rtol=1e-10, atol=1e-12)
    # and the new rows are keys (unit vectors), not the random initial queue's rows
    torch.testing.assert_close(
        reference["queue"][:GLOBAL_BATCH].norm(dim=1), torch.ones(GLOBAL_BATCH, dtype=torch.float64)
    )
    assert not torch.equal(reference["queue"][:GLOBAL_BATCH], build("moco_v2").queue[:GLOBAL_BATCH])


def test_shuffle_bn_encodes_keys_in_batches_mixed_across_ranks(ddp_results):
    """Each rank encodes the slice of a permutation of the global batch (drawn alike on every rank from the global
    step): a key's batch statistics come from a mix of both ranks' images, never from its own query's batch."""
    torch.manual_seed(0)
    model = MoCoV2(width=2, proj_hidden_dim=8, proj_output_dim=4, queue_size=QUEUE).double()
    images = views()[1]
    order = torch.randperm(GLOBAL_BATCH, generator=torch.Generator().manual_seed(0))
    n = GLOBAL_BATCH // WORLD
    assert all({int(i) // n for i in order[r * n : (r + 1) * n]} == {0, 1} for r in range(WORLD))  # mixed
    with torch.no_grad():
        expected = torch.empty(GLOBAL_BATCH, 4, dtype=torch.float64)
        for r in range(WORLD):
            rows = order[r * n : (r + 1) * n]
            z = model.momentum_projector(model.momentum_encoder(images[rows]))
            expected[rows] = torch.nn.functional.normalize(z, dim=1)
        local_batch_keys = model.all_keys(images)  # one batch: the statistics of the whole global batch
    for rank_result in ddp_results:
        torch.testing.assert_close(rank_result["shuffle_bn_keys"], expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(expected, local_batch_keys)  # batch norm sees a different batch than without shuffle
