"""Backdoor evaluation metrics as torchmetrics ``Metric``s, so that they sync across ranks on ``compute()``.

ASR (attack success rate) is defined once here, for every caller:

    ASR = (# triggered test images whose true class != target and whose top-k predictions contain the target)
          / (# triggered test images whose true class != target)

Target-class images are excluded by default because for them "predicted as target" is a correct prediction, not an
attack success. Peers differ (CleanCLIP's zero-shot path ignores the target index, BadCLIP counts target-class
images); ``exclude_target_class=False`` reproduces counting every triggered image. Whoever writes results should
write the setting next to the number, with the count of images behind it (``hits``, ``total``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


def _check_scores_labels(scores: Tensor, labels: Tensor, who: str) -> None:
    if scores.ndim != 2:
        raise ValueError(f"{who}: scores must be [N, num_classes], got shape {tuple(scores.shape)}")
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"{who}: labels must be [N] matching scores' N={scores.shape[0]}, got {tuple(labels.shape)}")


class AttackSuccessRate(Metric):
    """Share of triggered non-target-class images whose top-k predictions contain the target class.

    ``update(scores, labels)`` takes the class scores of TRIGGERED images (``[N, C]``, logits or similarities) and
    their TRUE labels. With ``exclude_target_class=True`` (default) images whose true label is the target are not
    counted at all; with ``False`` every triggered image is counted. ``compute()`` returns ``hits / total`` (NaN
    when nothing was counted); the integer states ``hits`` and ``total`` are the numbers behind it (this rank's;
    ``summary()`` gives the synced ones with the definition).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    hits: Tensor
    total: Tensor

    def __init__(self, target: int, top_k: int = 1, exclude_target_class: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if target < 0:
            raise ValueError(f"AttackSuccessRate: target must be a class index >= 0, got {target}")
        if top_k < 1:
            raise ValueError(f"AttackSuccessRate: top_k must be >= 1, got {top_k}")
        self.target = target
        self.top_k = top_k
        self.exclude_target_class = exclude_target_class
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        _check_scores_labels(scores, labels, "AttackSuccessRate")
        num_classes = scores.shape[1]
        if self.target >= num_classes:
            raise ValueError(f"AttackSuccessRate: target {self.target} is not a class of scores with {num_classes}")
        if self.top_k > num_classes:
            raise ValueError(f"AttackSuccessRate: top_k={self.top_k} exceeds the {num_classes} classes")
        counted = labels != self.target if self.exclude_target_class else torch.ones_like(labels, dtype=torch.bool)
        top = scores.topk(self.top_k, dim=1).indices
        hit = (top == self.target).any(dim=1) & counted
        self.hits += hit.sum()
        self.total += counted.sum()

    def compute(self) -> Tensor:
        if self.total == 0:
            return torch.tensor(math.nan)
        return self.hits.float() / self.total

    def summary(self) -> dict[str, float | int | bool | None]:
        """Rate, counts and definition for a results file, synced across ranks (``asr`` is None when nothing counted).

        Reading ``hits``/``total`` directly after ``compute()`` gives this rank's share only: torchmetrics restores the
        local states after syncing.
        """
        with self.sync_context():
            hits, total = int(self.hits), int(self.total)
        return {
            "asr": hits / total if total else None,
            "hits": hits,
            "total": total,
            "target": self.target,
            "top_k": self.top_k,
            "exclude_target_class": self.exclude_target_class,
        }


def asr_definition(summary: dict) -> str:
    """The ASR definition in words, written next to every ASR number in results files."""
    who = (
        "triggered test images whose true class is not the target"
        if summary["exclude_target_class"]
        else ("all triggered test images (target-class images included)")
    )
    return f"share of {who} whose top-{summary['top_k']} prediction contains the target class {summary['target']}"


# What each backdoor number means, written next to the numbers in every results file.
BACKDOOR_DEFINITIONS = {
    "asr": "share of triggered non-target-class images predicted as the target class",
    "control_asr": (
        "the same share with the control trigger: same size, blending and placement as the test trigger, a "
        "pattern no poisoned sample carried"
    ),
    "attributable_asr": (
        "asr - control_asr: the part of the ASR due to the attack's trigger, not to any patch or to a bias toward "
        "the target; the number to read"
    ),
    "clean_to_target": "share of clean non-target-class images predicted as the target class (a bias, no trigger)",
    "flip_rate": "share of non-target-class images predicted as the target with the trigger but not without it",
    "target_accuracy": "share of clean target-class images predicted as the target class",
    "histograms": (
        "predicted-class counts over every evaluated image (target-class images included), clean / triggered / "
        "control: a collapse onto one class shows as one tall bin; clean_target_class: the same over the clean "
        "target-class images alone (where a suppressed target's images go)"
    ),
}


def _rate(hits: int, total: int) -> dict[str, float | int | None]:
    return {"value": hits / total if total else None, "hits": hits, "images": total}


def backdoor_metrics(
    labels: Tensor,
    clean: Tensor,
    triggered: Tensor,
    control: Tensor | None,
    target: int,
    num_classes: int,
) -> dict:
    """Every backdoor number from top-1 predicted classes (``[N]`` each) of the same N images, clean, with the
    trigger and with the control trigger; ``labels`` are their true classes. One definition for kNN, linear probe
    and zero-shot alike (``BACKDOOR_DEFINITIONS``); each rate comes with the images behind it.

    Raises ValueError when the images hold no non-target-class image (no ASR can be measured on them).
    """
    labels, clean, triggered = labels.long().cpu(), clean.long().cpu(), triggered.long().cpu()
    control = None if control is None else control.long().cpu()
    for name, preds in (("clean", clean), ("triggered", triggered), ("control", control)):
        if preds is not None and preds.shape != labels.shape:
            raise ValueError(
                f"backdoor_metrics: {name} predictions {tuple(preds.shape)} must match labels {tuple(labels.shape)}"
            )
    if not 0 <= target < num_classes:
        raise ValueError(f"backdoor_metrics: target {target} is not one of the {num_classes} classes")
    others = labels != target
    n_others, n_target = int(others.sum()), int((~others).sum())
    if n_others == 0:
        raise ValueError(
            f"data.test_shards: the {labels.numel()} evaluated images are all of the target class {target}; "
            "ASR needs non-target-class images"
        )
    to_target = lambda preds: (preds == target) & others  # noqa: E731

    asr = _rate(int(to_target(triggered).sum()), n_others)
    result = {
        "target": target,
        "asr": asr,
        "clean_to_target": _rate(int(to_target(clean).sum()), n_others),
        "flip_rate": _rate(int((to_target(triggered) & (clean != target)).sum()), n_others),
        "target_accuracy": _rate(int(((clean == target) & ~others).sum()), n_target),
        "histograms": {
            "clean": torch.bincount(clean, minlength=num_classes).tolist(),
            "triggered": torch.bincount(triggered, minlength=num_classes).tolist(),
            # where clean target-class images go: the class a defense's suppression hands the target to
            "clean_target_class": torch.bincount(clean[~others], minlength=num_classes).tolist(),
        },
        "definitions": dict(BACKDOOR_DEFINITIONS),
    }
    if control is not None:
        control_asr = _rate(int(to_target(control).sum()), n_others)
        result["control_asr"] = control_asr
        result["attributable_asr"] = {"value": asr["value"] - control_asr["value"], "images": n_others}
        result["histograms"]["control"] = torch.bincount(control, minlength=num_classes).tolist()
    return result


def backdoor_headlines(backdoor: dict | None) -> dict[str, float | None]:
    """The rates of a ``backdoor_metrics`` result by name (for loggers and tables); empty without one."""
    if not backdoor:
        return {}
    names = ("asr", "control_asr", "attributable_asr", "clean_to_target", "flip_rate", "target_accuracy")
    return {name: backdoor[name]["value"] for name in names if name in backdoor}


class BackdoorPredictions(Metric):
    """Collects top-1 predictions of clean, triggered and control images (synced across ranks as cat states) and
    gives ``backdoor_metrics`` of all of them: what a streaming evaluator (zero-shot) accumulates batch by batch.

    States are floats, like ``KNNMonitor``'s: a rank that saw nothing contributes torchmetrics' float placeholder.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, target: int, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 <= target < num_classes:
            raise ValueError(f"BackdoorPredictions: target {target} is not one of the {num_classes} classes")
        self.target = target
        self.num_classes = num_classes
        for name in ("labels", "clean", "triggered", "control"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, labels: Tensor, clean: Tensor, triggered: Tensor, control: Tensor | None = None) -> None:
        self.labels.append(labels.detach().to(self.dtype))
        self.clean.append(clean.detach().to(self.dtype))
        self.triggered.append(triggered.detach().to(self.dtype))
        if control is not None:
            self.control.append(control.detach().to(self.dtype))

    def compute(self) -> dict:
        if isinstance(self.labels, list) and not self.labels:
            raise ValueError("BackdoorPredictions: nothing to measure; update() with triggered images first")
        labels, clean, triggered = (dim_zero_cat(getattr(self, n)) for n in ("labels", "clean", "triggered"))
        control = self.control
        control = dim_zero_cat(control) if not (isinstance(control, list) and not control) else None
        if control is not None and control.numel() != labels.numel():
            control = None  # some batches came without a control image: no control numbers rather than wrong ones
        return backdoor_metrics(labels, clean, triggered, control, self.target, self.num_classes)


def weighted_knn_scores(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores ``[Q, num_classes]`` of a weighted kNN vote (InstDisc / solo-learn monitor).

    Cosine similarity to the bank; each of the ``k`` nearest bank samples votes for its label with weight
    ``exp(sim / temperature)``. Queries are processed in chunks to bound memory.
    """
    queries = F.normalize(queries.float(), dim=1)
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for chunk in queries.split(chunk_size):
        sims, idx = (chunk @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, bank_labels.long()[idx], weights))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=queries.device)


