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

# name -> fit_linear_probe arguments; "(default)" is fit_linear_probe's and SimCLR's default.
PROTOCOLS = {
    "sgd 0.01 m0.9, 40 ep, batch 256": dict(epochs=40, batch_size=256),
    "sgd 0.01 m0.9, 40 ep, batch 32 (the NA protocol's epochs)": dict(epochs=40, batch_size=32),
    "sgd 0.01 m0.9, 200 ep, batch 32": dict(epochs=200, batch_size=32),
    "sgd 0.01 m0.9, >= 6250 steps, batch 32 (default)": dict(epochs=40, batch_size=32, min_steps=6250),
    "sgd 0.01 m0.9, 800 ep, batch 32": dict(epochs=800, batch_size=32),
}


def earlier_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, batch_size: int):
    """The probe clbd used before the NA protocol: standardised features, AdamW lr 1e-3 with a cosine over every
    step, zero-initialised, 100 epochs of batch 256 by default (kept here only to measure against)."""
    mean, std = features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6)
    x = (features - mean) / std
    probe = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.0)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = torch.nn.functional.cross_entropy(probe(x[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return lambda z: probe((z - mean) / std)


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
    # weights_only: a crafted file is refused; Lightning (>= 2.6) builds only an already imported SimCLR subclass
    # from the checkpoint's hyper_parameters and refuses an instantiator outside its allow-list.
    model = SimCLR.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True).eval()
    bank_loader, test_loader = datamodule.test_dataloader()
    bank, bank_labels = features(model, bank_loader)
    test, test_labels = features(model, test_loader)
    subset = label_fraction_subset(bank_labels, model.hparams.probe_label_fraction, seed=0)
    num_classes = len(datamodule.class_names)
    results = {}
    fits = {
        "adamw 1e-3 cosine, 100 ep, batch 256 (before)": lambda x, y: earlier_probe(x, y, num_classes, 100, 256),
        "adamw 1e-3 cosine, 1000 ep, batch 256": lambda x, y: earlier_probe(x, y, num_classes, 1000, 256),
        **{
            name: (lambda x, y, kw=kwargs: fit_linear_probe(x, y, num_classes, seed=0, **kw))
            for name, kwargs in PROTOCOLS.items()
        },
    }
    for name, fit in fits.items():
        started = time.time()
        with torch.enable_grad():
            probe = fit(bank[subset], bank_labels[subset])
        with torch.no_grad():
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
