"""Task-loss training: back-propagate the generated networks' own cross-entropy into the generator.

Imitation teaches the generator where SGD goes; it cannot reach SGD accuracy by itself, because
a small error spread over thousands of weights costs a lot of accuracy. Here the generator is
trained on what it is for. One step (:func:`task_step`):

1. draw fresh random inits with the target's own initialiser (``make_inits(step)``: seeds
   disjoint from the zoo, generation, evaluation and GRPO);
2. unroll the shared sampler (:func:`synthnet.sampling.sample`, deterministic) *with*
   gradients for ``generation_steps`` steps and detokenize every step's state;
3. run all generated networks on one minibatch of the **training** split at once
   (``torch.func.functional_call`` under ``vmap``) and take their mean cross-entropy, at
   the final step or at every step with ``step_weights``;
4. add the anchor: the per-layer-normalised squared distance between each step's output and
   the frozen imitation generator's output from the same init (``anchor_weight``). Without
   it the task loss alone collapses into one network for every init (outputs stop depending
   on the init); with it, outputs stay tied to their inits;
5. add the generator's auxiliary (Mixture-of-Experts) loss, averaged over every forward of
   the unrolled sampler (not only the last).

Selection happens on the **validation** split only: every ``eval_every`` steps
``validate(ema_model)`` scores networks generated from held-out inits; the best EMA weights
are kept and training stops after ``patience`` evaluations without improvement. The test
split is never read here.

Nothing here reads config or builds models; :mod:`synthnet.commands.train_task` does that.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from synthnet import distributed
from synthnet.errors import SynthNetError
from synthnet.evaluation.scoring import batched_forward
from synthnet.methods.imitation import EMA, layer_mse, layer_value_weights, lr_factor
from synthnet.options import check_options, option
from synthnet.sampling import sample
from synthnet.tokenization import TokenLayout, detokenize

log = logging.getLogger("synthnet")


@dataclass(frozen=True)
class TaskSettings:
    """Typed settings of :func:`train_task` (the command fills them from ``method.*``)."""

    steps: int = option(1500, "optimiser steps (an upper bound: early stopping may end sooner)", low=1)
    inits_per_step: int = option(8, "fresh random inits unrolled per step", low=1)
    batch_size: int = option(256, "training-split examples per step, shared by all generated networks", low=1)
    generation_steps: int = option(4, "sampler steps unrolled with gradients", low=1)
    step_weights: tuple[float, ...] | None = option(
        None, "loss weight per generation step, e.g. [0.1, 0.1, 0.3, 1]; null = last step only", low=0, each=True)
    anchor_weight: float = option(0.1, "weight of |f(W) - f_imitation(W)|^2 (per-layer-normalised, every "
                                       "step); 0 = off", low=0)
    auxiliary_weight: float = option(1.0, "multiplies the generator's own (already weighted) MoE auxiliary loss",
                                     low=0)
    lr: float = option(2e-3, "AdamW peak learning rate (bench/generator_capacity.py: 3e-4 crawls)", low=0, high=10,
                       low_open=True)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0, high=1)
    warmup_steps: int = option(50, "linear warm-up steps, then cosine decay", low=0)
    min_lr_ratio: float = option(0.1, "final lr = min_lr_ratio * lr", low=0, high=1)
    grad_clip: float = option(1.0, "max global gradient norm (0 = no clipping)", low=0)
    ema_decay: float = option(0.99, "EMA of the weights; the best EMA (by validation accuracy) is what is saved",
                              low=0, high=1, high_open=True)
    log_every: int = option(50, "log line every N steps", low=1)
    eval_every: int = option(100, "validation (networks from held-out inits, on the val split) every N steps",
                             low=1)
    save_every: int = option(100, "resumable state every N steps", low=1)
    patience: int = option(5, "evaluations without a better validation accuracy before stopping (0 = never)",
                           low=0)
    min_improvement: float = option(0.0005, "how much a validation accuracy must beat the best to count", low=0)
    seed: int = option(0, "seed of the training inits' order and batches", low=0)

    def __post_init__(self):
        check_options(self, "method.")
        if self.step_weights is not None:
            if len(self.step_weights) != self.generation_steps:
                raise SynthNetError(f"method.step_weights needs one weight per generation step "
                                    f"({self.generation_steps}), got {list(self.step_weights)}")
            if any(w < 0 for w in self.step_weights) or not any(w > 0 for w in self.step_weights):
                raise SynthNetError(f"method.step_weights must be >= 0 with one positive, got {list(self.step_weights)}")

    @property
    def weights(self) -> list[float]:
        """Normalised loss weight per generation step (they sum to 1)."""
        raw = list(self.step_weights) if self.step_weights is not None else [0.0] * (self.generation_steps - 1) + [1.0]
        total = sum(raw)
        return [w / total for w in raw]


def unroll(model: nn.Module, init_tokens: torch.Tensor, layout: TokenLayout, steps: int
           ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Deterministic sample with gradients: (states after steps 1..K, each (B, N, C); mean auxiliary loss).

    The auxiliary (MoE) loss of every forward is collected, so it covers the whole unroll."""
    auxiliary: list[torch.Tensor] = []

    def denoiser(x, t_source, t_target, layout_):
        out = model(x, t_source, t_target, layout_)
        if hasattr(model, "auxiliary_loss"):
            auxiliary.append(model.auxiliary_loss())
        return out

    result = sample(denoiser, init_tokens, layout, steps)
    aux = torch.stack(auxiliary).mean() if auxiliary else init_tokens.new_zeros(())
    return result.trajectory[1:], aux


