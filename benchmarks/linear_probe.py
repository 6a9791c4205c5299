"""Linear probe protocols compared on one saved SimCLR encoder: the frozen features of the probe's training share
(10% of the kNN bank's labels, stratified) and of the test split, then each probe's test accuracy.

    python -m benchmarks.linear_probe --checkpoint RUN/checkpoints/last.ckpt --config configs/smoke/simclr_shapes.yaml
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from datamodules import SimCLRDataModule
from lightning_modules import SimCLR
from lightning_modules.probes import fit_linear_probe, label_fraction_subset

# name -> fit_linear_probe arguments; the first is the probe clbd used before the NA protocol, the "(default)" one
# is fit_linear_probe's and SimCLR's default now.
PROTOCOLS = {
    "adamw 1e-3, 100 ep, batch 256 (before)": dict(optimizer="adamw", lr=1e-3, epochs=100, batch_size=256),
    "sgd 0.01 m0.9, 40 ep, batch 256": dict(optimizer="sgd", lr=0.01, epochs=40, batch_size=256),
    "sgd 0.01 m0.9, 40 ep, batch 32 (NA protocol's epochs)": dict(optimizer="sgd", lr=0.01, epochs=40, batch_size=32),
    "sgd 0.01 m0.9, 400 ep, batch 32": dict(optimizer="sgd", lr=0.01, epochs=400, batch_size=32),
    "sgd 0.01 m0.9, >= 6250 steps, batch 32 (default)": dict(
        optimizer="sgd", lr=0.01, epochs=40, batch_size=32, min_steps=6250
    ),
    "adamw 1e-3, 40 ep, batch 32": dict(optimizer="adamw", lr=1e-3, epochs=40, batch_size=32),
    "sgd 0.01 m0.9, 200 ep, batch 32": dict(optimizer="sgd", lr=0.01, epochs=200, batch_size=32),
    "sgd 0.01 m0.9, 800 ep, batch 32": dict(optimizer="sgd", lr=0.01, epochs=800, batch_size=32),
    "adamw 1e-3, 400 ep, batch 32": dict(optimizer="adamw", lr=1e-3, epochs=400, batch_size=32),
}


def features(model: SimCLR, loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    with torch.no_grad():
        for batch in loader:
            xs.append(model(batch["image"]))
            ys.append(batch["label"])
    return torch.cat(xs), torch.cat(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", required=True, help="the run's config (its data section gives the shards)")
    args = parser.parse_args()
    data_args = dict(yaml.safe_load(open(args.config))["data"]["init_args"])
    data_args.pop("augmentation", None)
    data_args["num_workers"] = 0
    datamodule = SimCLRDataModule(**data_args)
    datamodule.setup("test")
    model = SimCLR.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    bank_loader, test_loader = datamodule.test_dataloader()
    bank, bank_labels = features(model, bank_loader)
    test, test_labels = features(model, test_loader)
    subset = label_fraction_subset(bank_labels, model.hparams.probe_label_fraction, seed=0)
    num_classes = len(datamodule.class_names)
    results = {}
    for name, kwargs in PROTOCOLS.items():
        started = time.time()
        probe = fit_linear_probe(bank[subset], bank_labels[subset], num_classes, seed=0, **kwargs)
        train_acc = (probe(bank[subset]).argmax(1) == bank_labels[subset]).float().mean().item()
        test_acc = (probe(test).argmax(1) == test_labels).float().mean().item()
        results[name] = {"train_acc": train_acc, "test_acc": test_acc, "seconds": time.time() - started}
        print(
            f"{name}: probe train {100 * train_acc:.1f}%, test {100 * test_acc:.1f}% ({len(subset)} probe images, "
            f"{len(test_labels)} test images)",
            flush=True,
        )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
