"""The GPU speed settings checked on a CPU: each gives the results of the plain setting it replaces.

Vectorised LARS and torch's foreach / fused optimisers against the one-parameter-at-a-time reference; BatchNorm kept
in float32 under autocast; a compiled SimCLR step against the eager one; fp16 autocast with a gradient scaler trains;
no host synchronisation inside a training step; exact mid-epoch resume with the settings on.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_modules.base import ContrastiveModule
from lightning_modules.batchnorm_fp32 import batchnorm_fp32_count, keep_batchnorm_fp32
from lightning_modules.optim import LARS, build_optimizer, param_groups_no_decay
from lightning_modules.simclr import SimCLR

GPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "simclr_cifar10_gpu.yaml"


def small_net() -> nn.Module:
    torch.manual_seed(0)
    # no bias before the BatchNorm: its true gradient is 0, and Adam would turn the float noise there into +-lr
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def run_updates(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        net(x).pow(2).mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9, weight_decay=1e-4),
        dict(momentum=0.9, weight_decay=1e-2, nesterov=True),
        dict(momentum=0.0, weight_decay=1e-3, clip_lr=True),
        dict(momentum=0.9, weight_decay=0.0, exclude_bias_and_norm=False),
    ],
    ids=["momentum", "nesterov", "no_momentum_clip_lr", "nothing_excluded"],
)
def test_vectorised_lars_gives_the_per_parameter_updates(options):
    results = {}
    for foreach in (False, True):
        net = small_net()
        groups = param_groups_no_decay(net, options.get("weight_decay", 0.0))
        optimizer = LARS(groups, lr=0.3, foreach=foreach, **{k: v for k, v in options.items() if k != "weight_decay"})
        results[foreach] = run_updates(net, optimizer)
        if options["momentum"]:
            assert all("momentum_buffer" in optimizer.state[p] for p in net.parameters())
    for reference, vectorised in zip(results[False], results[True]):
        torch.testing.assert_close(vectorised, reference, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[True][0], small_net()[0].weight.detach())  # it did train


def test_vectorised_lars_handles_zero_parameters_and_missing_gradients():
    weight = nn.Parameter(torch.zeros(3, 2))  # ||p|| = 0: trust 1
    other = nn.Parameter(torch.ones(4, 2))
    frozen = nn.Parameter(torch.ones(2, 2))  # no gradient: left alone
    results = []
    for foreach in (False, True):
        params = [nn.Parameter(t.detach().clone()) for t in (weight, other, frozen)]
        optimizer = LARS([{"params": params, "weight_decay": 0.1}], lr=0.5, foreach=foreach)
        for _ in range(2):
            params[0].grad, params[1].grad, params[2].grad = torch.full((3, 2), 0.5), torch.full((4, 2), 0.2), None
            optimizer.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(results[1][2], frozen) and not torch.equal(results[1][0], weight)


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam", "lars"])
def test_optimizer_implementations_give_the_reference_updates(name):
    impls = ["for-loop", "foreach"] + ([] if name == "lars" else ["fused"])
    results = {}
    for impl in impls:
        net = small_net()
        optimizer = build_optimizer(name, param_groups_no_decay(net, 1e-2), lr=0.05, impl=impl)
        results[impl] = run_updates(net, optimizer)
    for impl in impls[1:]:
        for reference, other in zip(results["for-loop"], results[impl]):
            torch.testing.assert_close(other, reference, rtol=1e-5, atol=1e-6, msg=f"{name} {impl}")


def test_optimizer_settings_are_refused_by_field_name():
    with pytest.raises(ValueError, match="model.optimizer_impl.*LARS"):
        SimCLR(width=4, proj_hidden_dim=8, optimizer="lars", optimizer_impl="fused")
    with pytest.raises(ValueError, match="model.optimizer_impl"):
        ContrastiveModule(optimizer_impl="vectorised")
    with pytest.raises(ValueError, match="model.compile_mode"):
        ContrastiveModule(compile_mode="fast")


def test_batchnorm_fp32_is_the_plain_module_in_float32_and_float32_inside_autocast():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    plain(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    kept = keep_batchnorm_fp32(copy.deepcopy(plain))
    assert batchnorm_fp32_count(kept) == 1 and isinstance(kept[1], nn.BatchNorm2d)
    assert kept.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 3, 8, 8)
    assert torch.equal(kept(x), plain(x))  # float32: exactly the plain module, running statistics too
    assert torch.equal(kept[1].running_mean, plain[1].running_mean)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv_out = kept[0](x)
        out = kept[1](conv_out)
    assert conv_out.dtype == out.dtype == torch.bfloat16
    with torch.no_grad():
        reference = nn.functional.batch_norm(
            conv_out.float(), None, None, kept[1].weight, kept[1].bias, training=True, eps=kept[1].eps
        ).to(torch.bfloat16)
    assert torch.equal(out, reference)


def test_simclr_batchnorm_fp32_covers_encoder_and_projector_and_keeps_checkpoint_keys():
    plain = SimCLR(width=4, proj_hidden_dim=8)
    module = SimCLR(width=4, proj_hidden_dim=8, batchnorm_fp32=True)
    encoder_norms = sum(isinstance(m, nn.BatchNorm2d) for m in module.encoder.modules())
    assert batchnorm_fp32_count(module.encoder) == encoder_norms > 0
    module.on_fit_start()  # the projector's BatchNorm1d, built after the encoder
    assert batchnorm_fp32_count(module) == encoder_norms + 1
    assert module.state_dict().keys() == plain.state_dict().keys()


def tiny_batch(seed: int = 0, size: int = 8, n: int = 8) -> dict:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 3, size, size, generator=generator) for _ in range(2)]
    return {"views": views}


def inductor_unavailable() -> str | None:
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("cc")):
        return "torch.compile's inductor backend needs a C++ compiler on a CPU; none on PATH"
    try:
        import torch._inductor  # noqa: F401
    except Exception as error:  # pragma: no cover - depends on the install
        return f"torch._inductor does not import: {error}"
    return None


@pytest.mark.slow  # ~35 s of CPU, 40-75 s of wall time on 2 shared cores: inductor compiles forward and backward
@pytest.mark.skipif(inductor_unavailable() is not None, reason=str(inductor_unavailable()))
def test_compiled_simclr_step_equals_the_eager_one():
    """The GPU config's compile option on a tiny SimCLR (width 4, 8 px): same loss and gradients, forward and
    backward through inductor's kernels."""
    batch = tiny_batch()
    grads, losses = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = SimCLR(width=4, proj_hidden_dim=16, proj_output_dim=8, compile=compiled).train()
        start = time.perf_counter()
        loss = module.method_loss(*batch["views"])
        loss.backward()
        losses[compiled] = loss.detach()
        grads[compiled] = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        if compiled:
            print(f"compiled step: {time.perf_counter() - start:.1f} s including compilation")
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) > 10
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # ~25 s on 2 shared cores: inductor compiles both towers, forward and backward
@pytest.mark.skipif(inductor_unavailable() is not None, reason=str(inductor_unavailable()))
def test_compiled_clip_step_equals_the_eager_one():
    """CLIP's compile option compiles its towers (the model's forward, which training never calls, compiled
    nothing before): on clip-tiny-vit the same loss and gradients as eager, through graphs dynamo captured."""
    from torch._dynamo.utils import counters

    from lightning_modules.clip import CLIP

    grads, losses = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = CLIP(model_name="clip-tiny-vit", compile=compiled).train()
        generator = torch.Generator().manual_seed(1)
        batch = {
            "image": torch.randn(4, 3, *module.model.visual.image_size, generator=generator),
            "text": module.tokenizer(["a photo of a cat", "a dog", "a red truck on a road", "a ship"]),
        }
        graphs = counters["stats"]["unique_graphs"]
        loss = module.loss(*module.clip_outputs(batch))
        loss.backward()
        captured = counters["stats"]["unique_graphs"] - graphs
        assert captured >= (2 if compiled else 0) and (compiled or captured == 0), captured  # one graph per tower
        losses[compiled] = loss.detach()
        grads[compiled] = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) > 20
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-5, msg=name)


