"""GRPO rewards: functional scores of generated networks, higher is better, no gradient.

A reward maps R stacked weight sets of one target, ``{name: (R, *shape)}``, to a tensor
of shape (R,). Every reward is computed with :mod:`synthnet.evaluation.scoring`, so the
number GRPO optimises is the number evaluation reports. A new reward is one entry in
:data:`REWARDS`: its options class (read by the config schema) and its function.

* ``val_accuracy``: validation accuracy (the default).
* ``val_loss``: minus the validation cross-entropy.
* ``pruned_val_accuracy``: validation accuracy after :func:`magnitude_prune` zeroes the
  smallest ``prune_fraction`` of the weights by magnitude (non-differentiable twice over:
  argmax accuracy and a top-k mask).
* ``quantized_val_accuracy``: validation accuracy after :func:`quantize` rounds the weights to
  ``bits`` bits (symmetric, one scale per output channel; rounding has no useful gradient).

Scoring runs all R networks as one ``functional_call`` under ``vmap`` (``batched``) or
one network at a time (``loop``); ``bench/grpo.py`` measures both (best of 7 timings) and
``batched`` is the default: 2-7x faster at 8, 32 and 128 candidates on digits-MLP and
MNIST-1D MLP on CPU (bench/results/grpo/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from synthnet.errors import SynthNetError
from synthnet.evaluation.scoring import accuracy_and_loss
from synthnet.options import build_options, check_options, option

StackedWeights = Mapping[str, torch.Tensor]  # {name: (R, *shape)}


def magnitude_prune(state_dict: Mapping[str, torch.Tensor], fraction: float, *, batch_dims: int = 0,
                    scope: str = "global", names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Zero the smallest ``fraction`` of weights by absolute value; return a new state dict.

    state_dict: ``{name: (*batch, *shape)}`` with ``batch_dims`` leading batch dimensions
    (0 for one network, 1 for R stacked networks: each network is pruned on its own).
    ``names``: the tensors eligible for pruning; default every tensor with at least 2
    dimensions beyond the batch ones (weight matrices and kernels; biases are kept).
    ``scope='global'`` (default, as in the evaluation report) ranks all eligible entries of
    a network together; ``scope='layer'`` prunes ``round(fraction * numel)`` entries of each
    eligible tensor. Exactly that
    many entries are zeroed (ties broken by position), so the pruned fraction is exact.
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise SynthNetError(f"prune fraction must be in [0, 1], got {fraction}")
    if scope not in ("layer", "global"):
        raise SynthNetError(f"unknown prune scope '{scope}'; use layer or global")
    if names is None:
        names = [k for k, v in state_dict.items() if v.dim() - batch_dims >= 2]
    out = dict(state_dict)
    if not names or fraction == 0.0:
        return out

    def flat(name: str) -> torch.Tensor:  # (batch, numel)
        tensor = state_dict[name]
        return tensor.reshape(-1, tensor[(0,) * batch_dims].numel()) if batch_dims else tensor.reshape(1, -1)

    def zero_smallest(values: torch.Tensor) -> torch.Tensor:  # (batch, n) -> (batch, n)
        count = int(round(float(fraction) * values.shape[1]))
        if count == 0:
            return values
        index = values.abs().argsort(dim=1, stable=True)[:, :count]
        return values.scatter(1, index, torch.zeros_like(index, dtype=values.dtype))

    if scope == "layer":
        for name in names:
            out[name] = zero_smallest(flat(name)).reshape(state_dict[name].shape)
    else:
        flats = [flat(name) for name in names]
        pruned = zero_smallest(torch.cat(flats, dim=1))
        for name, part in zip(names, pruned.split([f.shape[1] for f in flats], dim=1)):
            out[name] = part.reshape(state_dict[name].shape)
    return out


@torch.no_grad()
def quantize(state_dict: Mapping[str, torch.Tensor], bits: int, *, batch_dims: int = 0,
             names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Round-to-nearest symmetric quantization with one scale per output channel; return a new state dict.

    Each eligible tensor ``(*batch, out, ...)`` gets, per output channel, ``scale = max|w| / q_max`` with
    ``q_max = 2^(bits-1) - 1`` and becomes ``clamp(round(w / scale), -q_max, q_max) * scale``: float
    tensors whose entries are integers times their channel's scale (a zero channel stays zero, and so
    do zeros from :func:`magnitude_prune`). ``names`` defaults to every tensor with at least 2 dimensions
    beyond the batch ones (biases are kept in float, as integer inference keeps them in 32 bits)."""
    bits = int(bits)
    if not 2 <= bits <= 16:
        raise SynthNetError(f"quantization bits must be 2..16, got {bits}")
    if names is None:
        names = [k for k, v in state_dict.items() if v.dim() - batch_dims >= 2]
    q_max = 2 ** (bits - 1) - 1
    out = dict(state_dict)
    for name in names:
        tensor = state_dict[name]
        reduce = tuple(range(batch_dims + 1, tensor.dim()))
        scale = tensor.abs().amax(dim=reduce, keepdim=True) / q_max
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        out[name] = torch.clamp(torch.round(tensor / safe), -q_max, q_max) * scale
    return out


