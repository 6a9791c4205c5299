"""MoCo v2, BYOL and SimSiam: the NA-poisoned smoke run on the built-in shapes end to end (fit, then ``clbd test`` of
the trained and of the untrained encoder), the momentum schedule, what is trained and checkpointed, bad settings.

Whether a method beats the untrained encoder's kNN accuracy needs longer runs than a CPU test affords: after this
test's 124 steps (batch 32) the kNN CA measured on 2 busy cores was MoCo v2 14.6%, SimSiam 14.8% against the
untrained encoder's 19.2% (an early dip; SimCLR's 12-epoch smoke run reaches 53%). That comparison is a measurement
to make with the full smoke configs, not an assertion here."""

from __future__ import annotations

import json

import pytest
import torch

from clbd import main
from lightning_modules import BYOL, MoCoV2, SimSiam

# The shipped smoke configs, shortened: 2,000 of the 5,000 training images, batch 32, 2 epochs (124 steps).
SHORT = [
    "--data.init_args.train_fraction=0.4",
    "--data.init_args.batch_size=32",
    "--data.init_args.knn_bank_size=1000",
    "--data.init_args.num_workers=1",
    "--trainer.max_epochs=2",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco_v2", "byol", "simsiam"])
def test_smoke_run_with_na_trains_and_evaluates(tmp_path, method, monkeypatch):
    monkeypatch.setattr("sys.argv", ["clbd"])
    configs = [f"--config=configs/smoke/{method}_shapes.yaml", "--config=configs/smoke/na_shapes.yaml"]
    trained, untrained = tmp_path / "trained", tmp_path / "untrained"
    assert main(["fit", *configs, *SHORT, f"--trainer.default_root_dir={trained}"]) == 0
    checkpoint = trained / "checkpoints" / "last.ckpt"
    assert main(["test", *configs, *SHORT, f"--trainer.default_root_dir={trained}", f"--ckpt_path={checkpoint}"]) == 0
    assert main(["test", *configs, *SHORT, f"--trainer.default_root_dir={untrained}"]) == 0
    after = json.loads((trained / "checkpoints" / "metrics.json").read_text())["last.ckpt"]
    before = json.loads((untrained / "metrics.json").read_text())["final"]
    assert after["method"] == before["method"] == method
    assert after["attack"]["name"] == "noisy_alignment" and after["knn"]["asr_images"] == 900
    assert json.loads((trained / "data_report.json").read_text())["poisoned_seen"] > 0
    for result in (after, before):  # both measured the same way: 1,000 test images, 900 of them triggered
        assert result["knn"]["n_images"] == 1000 and result["linear_probe"]["asr_images"] == 900
        assert 0 <= result["knn"]["accuracy"] <= 1 and 0 <= result["knn"]["asr"] <= 1
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] >= 100 and state["hyper_parameters"]["width"] == 8


def test_momentum_targets_follow_the_cosine_schedule():
    """BYOL's target moves by (1 - tau) towards the online network; tau rises from base_tau to final_tau."""
    from lightning_modules.momentum import cosine_tau, ema_update

    assert cosine_tau(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_tau(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_tau(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_tau(7, 100, 0.999, 0.999) == pytest.approx(0.999)  # MoCo: constant
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * target.weight.detach() + 0.1 * online.weight.detach()
    ema_update(online, target, 0.9)
    torch.testing.assert_close(target.weight.detach(), expected)


def test_targets_and_queue_are_not_trained_and_are_checkpointed():
    moco, byol = MoCoV2(width=2, queue_size=16), BYOL(width=2)
    for model in (moco, byol):
        assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
        assert all(p.requires_grad for p in model.encoder.parameters())
        assert "momentum_encoder.conv1.weight" in model.state_dict()
    assert moco.state_dict()["queue"].shape == (16, 128) and int(moco.state_dict()["queue_ptr"]) == 0
    torch.testing.assert_close(moco.queue.norm(dim=1), torch.ones(16))


def test_simsiam_predictor_keeps_a_fixed_rate():
    from lightning_modules.base import split_fixed_lr
    from lightning_modules.optim import param_groups_no_decay

    model = SimSiam(width=2, proj_hidden_dim=8, proj_output_dim=8, pred_hidden_dim=4)
    groups = split_fixed_lr(param_groups_no_decay(model, 1e-4), model.fixed_lr_parameters())
    fixed = {id(p) for g in groups if g.get("fixed_lr") for p in g["params"]}
    assert fixed == {id(p) for p in model.predictor.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: MoCoV2(width=2, queue_size=0), "model.queue_size"),
        (lambda: BYOL(width=2, base_tau=1.5), "model.base_tau"),
        (lambda: SimSiam(width=2, probe_label_fraction=0.0), "model.probe_label_fraction"),
        (lambda: MoCoV2(width=2, optimizer="rmsprop"), "model.optimizer"),
    ],
)
def test_bad_settings_name_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_channels_last_weights_train_like_nchw_and_momentum_copies_keep_the_layout():
    """model.channels_last: NHWC encoder weights (also in MoCo's key encoder); the same loss and updates as NCHW."""
    views = [torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(v)) for v in (1, 2)]
    losses, weights = {}, {}
    for layout in (False, True):
        torch.manual_seed(0)
        model = MoCoV2(width=4, queue_size=16, proj_hidden_dim=16, channels_last=layout)
        assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last) == layout
        assert model.momentum_encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last) == layout
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[layout] = []
        for _ in range(3):
            loss = model.method_loss(*views)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses[layout].append(loss.item())
        weights[layout] = model.encoder.conv1.weight.detach()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-6)
