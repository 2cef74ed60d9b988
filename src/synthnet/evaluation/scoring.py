"""Batched scoring of many weight sets of one target at once.

``torch.func.functional_call`` under ``vmap`` runs R networks that share an architecture
as one batched computation. The zoo's per-checkpoint metrics, GRPO's reward and the
evaluation report all call these functions, so a number means the same everywhere.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap


def stack_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """[{name: (*shape)}] * R -> {name: (R, *shape)}."""
    return {name: torch.stack([sd[name] for sd in state_dicts]) for name in state_dicts[0]}


def unstack_state_dict(stacked: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """{name: (R, *shape)} -> [{name: (*shape)}] * R."""
    count = next(iter(stacked.values())).shape[0]
    return [{name: tensor[i] for name, tensor in stacked.items()} for i in range(count)]


def batched_forward(model: nn.Module, stacked: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                    shared_inputs: bool = True) -> torch.Tensor:
    """Logits of R networks: inputs (N, *input) shared, or (R, N, *input) -> (R, N, classes)."""
    def single(params, x):
        return functional_call(model, params, (x,))
    return vmap(single, in_dims=(0, None if shared_inputs else 0))(dict(stacked), inputs)


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, stacked: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                      labels: torch.Tensor, chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-network accuracy and mean cross-entropy on (inputs, labels): two tensors of shape (R,)."""
    correct, loss_sum = None, None
    for start in range(0, len(labels), chunk_size):
        x, y = inputs[start:start + chunk_size], labels[start:start + chunk_size]
        logits = batched_forward(model, stacked, x)  # (R, n, classes)
        batch_correct = (logits.argmax(-1) == y).sum(-1).double()
        batch_loss = F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], -1),
                                     reduction="none").sum(-1).double()
        correct = batch_correct if correct is None else correct + batch_correct
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
    return (correct / len(labels)).float(), (loss_sum / len(labels)).float()


@torch.no_grad()
def predictions(model: nn.Module, stacked: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                chunk_size: int = 2048) -> torch.Tensor:
    """Predicted classes of R networks: (R, N) int64."""
    parts = [batched_forward(model, stacked, inputs[s:s + chunk_size]).argmax(-1)
             for s in range(0, len(inputs), chunk_size)]
    return torch.cat(parts, dim=1)
