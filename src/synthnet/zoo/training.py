"""Training R runs of one target at once with ordinary optimisers.

The R networks' parameters are stacked along a leading dimension and run through
``torch.func.functional_call`` under ``vmap``; each run gets its own init (its seed) and
its own data order (a generator seeded from its seed). Adam, AdamW and SGD act
element-wise, so one optimiser over the stacked tensors performs exactly the R separate
updates; the summed loss has, for each run, the gradient of that run's own loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from synthnet.errors import SynthNetError
from synthnet.evaluation.scoring import accuracy_and_loss, batched_forward, unstack_state_dict
from synthnet.options import check_options, option
from synthnet.tasks import Task

DATA_ORDER_SALT = 0x5EED


@dataclass(frozen=True)
class Recipe:
    """How a zoo run is trained. ``checkpoint_every`` counts optimiser steps; None means every epoch."""

    epochs: int = option(10, "passes over the training split", low=1, high=10_000)
    batch_size: int = option(32, "examples per optimiser step", low=1)
    optimizer: str = option("adam", "adam | adamw | sgd", choices=("adam", "adamw", "sgd"))
    lr: float = option(1e-2, "learning rate", low=0, high=100, low_open=True)
    momentum: float = option(0.9, "sgd only", low=0, high=1, high_open=True)
    weight_decay: float = option(0.0, "weight decay", low=0, high=1)
    checkpoint_every: int | None = option(None, "optimiser steps between checkpoints; null = every epoch", low=1)

    def __post_init__(self):
        check_options(self, "zoo.")


@dataclass
class Checkpoint:
    """What the trainer hands to its callback for one run at one step."""

    seed: int
    step: int
    epoch: float
    state_dict: dict[str, torch.Tensor]
    train_loss: float
    val_loss: float
    val_accuracy: float
    test_loss: float
    test_accuracy: float
    train_seconds: float = 0.0  # wall clock of training alone since the inits were handed over (no scoring, no callbacks)


def make_optimizer(params: Sequence[torch.Tensor], recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def steps_per_epoch(task: Task, recipe: Recipe) -> int:
    return math.ceil(len(task.y_train) / recipe.batch_size)


def train_runs(model: nn.Module, inits: Sequence[Mapping[str, torch.Tensor]], seeds: Sequence[int],
               task: Task, recipe: Recipe, on_checkpoint: Callable[[Checkpoint], None],
               on_epoch: Callable[[int], None] | None = None) -> None:
    """Train one run per (init, seed) from step 0 and call ``on_checkpoint`` at step 0 and at
    every checkpoint. ``model`` is only the architecture template for ``functional_call``.

    Each checkpoint carries ``train_seconds``: wall time since this call started (the inits in
    hand), minus the time spent scoring checkpoints and in the callbacks."""
    start = time.perf_counter()
    bookkeeping = 0.0  # seconds spent scoring and in callbacks: not training
    device = next(model.parameters()).device
    runs = len(seeds)
    params = {name: torch.stack([sd[name] for sd in inits]).to(device).requires_grad_(True) for name in inits[0]}
    optimizer = make_optimizer(list(params.values()), recipe)
    generators = [torch.Generator().manual_seed(int(seed) * 7919 + DATA_ORDER_SALT) for seed in seeds]
    x_train, y_train = task.x_train.to(device), task.y_train.to(device)
    x_val, y_val = task.x_val.to(device), task.y_val.to(device)
    x_test, y_test = task.x_test.to(device), task.y_test.to(device)
    n_train, per_epoch = len(y_train), steps_per_epoch(task, recipe)

    def emit(step: int, train_losses: torch.Tensor | None) -> None:
        nonlocal bookkeeping
        entered = time.perf_counter()
        trained = entered - start - bookkeeping if step > 0 else 0.0  # set-up counts toward the first steps
        detached = {k: v.detach() for k, v in params.items()}
        if train_losses is None:  # step 0: the init's own training loss
            train_losses = accuracy_and_loss(model, detached, x_train, y_train)[1]
        val_acc, val_loss = accuracy_and_loss(model, detached, x_val, y_val)
        test_acc, test_loss = accuracy_and_loss(model, detached, x_test, y_test)
        for i, state in enumerate(unstack_state_dict(detached)):
            on_checkpoint(Checkpoint(int(seeds[i]), step, step / per_epoch, {k: v.clone().cpu() for k, v in state.items()},
                                     float(train_losses[i]), float(val_loss[i]), float(val_acc[i]),
                                     float(test_loss[i]), float(test_acc[i]), trained))
        bookkeeping += time.perf_counter() - entered

    emit(0, None)
    step, last_saved = 0, 0
    running, running_count = torch.zeros(runs, device=device), 0
    for epoch in range(1, int(recipe.epochs) + 1):
        order = torch.stack([torch.randperm(n_train, generator=g) for g in generators]).to(device)  # (runs, n_train)
        for batch in range(per_epoch):
            index = order[:, batch * recipe.batch_size:(batch + 1) * recipe.batch_size]  # (runs, b)
            logits = batched_forward(model, params, x_train[index], shared_inputs=False)  # (runs, b, classes)
            losses = F.cross_entropy(logits.transpose(1, 2), y_train[index], reduction="none").mean(-1)  # (runs,)
            if not torch.isfinite(losses).all():
                raise SynthNetError(f"zoo training diverged (non-finite loss) at step {step + 1}; lower zoo.lr")
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            step += 1
            running += losses.detach()
            running_count += 1
            if recipe.checkpoint_every and step % int(recipe.checkpoint_every) == 0:
                emit(step, running / running_count)
                last_saved, running, running_count = step, torch.zeros_like(running), 0
        if not recipe.checkpoint_every:
            emit(step, running / running_count)
            last_saved, running, running_count = step, torch.zeros_like(running), 0
        if on_epoch is not None:
            on_epoch(epoch)
    if last_saved != step:
        emit(step, running / max(running_count, 1))