class KNNMonitor(Metric):
    """Weighted kNN accuracy (and kNN ASR) of frozen features, synced across ranks.

    - ``update_bank(features, labels)``: training-set features (the kNN memory bank).
    - ``update_query(features, labels, triggered_features=None, control_features=None)``: clean validation
      features with their labels, and optionally the features of the SAME images with the trigger, and with the
      control trigger, applied (their true labels are ``labels``).
    - ``compute()`` -> ``{"acc", "asr", "n_clean", "n_triggered", "backdoor"}``: top-1 kNN accuracy on clean
      queries; ASR as defined in this module's docstring (triggered queries whose true class != ``target``
      predicted as ``target``; NaN without ``target`` or triggered queries); ``n_triggered`` counts the non-target
      triggered queries behind the ASR; ``backdoor`` is ``backdoor_metrics`` of the kNN predictions (None without
      ``target`` or triggered queries).

    Features are stored L2-normalised and FLATTENED to 1-D, labels as floats: torchmetrics pads uneven per-rank cat
    states when syncing, but a rank that never received a state contributes a 1-D empty tensor of the metric's
    float dtype, which would not gather with 2-D or integer ones. The feature dimension is recovered from the label
    count.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        k: int = 200,
        temperature: float = 0.1,
        target: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"KNNMonitor: num_classes must be >= 2, got {num_classes}")
        if k < 1:
            raise ValueError(f"KNNMonitor: k must be >= 1, got {k}")
        if not temperature > 0:
            raise ValueError(f"KNNMonitor: temperature must be > 0, got {temperature}")
        if target is not None and not 0 <= target < num_classes:
            raise ValueError(f"KNNMonitor: target {target} is not one of the {num_classes} classes")
        self.num_classes = num_classes
        self.k = k
        self.temperature = temperature
        self.target = target
        for name in ("bank", "clean", "triggered", "control"):
            self.add_state(f"{name}_features", default=[], dist_reduce_fx="cat")
            self.add_state(f"{name}_labels", default=[], dist_reduce_fx="cat")

    def update_bank(self, features: Tensor, labels: Tensor) -> None:
        self.update(features, labels, kind="bank")

    def update_query(
        self,
        features: Tensor,
        labels: Tensor,
        triggered_features: Tensor | None = None,
        control_features: Tensor | None = None,
    ) -> None:
        self.update(features, labels, kind="clean")
        for kind, other in (("triggered", triggered_features), ("control", control_features)):
            if other is None:
                continue
            if other.shape != features.shape:
                raise ValueError(
                    f"KNNMonitor: {kind}_features {tuple(other.shape)} must match the clean "
                    f"features {tuple(features.shape)} (the same images with the {kind} trigger)"
                )
            self.update(other, labels, kind=kind)

    def update(self, features: Tensor, labels: Tensor, kind: str = "clean") -> None:
        """Append a batch to one of the stores (``bank``, ``clean``, ``triggered``); prefer the named updates."""
        if kind not in ("bank", "clean", "triggered", "control"):
            raise ValueError(f"KNNMonitor: kind must be 'bank', 'clean', 'triggered' or 'control', got {kind!r}")
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"KNNMonitor.update ({kind}): features must be [N, D] and labels [N], got "
                f"{tuple(features.shape)} and {tuple(labels.shape)}"
            )
        # Reading a GPU tensor's value waits for the device at every batch: there the range is checked once, in
        # compute(); CPU labels are checked here, where the error points at the offending call.
        if labels.device.type == "cpu":
            self._check_label_range(labels, f"update ({kind})")
        # both stores in the metric's float dtype: that is the dtype torchmetrics gives the empty placeholder of a
        # rank that saw no data, and all ranks must gather the same dtype (labels < 2**24 stay exact)
        features = F.normalize(features.detach().float(), dim=1).to(self.dtype)
        getattr(self, f"{kind}_features").append(features.flatten())
        getattr(self, f"{kind}_labels").append(labels.detach().to(self.dtype))

    def _check_label_range(self, labels: Tensor, where: str) -> None:
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"KNNMonitor.{where}: labels must lie in [0, {self.num_classes})")

    def store(self, kind: str, feature_dim: int | None = None) -> tuple[Tensor, Tensor]:
        """The ``[n, D]`` features and ``[n]`` labels of a store (a list before sync, one tensor after).

        Inside ``sync_context()`` these are every rank's; the linear probe reads them that way.
        """
        flat, labels = getattr(self, f"{kind}_features"), getattr(self, f"{kind}_labels")
        if isinstance(labels, list) and not labels:
            return torch.zeros(0, feature_dim or 0, device=self.device), torch.zeros(0, dtype=torch.long)
        flat, labels = dim_zero_cat(flat), dim_zero_cat(labels)
        n = labels.numel()
        if n == 0:
            return flat.view(0, feature_dim or 0), labels.long()
        if flat.numel() % n or (feature_dim is not None and flat.numel() != n * feature_dim):
            raise ValueError(f"KNNMonitor: {kind} features do not have one common dimension across batches/ranks")
        return flat.view(n, flat.numel() // n), labels.long()

    def compute(self) -> dict[str, Tensor]:
        bank, bank_labels = self.store("bank")
        if bank_labels.numel() == 0:
            raise ValueError("KNNMonitor: the feature bank is empty; call update_bank() with training features first")
        dim = bank.shape[1]
        clean, clean_labels = self.store("clean", dim)
        if clean_labels.numel() == 0:
            raise ValueError("KNNMonitor: no query features; call update_query() with validation features first")
        triggered, triggered_labels = self.store("triggered", dim)
        control, control_labels = self.store("control", dim)
        for kind, labels in (("bank", bank_labels), ("clean", clean_labels), ("triggered", triggered_labels)):
            self._check_label_range(labels, f"compute ({kind} labels)")

        def predict(queries: Tensor) -> Tensor:
            scores = weighted_knn_scores(queries, bank, bank_labels, self.num_classes, self.k, self.temperature)
            return scores.argmax(dim=1)

        clean_pred = predict(clean)
        acc = (clean_pred == clean_labels).float().mean()
        asr, n_triggered, backdoor = torch.tensor(math.nan), torch.tensor(0), None
        if self.target is not None and triggered_labels.numel():
            counted = triggered_labels != self.target
            n_triggered = counted.sum()
            triggered_pred = predict(triggered)
            if n_triggered:
                asr = (triggered_pred[counted] == self.target).float().mean()
                # the same images in the same order in every store (one update_query call fills all three)
                same = triggered_labels.numel() == clean_labels.numel()
                control_pred = predict(control) if control_labels.numel() == clean_labels.numel() else None
                if same:
                    backdoor = backdoor_metrics(
                        clean_labels, clean_pred, triggered_pred, control_pred, self.target, self.num_classes
                    )
        return {
            "acc": acc,
            "asr": asr,
            "n_clean": torch.tensor(clean_labels.numel()),
            "n_triggered": n_triggered,
            "backdoor": backdoor,
        }