class Batches:
    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def clip_batch(module, seed: int, n: int = 4) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, *module.model.visual.image_size, generator=generator)
    return {"image": image, "text": module.tokenizer([f"a photo of thing {seed}-{i}" for i in range(n)])}


def fit_tiny(module, steps: int, callbacks=(), batches=None, **trainer_options) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(trainer_options)
    trainer = L.Trainer(callbacks=list(callbacks), **options)
    trainer.fit(module, train_dataloaders=Batches(batches or [tiny_batch(i) for i in range(steps)]))
    return trainer


def test_fp16_autocast_with_a_gradient_scaler_trains_on_cpu():
    """``16-mixed`` with its GradScaler (Lightning swaps ``16-mixed`` for bf16 on a CPU accelerator, so the plugin
    is given directly): the loss is finite, the weights move, the scaler steps. A scaler skips the steps whose
    scaled gradients overflow fp16 and halves its scale each time; starting at 2**8 instead of 2**16 keeps this
    4-step run from spending all its steps finding the scale."""
    torch.manual_seed(0)
    module = SimCLR(width=4, proj_hidden_dim=16, proj_output_dim=8, optimizer="sgd", lr=0.05)
    before = module.encoder.conv1.weight.detach().clone()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    fit_tiny(module, 4, callbacks=[Losses()], plugins=[plugin])
    assert plugin.scaler is not None and plugin.scaler.get_scale() > 0
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(module.encoder.conv1.weight.detach(), before)


