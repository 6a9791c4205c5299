"""UBT's stage 1, detection: overfit a copy of the poisoned model on its suspect pairs, score every pair, flag the
most suspicious, and score that detection against the true poisons (AUROC, precision and recall).

Pure functions of tensors and per-key dicts; ``defenses.ubt.UBT`` runs them on its training stream. The true poisons
(the run's manifest or the stream's flags) are read only to score the detection, never to flag.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc

UBT_DETECTION = "ubt_detection.json"
SCORES = ("weak_similarity", "gain", "similarity")


def pair_similarity(model: nn.Module, images: Tensor, tokens: Tensor) -> Tensor:
    """Cosine similarity of each image with its own caption (rows of a batch)."""
    return (model.encode_image(images, normalize=True) * model.encode_text(tokens, normalize=True)).sum(-1)


def detection_score(name: str, overfitted: float, poisoned: float) -> float:
    """A pair's suspicion (higher = more suspicious) from its image-text cosine under the overfitted copy and under
    the poisoned model: ``weak_similarity`` = minus the poisoned model's cosine (the pairs it fits worst), ``gain`` =
    the rise during overfitting, ``similarity`` = the overfitted copy's cosine."""
    if name == "weak_similarity":
        return -poisoned
    if name == "gain":
        return overfitted - poisoned
    return overfitted