def network_loss(target: nn.Module, tokens: torch.Tensor, layout: TokenLayout, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (scalar, differentiable) and per-network accuracy (R,) of the networks
    in ``tokens`` (R, N, C) on ``inputs`` (n, *input) with ``labels`` (n,)."""
    logits = batched_forward(target, detokenize(tokens, layout), inputs)  # (R, n, classes)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]))
    accuracy = (logits.detach().argmax(-1) == labels).float().mean(-1)
    return loss, accuracy


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, differentiable
    task_loss: float  # weighted cross-entropy of the generated networks
    final_loss: float  # cross-entropy of the last step's networks
    train_accuracy: float  # accuracy of the last step's networks on the minibatch
    anchor: float
    auxiliary: float


def task_step(model: nn.Module, reference: nn.Module | None, init_tokens: torch.Tensor, layout: TokenLayout,
              target: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, settings: TaskSettings,
              value_weights: torch.Tensor) -> StepResult:
    """The loss of one step on inits (B, N, C) and a training minibatch (see the module docstring)."""
    states, aux = unroll(model, init_tokens, layout, settings.generation_steps)
    weights = settings.weights
    task_loss = init_tokens.new_zeros(())
    final_loss, accuracy = None, None
    for k, (state, weight) in enumerate(zip(states, weights)):
        if weight == 0 and k < len(states) - 1:
            continue
        loss_k, accuracy_k = network_loss(target, state, layout, inputs, labels)
        task_loss = task_loss + weight * loss_k
        final_loss, accuracy = loss_k, accuracy_k
    anchor = init_tokens.new_zeros(())
    if reference is not None and settings.anchor_weight > 0:
        with torch.no_grad():
            reference_states = sample(reference, init_tokens, layout, settings.generation_steps).trajectory[1:]
        anchor = sum(layer_mse(s, r, value_weights) for s, r in zip(states, reference_states)) / len(states)
    loss = task_loss + settings.anchor_weight * anchor + settings.auxiliary_weight * aux
    return StepResult(loss, float(task_loss.detach()), float(final_loss.detach()), float(accuracy.mean()),
                      float(anchor.detach()), float(aux.detach()))


@dataclass
class TaskState:
    """What :func:`train_task` hands to its save callback and takes back to resume."""

    step: int
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    best: dict[str, torch.Tensor] | None  # the best EMA weights so far (by validation accuracy)
    best_score: float = float("-inf")
    best_step: int = 0
    evaluations_since_best: int = 0
    stopped_early: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def best_model_state(self) -> dict[str, torch.Tensor]:
        return self.best if self.best is not None else self.ema.model.state_dict()


def train_task(state: TaskState, reference: nn.Module | None, settings: TaskSettings, *, layout: TokenLayout,
               target: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
               make_inits: Callable[[int], torch.Tensor], validate: Callable[[nn.Module], dict[str, float]],
               score_key: str = "val_accuracy", on_metrics: Callable[[int, dict[str, Any]], None] | None = None,
               on_save: Callable[[TaskState], None] | None = None, progress: bool = False) -> TaskState:
    """Train ``state.model`` from ``state.step`` until ``settings.steps`` or early stopping.

    ``make_inits(step)`` returns that step's fresh init tokens (B, N, C) on the model's device, or, to train
    over a family of architectures, ``(tokens, layout, target)`` of the architecture drawn for that step;
    ``validate(ema_model)`` returns validation metrics including ``score_key`` (higher is
    better), from held-out inits on the validation split. Minibatches are drawn from a
    generator reseeded from ``(settings.seed, step)``, so a resumed run is the same run. Under
    torchrun every rank makes the step's inits and minibatch, trains on its share of the inits
    and the gradients are averaged (:mod:`synthnet.distributed`); rank 0 validates and its score,
    broadcast, drives early stopping on every rank.
    ``on_save`` is called every ``save_every`` steps and once at the end (with the state whose
    ``best`` holds the selected weights). Returns the final state.
    """
    model, optimizer, ema = state.model, state.optimizer, state.ema
    device = next(model.parameters()).device
    layout = layout.to(device)
    value_weights = layer_value_weights(layout).to(device)
    base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["initial_lr"] = lr
    if reference is not None:
        reference.eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    x_train, y_train = x_train.to(device), y_train.to(device)
    batch = min(settings.batch_size, len(y_train))
    distributed.check_divisible(settings.inits_per_step, "method.inits_per_step")
    main = distributed.is_main_process()
    rng = torch.Generator()
    window = {"start": time.perf_counter(), "steps": 0, "loss": 0.0, "task": 0.0, "final": 0.0, "acc": 0.0,
              "anchor": 0.0, "aux": 0.0}
    bar = tqdm(total=settings.steps, initial=state.step, desc="task", disable=not (progress and main), leave=False)
    while state.step < settings.steps and not state.stopped_early:
        step = state.step
        model.train()
        rng.manual_seed(settings.seed * 1_000_003 + step)
        factor = lr_factor(step, settings.steps, settings.warmup_steps, settings.min_lr_ratio)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * factor
        index = torch.randperm(len(y_train), generator=rng)[:batch].to(device)
        drawn = make_inits(step)
        if isinstance(drawn, tuple):  # a family of architectures: this step's own
            inits, step_layout, step_target = drawn
            step_layout = step_layout.to(device)
            step_weights = layer_value_weights(step_layout).to(device)
        else:
            inits, step_layout, step_target, step_weights = drawn, layout, target, value_weights
        result = task_step(model, reference, distributed.shard(inits), step_layout, step_target, x_train[index],
                           y_train[index], settings, step_weights)
        if not torch.isfinite(result.loss):
            raise SynthNetError(f"task loss is not finite at step {step + 1}; lower method.lr")
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        distributed.average_gradients(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        ema.update(model)
        state.step = done = step + 1
        for key, value in (("loss", float(result.loss.detach())), ("task", result.task_loss),
                           ("final", result.final_loss), ("acc", result.train_accuracy),
                           ("anchor", result.anchor), ("aux", result.auxiliary)):
            window[key] += value
        window["steps"] += 1
        bar.update(1)
        if done % settings.log_every == 0 or done == settings.steps:
            n, elapsed = window["steps"], time.perf_counter() - window["start"]
            window.update({k: distributed.mean(window[k], device) for k in ("loss", "task", "final", "acc", "anchor",
                                                                              "aux")})  # the global batch's
            metrics = {"step": done, "loss": window["loss"] / n, "task_loss": window["task"] / n,
                       "train_loss": window["final"] / n, "train_accuracy": window["acc"] / n,
                       "anchor": window["anchor"] / n, "auxiliary": window["aux"] / n,
                       "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                       "steps_per_s": n / max(elapsed, 1e-9)}
            log.info("step %d  loss %.4f  train loss %.4f  train acc %.3f  anchor %.4f  %.2f steps/s", done,
                     metrics["loss"], metrics["train_loss"], metrics["train_accuracy"], metrics["anchor"],
                     metrics["steps_per_s"])
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}")
            state.metrics = {**state.metrics, **metrics}
            window = {key: 0.0 for key in window}
            window["start"] = time.perf_counter()
            if on_metrics is not None:
                on_metrics(done, metrics)
        if done % settings.eval_every == 0 or done == settings.steps:
            evaluation = validate(ema.model) if main else {score_key: 0.0}
            if score_key not in evaluation:
                raise SynthNetError(f"validation returned no '{score_key}'")
            score = distributed.broadcast_float(float(evaluation[score_key]), device)
            improved = score > state.best_score + settings.min_improvement or state.best is None
            if improved:
                state.best = copy.deepcopy(ema.model.state_dict())
                state.best_score, state.best_step, state.evaluations_since_best = score, done, 0
            else:
                state.evaluations_since_best += 1
            evaluation = {**evaluation, "best_" + score_key: state.best_score, "best_step": state.best_step}
            log.info("step %d  %s%s", done, "  ".join(f"{k} {v:.4f}" for k, v in evaluation.items()
                                                     if isinstance(v, float)),
                     "  (best)" if improved else "")
            state.metrics = {**state.metrics, **evaluation}
            if on_metrics is not None:
                on_metrics(done, {"step": done, **evaluation})
            if settings.patience and state.evaluations_since_best >= settings.patience:
                state.stopped_early = True
                log.info("early stop at step %d: no better %s for %d evaluations (best %.4f at step %d)", done,
                         score_key, settings.patience, state.best_score, state.best_step)
        finished = state.step >= settings.steps or state.stopped_early
        if on_save is not None and (done % settings.save_every == 0 or finished):
            on_save(state)
    bar.close()
    return state


@torch.no_grad()
def validation_metrics(model: nn.Module, init_tokens: torch.Tensor, layout: TokenLayout, steps: int,
                       target: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Networks generated (deterministically) from held-out inits (R, N, C), scored on a held-out split.

    ``val_accuracy`` / ``val_loss``: means over the R networks; ``val_disagreement``: mean
    pairwise share of examples on which two networks predict differently (diversity);
    ``init_cosine``: mean cosine of each output to its own init; ``output_spread``: mean
    pairwise (unaligned) distance of the outputs over that of the inits (0 = one network for
    every init, the collapse the anchor prevents)."""
    if isinstance(model, nn.Module):
        model.eval()
    final = sample(model, init_tokens, layout, steps).final
    logits = batched_forward(target, detokenize(final, layout), inputs)  # (R, n, classes)
    accuracy = (logits.argmax(-1) == labels).float().mean(-1)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]))
    predicted = logits.argmax(-1)
    count = predicted.shape[0]
    disagreement = (predicted[:, None] != predicted[None]).float().mean(-1)
    off = ~torch.eye(count, dtype=torch.bool, device=predicted.device)
    flat_out, flat_init = final.flatten(1), init_tokens.flatten(1)
    spread_out = torch.cdist(flat_out, flat_out)[off].mean()
    spread_init = torch.cdist(flat_init, flat_init)[off].mean()
    return {"val_accuracy": float(accuracy.mean()), "val_loss": float(loss),
            "val_disagreement": float(disagreement[off].mean()) if count > 1 else float("nan"),
            "init_cosine": float(F.cosine_similarity(flat_out, flat_init, dim=1).mean()),
            "output_spread": float(spread_out / spread_init) if count > 1 else float("nan")}


def step_seeds(first_seed: int, step: int, count: int) -> Sequence[int]:
    """Init seeds of training step ``step``: never reused across steps."""
    return range(first_seed + step * count, first_seed + (step + 1) * count)