def test_bf16_with_batchnorm_fp32_trains_like_bf16():
    results = {}
    for keep in (False, True):
        torch.manual_seed(0)
        module = SimCLR(width=4, proj_hidden_dim=16, proj_output_dim=8, optimizer="sgd", lr=0.05, batchnorm_fp32=keep)
        fit_tiny(module, 3, precision="bf16-mixed")
        results[keep] = module.encoder.conv1.weight.detach()
        assert module.encoder.bn1.weight.dtype == torch.float32
    # the same training to bf16 rounding (BatchNorm in float32 is the more exact of the two)
    torch.testing.assert_close(results[True], results[False], rtol=0.05, atol=2e-3)


SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")


@pytest.mark.parametrize("method", ["simclr_lars_foreach", "clip_fused_adamw"])
def test_training_step_makes_no_host_synchronising_call_between_log_steps(monkeypatch, tmp_path, method):
    """Python-level reads of a tensor's value (``.item()``, ``bool(t)``, ...) stall a GPU step until the device
    catches up. Counted over the whole step (Lightning's loop, clbd's training step, the optimiser (vectorised LARS;
    CLIP's fused AdamW and its temperature clamp), the schedule) for steps that neither log nor refresh a progress
    bar. Syncs made inside C++ ops are not seen here (on a GPU, ``torch.cuda.set_sync_debug_mode`` sees those)."""
    counts: dict[int, int] = {}

    class CountSyncs(L.Callback):
        def __init__(self):
            self.step = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step = trainer.global_step
            counts[self.step] = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.step = None

    counter = CountSyncs()
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if counter.step is not None:
                counts[counter.step] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    if method == "clip_fused_adamw":
        from lightning_modules.clip import CLIP

        torch.manual_seed(0)
        module = CLIP(model_name="clip-tiny-vit", optimizer_impl="fused")
        batches = [clip_batch(module, i) for i in range(6)]
    else:
        module = SimCLR(width=4, proj_hidden_dim=16, proj_output_dim=8, optimizer="lars", optimizer_impl="foreach")
        batches = None
    logger = CSVLogger(tmp_path)  # a logger as a run has one: it reads the logged values every 50 steps
    # a progress bar as the GPU config advises (TQDM_MINITERS=50; Lightning's default reads the loss every step)
    monkeypatch.setenv("TQDM_MINITERS", "50")
    assert "TQDM_MINITERS=50" in GPU_CONFIG.read_text()
    fit_tiny(module, 6, [counter], batches, logger=logger, log_every_n_steps=50, enable_progress_bar=True)
    assert sorted(counts) == list(range(6))
    # the last step refreshes the bar at the epoch's end
    assert all(count == 0 for step, count in counts.items() if 0 < step < 5), counts


