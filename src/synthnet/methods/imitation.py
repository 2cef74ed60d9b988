"""Imitation training: learn ``W_t1 -> W_t2`` from ordered checkpoint pairs of the same zoo run.

Pure functions over built objects (a generator, an optimiser, :class:`ZooTokens`); nothing
here reads config or builds models. One training step:

1. sample pairs ``(run, t1 < t2)`` (any gap, optionally only neighbours or a bounded gap, with a
   share forced to start at the random init ``t1 = 0``);
2. permutation augmentation: the same random hidden-neuron permutation (the target's own
   :func:`synthnet.targets.permute_hidden`) is applied to both sides of each pair;
3. noise augmentation: Gaussian noise of a random scale up to ``noise_std`` on the input;
4. per-layer-normalised MSE between ``f(W_t1, t1, t2)`` and ``W_t2`` (every layer counts the
   same however many weights it has), plus the generator's auxiliary (MoE) loss;
5. optional consistency: ``f(f(W, t1, t2), t2, t3)`` is pulled towards ``f(W, t1, t3)``.

AdamW with linear warm-up and cosine decay, gradient clipping and an EMA copy of the
weights (the EMA is what gets saved and evaluated).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from synthnet import distributed
from synthnet.errors import SynthNetError
from synthnet.methods.data import ZooTokens
from synthnet.options import check_options, option
from synthnet.targets import LayerSpec, permute_hidden, random_permutations
from synthnet.tokenization import TokenLayout, detokenize, tokenize

log = logging.getLogger("synthnet")


@dataclass(frozen=True)
class ImitationSettings:
    """Typed settings of :func:`train_imitation` (the command fills them from ``method.*``)."""

    steps: int = option(1200, "optimiser steps", low=1)
    batch_size: int = option(64, "checkpoint pairs per step", low=1)
    lr: float = option(2e-3, "AdamW peak learning rate", low=0, high=10, low_open=True)
    weight_decay: float = option(0.01, "AdamW weight decay", low=0, high=1)
    warmup_steps: int = option(100, "linear warm-up steps, then cosine decay", low=0)
    min_lr_ratio: float = option(0.05, "final lr = min_lr_ratio * lr", low=0, high=1)
    grad_clip: float = option(1.0, "max global gradient norm (0 = no clipping)", low=0)
    ema_decay: float = option(0.995, "EMA of the weights; the EMA is what is saved and evaluated", low=0, high=1,
                              high_open=True)
    gap: str = option("any", "any: every t1 < t2 of a run | adjacent: neighbouring checkpoints only",
                      choices=("any", "adjacent"))
    max_gap: float | None = option(None, "largest t2 - t1 (fraction of training); null = no limit", low=0, high=1,
                                   low_open=True)
    from_init_fraction: float = option(0.5, "share of pairs that start at the random init (t1 = 0)", low=0, high=1)
    permute: bool = option(True, "same random hidden-neuron permutation on both sides of a pair")
    noise_std: float = option(0.2, "input noise augmentation: N(0, (u * noise_std)^2), u ~ U(0, 1)", low=0)
    consistency_weight: float = option(0.0, "weight of |f(f(W,t1,t2),t2,t3) - f(W,t1,t3)|^2 (0 = off)", low=0)
    consistency_batch_size: int = option(16, "triples per step for the consistency term", low=1)
    slice_tokens: int = option(1 << 16, "forward and backward the batch in slices of at most this many tokens, "
                                         "accumulating gradients (same update; large targets run faster in "
                                         "cache-sized pieces, see bench/cost.py)", low=1)
    log_every: int = option(100, "log line (step, loss, steps/s, expert usage) every N steps", low=1)
    eval_every: int = option(300, "validation loss and accuracy of networks generated from held-out inits "
                                  "every N steps", low=1)
    save_every: int = option(300, "write the resume state every N steps", low=1)
    seed: int = option(0, "seed of pair sampling, permutations and noise", low=0)

    def __post_init__(self):
        check_options(self, "method.")


# ---------------------------------------------------------------------------- data pieces


def sample_pairs(times: torch.Tensor, batch_size: int, generator: torch.Generator, *, gap: str = "any",
                 max_gap: float | None = None, from_init_fraction: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` ordered pairs: (run, i1, i2), each (batch,) int64, ``i1 < i2``.

    ``times`` (runs, checkpoints). ``gap='any'``: uniform over the allowed ordered pairs of a run
    (``t2 - t1 <= max_gap`` when set); ``'adjacent'``: ``i2 = i1 + 1``. A ``from_init_fraction``
    share of pairs starts at the init (``i1 = 0``, ``i2`` uniform among allowed).
    """
    runs, count = times.shape
    if count < 2:
        raise SynthNetError("the zoo needs at least two checkpoints per run to make pairs")
    t = times[0]
    allowed = t[None, :] > t[:, None]  # (i1, i2)
    if gap == "adjacent":
        allowed = allowed & (torch.arange(count)[None, :] == torch.arange(count)[:, None] + 1)
    elif max_gap is not None:
        allowed = allowed & (t[None, :] - t[:, None] <= float(max_gap) + 1e-9)
    pairs = allowed.nonzero()  # (P, 2)
    from_init = pairs[pairs[:, 0] == 0]
    run = torch.randint(runs, (batch_size,), generator=generator)
    choice = pairs[torch.randint(len(pairs), (batch_size,), generator=generator)]
    if from_init_fraction > 0 and len(from_init):
        forced = torch.rand(batch_size, generator=generator) < from_init_fraction
        init_choice = from_init[torch.randint(len(from_init), (batch_size,), generator=generator)]
        choice = torch.where(forced[:, None], init_choice, choice)
    return run, choice[:, 0], choice[:, 1]