def compress(stacked: StackedWeights, prune: float | None, bits: int | None, names: list[str]) -> StackedWeights:
    """R stacked networks pruned (global magnitude, exact count) and then quantized, as ``generate`` writes
    them; ``stacked`` itself when both are None."""
    if prune:
        stacked = magnitude_prune(stacked, float(prune), batch_dims=1, names=names)
    if bits:
        stacked = quantize(stacked, int(bits), batch_dims=1, names=names)
    return stacked


def accuracy_and_loss_loop(model: nn.Module, stacked: StackedWeights, inputs: torch.Tensor,
                           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same numbers as :func:`synthnet.evaluation.scoring.accuracy_and_loss`, one network at a
    time with ``functional_call`` (the loop the batched version is measured against): (R,), (R,)."""
    count = next(iter(stacked.values())).shape[0]
    accuracy, loss = torch.empty(count), torch.empty(count)
    for i in range(count):
        logits = functional_call(model, {k: v[i] for k, v in stacked.items()}, (inputs,))  # (N, classes)
        accuracy[i] = (logits.argmax(-1) == labels).float().mean()
        loss[i] = torch.nn.functional.cross_entropy(logits, labels)
    return accuracy, loss


SCORERS = {"batched": accuracy_and_loss, "loop": accuracy_and_loss_loop}


@dataclass(frozen=True)
class NoOptions:
    """A reward without options."""


@dataclass(frozen=True)
class PruneOptions:
    """``reward=pruned_val_accuracy``: validation accuracy after zeroing the smallest weights by magnitude
    (:func:`magnitude_prune`; biases are kept). Non-differentiable: argmax and a top-k mask."""

    prune_fraction: float = option(0.5, "p: fraction of weights zeroed, 0..1", low=0, high=1)
    prune_scope: str = option("global", "global: p of all weights of a network ranked together | layer: p of "
                                        "each weight tensor", choices=("global", "layer"))

    def __post_init__(self):
        check_options(self, "reward.")


@dataclass(frozen=True)
class QuantizeOptions:
    """``reward=quantized_val_accuracy``: validation accuracy after :func:`quantize` (round to nearest,
    one scale per output channel; biases kept)."""

    bits: int = option(4, "bit width of every weight tensor (int8 = 8, int4 = 4)", low=2, high=16)

    def __post_init__(self):
        check_options(self, "reward.")


def _val_accuracy(scores, model, stacked, inputs, labels, options: NoOptions):
    return scores(model, stacked, inputs, labels)[0]


def _val_loss(scores, model, stacked, inputs, labels, options: NoOptions):
    return -scores(model, stacked, inputs, labels)[1]


def _pruned_val_accuracy(scores, model, stacked, inputs, labels, options: PruneOptions):
    pruned = magnitude_prune(stacked, float(options.prune_fraction), batch_dims=1, scope=options.prune_scope)
    return scores(model, pruned, inputs, labels)[0]


def _quantized_val_accuracy(scores, model, stacked, inputs, labels, options: QuantizeOptions):
    return scores(model, quantize(stacked, int(options.bits), batch_dims=1), inputs, labels)[0]


# name -> (options class, reward function); val_accuracy (accuracy of each generated network on the
# validation split) is the default, val_loss (minus the validation cross-entropy) is smooth and rarely ties
REWARDS: dict[str, tuple[type, Callable]] = {
    "val_accuracy": (NoOptions, _val_accuracy),
    "val_loss": (NoOptions, _val_loss),
    "pruned_val_accuracy": (PruneOptions, _pruned_val_accuracy),
    "quantized_val_accuracy": (QuantizeOptions, _quantized_val_accuracy),
}


@dataclass
class Reward:
    """A built reward: call it on stacked weights ``{name: (R, *shape)}`` to get (R,) rewards.

    ``model`` is the target architecture (a template for ``functional_call``); ``inputs`` and
    ``labels`` are the validation split; ``options`` hold reward-specific settings
    (``prune_fraction``, ``prune_scope``); ``scoring`` is ``batched`` or ``loop``.
    """

    name: str
    model: nn.Module
    inputs: torch.Tensor
    labels: torch.Tensor
    options: dict = field(default_factory=dict)
    scoring: str = "batched"
    evaluations: int = 0  # candidates scored so far
    seconds: float = 0.0  # time spent scoring them

    def __post_init__(self):
        if self.name not in REWARDS:
            raise SynthNetError(f"unknown reward '{self.name}'; available: {', '.join(sorted(REWARDS))}")
        if self.scoring not in SCORERS:
            raise SynthNetError(f"unknown reward scoring '{self.scoring}'; use batched or loop")
        self.settings = build_options(REWARDS[self.name][0], self.options, "reward.")

    @torch.no_grad()
    def __call__(self, stacked: StackedWeights) -> torch.Tensor:
        import time

        start = time.perf_counter()
        device = self.inputs.device
        stacked = {k: v.detach().to(device) for k, v in stacked.items()}
        rewards = REWARDS[self.name][1](SCORERS[self.scoring], self.model, stacked, self.inputs, self.labels,
                                        self.settings).float()
        self.seconds += time.perf_counter() - start
        self.evaluations += int(rewards.shape[0])
        return rewards

    @property
    def evaluations_per_second(self) -> float:
        return self.evaluations / self.seconds if self.seconds > 0 else 0.0