def test_mid_epoch_resume_is_bitwise_exact_with_the_speed_settings(tmp_path, make_shards):
    """tests/test_resume.py's check (an NA-poisoned run stopped mid-epoch and resumed equals an uninterrupted one,
    bit for bit) with vectorised LARS, BatchNorm in float32 and bf16 autocast on. (A compiled encoder is left out:
    40-75 s of compilation per fit here; its step equals the eager one above.)"""
    from clbd import main
    from tests.callbacks import SimulatedPreemption
    from tests.test_resume import SIMCLR, common_args

    model, data, attack = SIMCLR
    model = [*model, "--model.optimizer_impl=foreach", "--model.batchnorm_fp32=true"]
    settings = ["--trainer.precision=bf16-mixed"]
    shards = make_shards(n=160, per_shard=40)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["fit", *common_args(shards, straight, model, data, attack), *settings]) == 0
    interrupt = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=13"]
    with pytest.raises(SimulatedPreemption):
        main(["fit", *common_args(shards, interrupted, model, data, attack), *settings, *interrupt])
    resume = ["--ckpt_path", str(interrupted / "checkpoints" / "epoch=1-step=12.ckpt")]
    assert main(["fit", *common_args(shards, interrupted, model, data, attack), *settings, *resume]) == 0
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] >= 18
    assert a["hyper_parameters"]["optimizer_impl"] == "foreach" and a["hyper_parameters"]["batchnorm_fp32"]
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
def test_training_step_on_a_gpu_makes_no_synchronising_cuda_call():
    """The CPU test above sees Python-level reads only; CUDA's own sync detector sees every synchronising call
    (``.item()``, device-to-host copies, ``nonzero``...) inside steps 1-4 of a bf16 SimCLR fit with the GPU
    config's settings that are on (fused SGD, channels-last) and no progress bar."""
    import warnings

    syncs: list[str] = []

    class SyncDetector(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if 1 <= batch_idx <= 4:
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")

    torch.manual_seed(0)
    module = SimCLR(width=16, proj_hidden_dim=64, optimizer="sgd", optimizer_impl="fused", channels_last=True)
    batches = [
        {"views": [v.cuda().contiguous(memory_format=torch.channels_last) for v in tiny_batch(i, 32, 64)["views"]]}
        for i in range(6)
    ]
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,  # as benchmarks/gpu_check.sh runs (TQDM_MINITERS=50 does the same)
        callbacks=[SyncDetector()],
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, train_dataloaders=Batches(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, syncs


def test_clip_towers_attend_through_scaled_dot_product_attention(monkeypatch):
    """Issue 23's lead "flash attention in open_clip's towers" is already taken: open_clip's blocks call
    nn.MultiheadAttention with need_weights=False, which runs torch's scaled_dot_product_attention (flash or
    memory-efficient kernels on a GPU) in training, in every layer of both towers; the text tower passes its causal
    mask. An open_clip upgrade that fell back to the explicit softmax(QK^T)V would fail here."""
    import torch.nn.functional as F

    from lightning_modules.clip import CLIP

    module = CLIP(model_name="clip-tiny-vit").train()
    calls: list[tuple[int, bool]] = []
    attend = F.scaled_dot_product_attention

    def counted(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append((query.shape[-2], attn_mask is not None))
        return attend(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    model = module.model
    images = torch.randn(2, 3, *model.visual.image_size)
    tokens = torch.randint(0, model.vocab_size, (2, model.context_length))
    model(images, tokens)
    layers = len(model.visual.transformer.resblocks) + len(model.transformer.resblocks)
    assert len(calls) == layers
    assert [masked for length, masked in calls if length == model.context_length] == [True] * len(
        model.transformer.resblocks
    )
