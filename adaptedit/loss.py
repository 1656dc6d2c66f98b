"""The training loss, shared by ``train`` (its loss and eval loss) and ``eval``.

    loss_sum(batch) = Σ over the batch's trained tokens of −log p(x_t | x_<t)     (float32 scalar)

A trained token is one whose label is not :data:`adaptedit.data.IGNORE` (-100); position p predicts
token p+1. :class:`TrainedPositions` hands the output head only the positions that predict a trained
token, so the (B, T, V) logits of masked positions are never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptedit.data import IGNORE
from adaptedit.errors import AdapteditError


class TrainedPositions:
    """Feed the output head only the positions that predict a trained token.

    A forward pre-hook on the model's output embedding replaces its (B, T, H) input with the
    (1, N, H) rows selected by ``self.select``; logits are then (1, N, V) instead of (B, T, V).
    """

    def __init__(self, model):
        head = model.get_output_embeddings()
        if head is None:
            raise AdapteditError(f"{type(model).__name__} has no output head; train needs a causal "
                                 "language model")
        self.select = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.select is None:
            return None
        h = args[0]
        return (h[self.select].unsqueeze(0),) + tuple(args[1:])  # (1, N, H)


def trained_tokens(batch: dict) -> int:
    """How many tokens of ``batch`` the loss counts."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_sum(model, positions: TrainedPositions, batch: dict, device) -> torch.Tensor:
    """Σ cross-entropy over the batch's trained tokens (float32 scalar)."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    target_mask = labels[:, 1:] != IGNORE  # (B, T-1): position p predicts token p+1
    positions.select = F.pad(target_mask, (0, 1))  # (B, T)
    targets = labels[:, 1:][target_mask]  # (N,)
    try:
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
    finally:
        positions.select = None
    if logits.shape[-2] != targets.numel():
        raise AdapteditError(f"{type(model).__name__}: unexpected logits shape {tuple(logits.shape)}"
                             "; this model's head is not supported by train")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum")