def sample_triplets(times: torch.Tensor, batch_size: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(run, i1, i2, i3) with ``i1 < i2 < i3``, uniform over ordered triplets; each (batch,)."""
    runs, count = times.shape
    if count < 3:
        raise SynthNetError("consistency needs at least three checkpoints per run")
    triplets = torch.combinations(torch.arange(count), r=3)
    choice = triplets[torch.randint(len(triplets), (batch_size,), generator=generator)]
    return torch.randint(runs, (batch_size,), generator=generator), choice[:, 0], choice[:, 1], choice[:, 2]


def permutation_index(layout: TokenLayout, specs: Sequence[LayerSpec], perms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Flat gather index (tokens * chunk,) so that ``tokens.flatten(-2)[..., index]`` is the tokenisation
    of ``permute_hidden(state_dict, specs, perms)``. Padding positions map to themselves."""
    size = layout.num_tokens * layout.chunk_size
    positions = torch.arange(size, dtype=torch.float64).reshape(layout.num_tokens, layout.chunk_size)
    moved = tokenize(permute_hidden(detokenize(positions, layout), specs, perms), layout).reshape(-1)
    return torch.where(layout.mask.reshape(-1), moved.round().long(), torch.arange(size))


def random_permutation_index(layout: TokenLayout, specs: Sequence[LayerSpec], batch_size: int,
                             generator: torch.Generator) -> torch.Tensor:
    """(batch, tokens * chunk) gather indices of independent uniformly random hidden permutations."""
    shapes = layout.state_dict_shapes()
    reference = {name: torch.empty(shape) for name, shape in shapes.items()}
    return torch.stack([permutation_index(layout, specs, random_permutations(specs, reference, generator))
                        for _ in range(batch_size)])


def apply_index(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, C), index (B, N * C) -> permuted tokens (B, N, C)."""
    return tokens.flatten(1).gather(1, index.to(tokens.device)).reshape(tokens.shape)


def layer_value_weights(layout: TokenLayout) -> torch.Tensor:
    """(N, C) weights that average squared errors within each layer, then across layers."""
    weights = torch.zeros(layout.mask.shape)
    for layer in layout.layers:
        block = layout.mask[layer.first_token:layer.first_token + layer.num_tokens].float()
        weights[layer.first_token:layer.first_token + layer.num_tokens] = block / block.sum()
    return weights / len(layout.layers)


def layer_mse(prediction: torch.Tensor, target: torch.Tensor, value_weights: torch.Tensor) -> torch.Tensor:
    """Per-layer-normalised MSE, mean over the batch: (B, N, C) x2 -> scalar."""
    return (((prediction - target) ** 2) * value_weights.to(prediction.device)).sum(dim=(-2, -1)).mean()


# ---------------------------------------------------------------------------- training


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's parameters (and a copy of its buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for shadow, param in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(param.detach(), 1 - self.decay)
        for shadow, buffer in zip(self.model.buffers(), model.buffers()):
            shadow.copy_(buffer)


@dataclass
class Batch:
    source: torch.Tensor  # (B, N, C)
    target: torch.Tensor  # (B, N, C)
    t_source: torch.Tensor  # (B,)
    t_target: torch.Tensor  # (B,)


def make_batch(data: ZooTokens, settings: ImitationSettings, generator: torch.Generator,
               device: torch.device) -> Batch:
    run, i1, i2 = sample_pairs(data.times, settings.batch_size, generator, gap=settings.gap,
                               max_gap=settings.max_gap, from_init_fraction=settings.from_init_fraction)
    source, target = data.tokens[run, i1], data.tokens[run, i2]
    if settings.permute:
        index = random_permutation_index(data.layout, data.specs, settings.batch_size, generator)
        source, target = apply_index(source, index), apply_index(target, index)
    if settings.noise_std > 0:
        scale = torch.rand(settings.batch_size, 1, 1, generator=generator) * settings.noise_std
        source = (source + scale * torch.randn(source.shape, generator=generator)) * data.layout.mask
    return Batch(source.to(device), target.to(device), data.times[run, i1].to(device), data.times[run, i2].to(device))


def shard_batch(batch: Batch) -> Batch:
    """This rank's share of a global batch (the whole batch in one process)."""
    return Batch(*(distributed.shard(getattr(batch, f.name)) for f in dataclasses.fields(Batch)))


def imitation_loss(model: nn.Module, batch: Batch, layout: TokenLayout, value_weights: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss with the auxiliary term, the per-layer MSE alone), both scalars."""
    prediction = model(batch.source, batch.t_source, batch.t_target, layout)
    mse = layer_mse(prediction, batch.target, value_weights)
    return mse + model.auxiliary_loss(), mse


def backward_in_slices(model: nn.Module, batch: Batch, layout: TokenLayout, value_weights: torch.Tensor,
                       slice_tokens: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``imitation_loss(batch).backward()`` as gradient accumulation over batch slices of at most
    ``slice_tokens`` tokens; returns the detached (loss, mse) of the whole batch.

    Each slice's loss is weighted by its share of the batch, so the gradient is the whole batch's
    (the MoE balance statistics are per slice, as they are per rank under torchrun). One activation
    of a 1M-parameter target's batch of 8 is 34 MiB; in slices the step ran 2.3x faster
    (bench/cost.py)."""
    size, tokens = batch.source.shape[:2]
    per = max(1, slice_tokens // max(1, tokens))
    total_loss, total_mse = torch.zeros(()), torch.zeros(())
    for start in range(0, size, per):
        part = Batch(*(getattr(batch, f.name)[start:start + per] for f in dataclasses.fields(Batch)))
        share = part.source.shape[0] / size
        loss, mse = imitation_loss(model, part, layout, value_weights)
        if not torch.isfinite(loss):
            raise SynthNetError(f"imitation loss is not finite at step {step + 1}; lower method.lr")
        (loss * share).backward()
        total_loss += float(loss.detach()) * share
        total_mse += float(mse.detach()) * share
    return total_loss, total_mse


def consistency_loss(model: nn.Module, data: ZooTokens, batch_size: int, generator: torch.Generator,
                     layout: TokenLayout, value_weights: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``|| f(f(W, t1, t2), t2, t3) - sg(f(W, t1, t3)) ||`` (per-layer-normalised) on zoo triplets."""
    run, i1, i2, i3 = (distributed.shard(index) for index in sample_triplets(data.times, batch_size, generator))
    source = data.tokens[run, i1].to(device)
    t1, t2, t3 = (data.times[run, i].to(device) for i in (i1, i2, i3))
    first = model(source, t1, t2, layout)
    auxiliary = model.auxiliary_loss()
    two_steps = model(first, t2, t3, layout)
    auxiliary = (auxiliary + model.auxiliary_loss()) / 2  # of the two forwards with gradients, not the no_grad one
    with torch.no_grad():
        one_step = model(source, t1, t3, layout)
    return layer_mse(two_steps, one_step, value_weights) + auxiliary


@torch.no_grad()
def validation_loss(model: nn.Module, data: ZooTokens, layout: TokenLayout, value_weights: torch.Tensor,
                    device: torch.device, batch_size: int = 128) -> dict[str, float]:
    """Per-layer MSE on every ordered pair of the held-out runs, overall and from the init to the end."""
    model.eval()
    runs, count = data.times.shape
    pairs = torch.combinations(torch.arange(count), r=2)
    run = torch.arange(runs).repeat_interleave(len(pairs))
    i1, i2 = pairs[:, 0].repeat(runs), pairs[:, 1].repeat(runs)
    losses = []
    for s in range(0, len(run), batch_size):
        r, a, b = run[s:s + batch_size], i1[s:s + batch_size], i2[s:s + batch_size]
        prediction = model(data.tokens[r, a].to(device), data.times[r, a].to(device), data.times[r, b].to(device),
                           layout)
        target = data.tokens[r, b].to(device)
        losses.append((((prediction - target) ** 2) * value_weights.to(device)).sum(dim=(-2, -1)).cpu())
    per_pair = torch.cat(losses)
    init_to_final = per_pair[(i1 == 0) & (i2 == count - 1)]
    return {"val_loss": float(per_pair.mean()), "val_loss_init_to_final": float(init_to_final.mean())}


@dataclass
class TrainState:
    """What :func:`train_imitation` hands to its save callback and takes back to resume."""

    step: int
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    metrics: dict[str, Any]


def _groups(data: ZooTokens | Sequence[ZooTokens] | None) -> list[ZooTokens]:
    return [] if data is None else [data] if isinstance(data, ZooTokens) else [d for d in data if d.num_runs]


def train_imitation(model: nn.Module, optimizer: torch.optim.Optimizer, data: ZooTokens | Sequence[ZooTokens],
                    settings: ImitationSettings, *, ema: EMA,
                    val_data: ZooTokens | Sequence[ZooTokens] | None = None, start_step: int = 0,
                    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                    on_metrics: Callable[[int, dict[str, Any]], None] | None = None,
                    on_save: Callable[[TrainState], None] | None = None, progress: bool = False) -> dict[str, Any]:
    """Train ``model`` from ``start_step`` to ``settings.steps``; returns the last metrics.

    The pair sampler is reseeded from ``(settings.seed, step)`` every step, so a resumed run
    draws the same batches as an uninterrupted one. Under torchrun every rank draws that global
    batch, trains on its share and the gradients are averaged (:mod:`synthnet.distributed`);
    only rank 0 evaluates. ``evaluate(ema_model)`` (e.g. accuracy of
    networks generated from held-out inits) and the validation loss run every ``eval_every``
    steps; ``on_save`` is called every ``save_every`` steps and at the end.

    ``data`` may be several zoos of one architecture each (a family zoo, grouped by layout): every
    step draws one group, with odds proportional to its runs, and its whole batch comes from it;
    the validation losses are the run-weighted means over the groups of ``val_data``.
    """
    device = next(model.parameters()).device
    groups, val_groups = _groups(data), _groups(val_data)
    if not groups:
        raise SynthNetError("imitation has no training runs")
    layouts = [g.layout.to(device) for g in groups]
    weights = [layer_value_weights(g.layout).to(device) for g in groups]
    odds = torch.tensor([float(g.num_runs) for g in groups])
    base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["initial_lr"] = lr
    distributed.check_divisible(settings.batch_size, "method.batch_size")
    if settings.consistency_weight > 0:
        distributed.check_divisible(settings.consistency_batch_size, "method.consistency_batch_size")
    main = distributed.is_main_process()
    generator = torch.Generator()
    metrics: dict[str, Any] = {}
    window_start, window_steps, window_loss, window_mse = time.perf_counter(), 0, 0.0, 0.0
    bar = tqdm(total=settings.steps, initial=start_step, desc="imitation", disable=not (progress and main), leave=False)
    for step in range(start_step, settings.steps):
        model.train()
        generator.manual_seed(settings.seed * 1_000_003 + step)
        factor = lr_factor(step, settings.steps, settings.warmup_steps, settings.min_lr_ratio)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * factor
        k = 0 if len(groups) == 1 else int(torch.multinomial(odds, 1, generator=generator))  # same on every rank
        data, layout, value_weights = groups[k], layouts[k], weights[k]
        batch = shard_batch(make_batch(data, settings, generator, device))
        optimizer.zero_grad(set_to_none=True)
        loss, mse = backward_in_slices(model, batch, layout, value_weights, settings.slice_tokens, step)
        if settings.consistency_weight > 0 and data.times.shape[1] >= 3:
            consistency = settings.consistency_weight * consistency_loss(
                model, data, settings.consistency_batch_size, generator, layout, value_weights, device)
            if not torch.isfinite(consistency):
                raise SynthNetError(f"imitation loss is not finite at step {step + 1}; lower method.lr")
            consistency.backward()
            loss = loss + float(consistency.detach())
        distributed.average_gradients(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        ema.update(model)
        window_steps += 1
        window_loss += float(loss.detach())
        window_mse += float(mse.detach())
        bar.update(1)
        done = step + 1
        if done % settings.log_every == 0 or done == settings.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {"step": done, "loss": distributed.mean(window_loss / window_steps),
                       "mse": distributed.mean(window_mse / window_steps),
                       "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                       "steps_per_s": window_steps / max(elapsed, 1e-9)}
            usage = model.expert_usage()
            if usage is not None:
                metrics["expert_fraction"] = usage["fraction"]
                metrics["balance_loss"], metrics["z_loss"] = usage["balance_loss"], usage["z_loss"]
            log.info("step %d  loss %.5f  mse %.5f  lr %.2e  %.1f steps/s%s", done, metrics["loss"], metrics["mse"],
                     metrics["lr"], metrics["steps_per_s"],
                     f"  experts {usage['fraction']}" if usage is not None else "")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            window_start, window_steps, window_loss, window_mse = time.perf_counter(), 0, 0.0, 0.0
            if on_metrics is not None:
                on_metrics(done, metrics)
        if main and (done % settings.eval_every == 0 or done == settings.steps):
            evaluation: dict[str, Any] = {}
            if val_groups:
                parts = [(validation_loss(ema.model, g, g.layout.to(device), layer_value_weights(g.layout).to(device),
                                          device), g.num_runs) for g in val_groups]
                total = sum(n for _, n in parts)
                evaluation.update({key: sum(part[key] * n for part, n in parts) / total for key in parts[0][0]})
            if evaluate is not None:
                evaluation.update(evaluate(ema.model))
            if evaluation:
                log.info("step %d  %s", done, "  ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
                metrics = {**metrics, **evaluation}
                if on_metrics is not None:
                    on_metrics(done, {"step": done, **evaluation})
        if on_save is not None and (done % settings.save_every == 0 or done == settings.steps):
            on_save(TrainState(done, model, ema, optimizer, metrics))
    bar.close()
    return metrics


# ---------------------------------------------------------------------------- resumable state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat named tensors (for a safetensors file)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