def pairwise_clip_loss(image_features: Tensor, text_features: Tensor, scale: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy over this rank's rows (normalised features)."""
    logits = scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def detection_summary(
    scores: dict[str, float],
    flagged: list[str],
    selected: list[str],
    truth: set[str],
    truth_source: str,
) -> dict[str, Any]:
    """Precision / recall of the flagged set (and of the unlearnt subset) against the true poisons, and AUROC."""
    true_scored = truth & set(scores)
    hits = sum(1 for key in flagged if key in truth)
    selected_hits = sum(1 for key in selected if key in truth)
    return {
        "truth_source": truth_source,
        "scored": len(scores),
        "true_poisons": len(true_scored),
        "flagged": len(flagged),
        "true_positives": hits,
        "false_positives": len(flagged) - hits,
        "false_negatives": len(true_scored) - hits,
        "precision": hits / len(flagged) if flagged else None,
        "recall": hits / len(true_scored) if true_scored else None,
        "auroc": score_auroc(scores, truth),
        "selected": len(selected),
        "selected_true_poisons": selected_hits,
        "selected_precision": selected_hits / len(selected) if selected else None,
    }


def ranking_summary(scores: dict[str, float], count: int, truth: set[str]) -> dict[str, Any]:
    """AUROC of a score, and precision / recall of its top ``count`` pairs (ties by key), against the true poisons."""
    top = sorted(scores, key=lambda k: (-scores[k], k))[:count]
    hits = sum(1 for key in top if key in truth)
    true_scored = len(truth & set(scores))
    return {
        "auroc": score_auroc(scores, truth),
        "precision": hits / len(top) if top else None,
        "recall": hits / true_scored if true_scored else None,
        "true_positives": hits,
    }


def split_by_score(
    scores: dict[str, float], n_flag: int, suspect_fraction: float
) -> tuple[list[str], list[str], frozenset[str]]:
    """(ranked keys, most suspicious first; the flagged top ``n_flag``; the retain set).

    The suspects are the top ``max(n_flag, ceil(suspect_fraction * N))`` pairs; the retain set is every pair ranked
    below them, so no flagged pair, and no pair scored nearly as high, is trained on by the retain term.
    """
    ranked = sorted(scores, key=lambda k: (-scores[k], k))
    flagged = ranked[: min(n_flag, len(ranked))]
    n_suspect = max(len(flagged), math.ceil(suspect_fraction * len(ranked)))
    return ranked, flagged, frozenset(ranked[n_suspect:])


def weakest_keys(similarity: dict[str, float], fraction: float) -> frozenset[str]:
    """The ``ceil(fraction * N)`` pairs of lowest similarity (ties by key): where stage 1 overfits first."""
    ranked = sorted(similarity, key=lambda k: (similarity[k], k))
    return frozenset(ranked[: math.ceil(fraction * len(ranked))])


def score_auroc(scores: dict[str, float], truth: set[str]) -> float | None:
    """Area under the ROC curve of a score (higher = more suspicious) against the true poisons (None: one class)."""
    keys = sorted(scores)
    positives = sum(1 for k in keys if k in truth)
    if positives in (0, len(keys)):
        return None
    preds = torch.tensor([scores[k] for k in keys], dtype=torch.float64)
    target = torch.tensor([k in truth for k in keys], dtype=torch.long)
    return float(binary_auroc(preds, target))


def overfit_batches(loader, weak: frozenset[str] | None, weak_steps: int, steps: int, batch_size: int):
    """Stage 1's schedule: ``weak_steps`` batches of weak pairs first, then ``steps - weak_steps`` of all pairs; yields
    (keys, images, tokens)."""
    yield from _batches(loader, weak_steps if weak is not None else 0, weak, batch_size)
    yield from _batches(loader, steps - (weak_steps if weak is not None else 0), None, batch_size)


def _batches(loader, steps: int, keys: frozenset[str] | None, batch_size: int):
    """``steps`` (keys, images, tokens) batches from passes over ``loader``: its whole batches, or (with ``keys``)
    batches of ``batch_size`` pairs gathered from the rows whose key is in ``keys`` (a pass's last, smaller rest
    included, so a batch never holds a pair twice)."""
    done = 0
    while done < steps:
        yielded = 0
        names: list[str] = []
        images: list[Tensor] = []
        tokens: list[Tensor] = []
        for batch in loader:
            if keys is None:
                names, images, tokens = list(batch["key"]), [batch["image"]], [batch["text"]]
            else:
                rows = [i for i, key in enumerate(batch["key"]) if key in keys]
                names += [batch["key"][i] for i in rows]
                images.append(batch["image"][rows])
                tokens.append(batch["text"][rows])
            while len(names) >= (1 if keys is None else batch_size):
                limit = len(names) if keys is None else batch_size
                all_images, all_tokens = torch.cat(images), torch.cat(tokens)
                yield names[:limit], all_images[:limit], all_tokens[:limit]
                names, images, tokens = names[limit:], [all_images[limit:]], [all_tokens[limit:]]
                done, yielded = done + 1, yielded + 1
                if done >= steps:
                    return
        if keys is not None and len(names) >= 2:  # the pass's rest
            yield names, torch.cat(images), torch.cat(tokens)
            done, yielded = done + 1, yielded + 1
        if not yielded:
            what = "pairs" if keys is None else "weak-similarity pairs (2 or more per rank)"
            raise ValueError(f"data.train_shards: the training stream gave no {what} to overfit on")


def average_gradients(module: nn.Module) -> None:
    """Average the overfitting copy's gradients over ranks (it is not wrapped in DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


def merge_over_ranks(*per_key: dict) -> tuple[dict, ...]:
    """Every rank's per-key dicts (scores, flags, candidate tensors), merged, on every rank (object all-gather)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, per_key)
    merged = tuple({} for _ in per_key)
    for part in gathered:
        for target, source in zip(merged, part):
            target.update(source)
    return merged


def overfit_copy(model: nn.Module, batches, lr: float, max_logit_scale: float, device: torch.device) -> nn.Module:
    """A copy of ``model`` trained on ``batches`` ((keys, images, tokens), e.g. ``overfit_batches``) with the CLIP loss
    and AdamW without decay, gradients averaged over ranks; returned frozen, in eval mode."""
    overfit = copy.deepcopy(model).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(overfit.parameters(), lr=lr, weight_decay=0.0)
    max_scale = math.log(max_logit_scale)
    for _, images, tokens in batches:
        loss = pairwise_clip_loss(
            overfit.encode_image(images.to(device), normalize=True),
            overfit.encode_text(tokens.to(device), normalize=True),
            overfit.logit_scale.exp(),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(overfit)
        optimizer.step()
        with torch.no_grad():
            overfit.logit_scale.clamp_(0, max_scale)
    return overfit.eval().requires_grad_(False)
