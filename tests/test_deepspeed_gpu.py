"""DeepSpeed ZeRO-2/3 through Lightning's strategy; needs a CUDA GPU and the deepspeed extra (Lightning refuses CPU)."""

from __future__ import annotations

import pytest
import torch

from clbd import main
from defenses.base import load_poisoned_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_fit_writes_a_consolidated_checkpoint(tmp_path, make_shards, stage):
    if not torch.cuda.is_available():
        pytest.skip("DeepSpeed runs need a CUDA GPU")
    pytest.importorskip("deepspeed")
    shards = make_shards(n=128, per_shard=32, captions=True)
    run = tmp_path / f"zero{stage}"
    code = main(
        [
            "fit",
            "--config=configs/strategy/deepspeed_zero2.yaml",
            f"--trainer.strategy.init_args.stage={stage}",
            "--model=lightning_modules.CLIP",
            "--model.model_name=clip-tiny-vit",
            "--data=datamodules.CLIPDataModule",
            "--data.model_name=clip-tiny-vit",
            f"--data.train_shards={shards}",
            "--data.val_shards=null",
            "--data.batch_size=32",
            "--data.num_workers=0",
            "--trainer.accelerator=gpu",
            "--trainer.devices=1",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={run}",
        ]
    )
    assert code == 0
    assert (run / "checkpoints" / "last.ckpt").is_dir()  # DeepSpeed's per-rank folder
    consolidated = run / "consolidated" / "last.ckpt"
    state = load_poisoned_checkpoint(str(consolidated), ("CLIP",))  # what defenses and evaluation load
    assert any(name.startswith("model.") for name in state["state_dict"])
    assert all(t.dtype == torch.float32 for t in state["state_dict"].values() if t.is_floating_point())
