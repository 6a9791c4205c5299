"""UBT's stage 2, unlearning: the "token-based portion" of a CLIP model that may move, and the forget objectives.

The portion: the image tower's token parameters (class token, positional embedding), a ViT's patch embedding, and
the text token-table rows of the words that characterise the unlearnt captions (never the target's eval prompt
words). The forget objective is what pushes the unlearnt (flagged) pairs apart; see ``forget_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TOKEN_PARTS = ("text", "vision", "patch")  # token_portion joins any of them with "+", e.g. "text+vision"
FORGET_OBJECTIVES = ("ranking", "cosine")


def vision_token_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The image tower's token parameters: ViT class token + positional embedding (ResNet: the attention pool's)."""
    visual = model.visual
    if hasattr(visual, "class_embedding") and hasattr(visual, "positional_embedding"):
        return {
            "visual.class_embedding": visual.class_embedding,
            "visual.positional_embedding": visual.positional_embedding,
        }
    attnpool = getattr(visual, "attnpool", None)
    if attnpool is not None and hasattr(attnpool, "positional_embedding"):
        return {"visual.attnpool.positional_embedding": attnpool.positional_embedding}
    raise ValueError(
        f"model.token_portion: the image tower {type(visual).__name__} has no token parameters (class token / "
        "positional embedding); use token_portion: text"
    )


def patch_embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ViT's patch embedding: the layer that turns pixels into the image tokens (it reads a patch trigger)."""
    conv = getattr(model.visual, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model.visual, "class_embedding"):
        raise ValueError(
            f"model.token_portion: 'patch' needs a ViT image tower with a patch embedding (conv1), not "
            f"{type(model.visual).__name__}"
        )
    return {f"visual.conv1.{name}": param for name, param in conv.named_parameters()}


def text_token_table(model: nn.Module) -> tuple[str, nn.Parameter]:
    for name in ("token_embedding", "text.token_embedding"):
        module = model
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Embedding):
            return f"{name}.weight", module.weight
    raise ValueError("model.token_portion: this open_clip text tower has no token embedding table; use vision")


def caption_token_ids(tokens: Tensor) -> Tensor:
    """[N, vocab]-free view: the ids each caption uses, without padding (0), start (first) and end (argmax) tokens."""
    ids = tokens.clone()
    ids[:, 0] = 0
    ids.scatter_(1, tokens.argmax(dim=-1, keepdim=True), 0)  # open_clip: the end token has the largest id
    return ids


def document_frequency(tokens: Tensor, vocab: int) -> Tensor:
    """For each token id, how many captions use it (padding, start and end tokens left out)."""
    ids = caption_token_ids(tokens.cpu())
    present = torch.zeros(ids.shape[0], vocab, dtype=torch.bool)
    present.scatter_(1, ids, True)
    present[:, 0] = False
    return present.sum(0)


def characteristic_rows(
    forget_tokens: Tensor, df_all: Tensor, n_all: int, lift: float, excluded: Tensor | None = None
) -> Tensor:
    """Token ids in at least half of the unlearnt captions whose share there is at least ``lift`` times their share
    among all scored captions, ``excluded`` ids left out (the eval prompts' words)."""
    df_selected = document_frequency(forget_tokens, df_all.shape[0]).float()
    share_selected = df_selected / forget_tokens.shape[0]
    share_all = df_all.float() / max(n_all, 1)
    chosen = (share_selected >= 0.5) & (share_selected >= lift * share_all)
    if excluded is not None:
        chosen[excluded] = False
    return torch.nonzero(chosen).flatten()


def forget_loss(objective: str, image: Tensor, text: Tensor, negatives: Tensor) -> Tensor:
    """The unlearning term of the unlearnt pairs (minimised), from normalised features.

    Args:
        objective: ``ranking``: every other caption should score at least as high with an unlearnt image as its own
            caption does: ``mean over i, j of relu(<u_i, t_i> - <u_i, r_j>)`` over the ``negatives`` ``r_j`` (the
            batch's retain captions). A hinge on the caption's rank (the count of negatives above it), zero once the
            own caption ranks last among them, so the push is bounded; the zero-shot prediction is a ranking, and
            this acts on it. ``cosine`` (clbd's first objective): each pair's cosine, clamped at 0 and averaged; it
            is zero at cosine 0 whatever the other captions score, so it can leave the ranking as it was (the CPU
            test bed: cosine 0.04, ASR 94.7%).
        image: ``[k, d]`` the unlearnt images' features.
        text: ``[k, d]`` their captions' features.
        negatives: ``[m, d]`` the other captions (``ranking`` only; with ``m = 0`` the term is 0). Pass them
            detached: the term moves the unlearnt pairs, not the retain captions toward the triggered images.
    """
    own = (image * text).sum(-1)
    if objective == "cosine":
        return own.clamp_min(0).mean()
    if objective != "ranking":
        raise ValueError(f"model.forget_objective must be one of {', '.join(FORGET_OBJECTIVES)}, got {objective!r}")
    if negatives.shape[0] == 0:
        return own.sum() * 0  # nothing to rank against: no push (and a graph, for a uniform backward)
    return F.relu(own[:, None] - image @ negatives.T).mean()


def caption_rank(image: Tensor, text: Tensor, negatives: Tensor) -> Tensor:
    """``[k]`` the rank of each image's own caption among it and the ``negatives`` (0: it scores highest), from
    normalised features: how many other captions score above it."""
    own = (image * text).sum(-1, keepdim=True)
    return (image @ negatives.T > own).sum(dim=1)
